"""The solver interface: fitted once on a curvature operator, then applied to any vectors."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from repif.curvature import CurvatureOperator
from repif.registry import Registry

REGISTRY: Registry[type[Solver]] = Registry("solver")

#: Right-hand sides an iterative solver advances together by default: one pass over the subset
#: then pushes this many vectors through batched (vmapped) products, which costs far less than as
#: many separate passes; the operator bounds the extra activation memory (its memory budget).
RHS_BLOCK_SIZE = 64


class Solver(ABC):
    """Computes v = (C + λI)⁻¹ g for the curvature C it was fitted on.

    Subclasses set ``name`` to register themselves and take their options as keyword arguments.
    """

    name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY.add(cls.name, cls)

    def fit(self, operator: CurvatureOperator, damping: float) -> Solver:
        """Prepare for ``solve`` (factorise, estimate a spectrum, …); returns self."""
        if damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}")
        self.operator = operator
        self.damping = float(damping)
        self._prepare()
        return self

    def _prepare(self) -> None:  # noqa: B027 - optional hook
        """Work done once per fit; default none."""

    @abstractmethod
    def solve(self, g: Tensor) -> Tensor:
        """(k, p) right-hand sides → (k, p) solutions."""


def accepted_options(name: str) -> list[str]:
    """The keyword options a registered solver takes."""
    cls = REGISTRY.get(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "args", "kwargs")]


def build(name: str, options: dict[str, Any]) -> Solver:
    """Instantiate a registered solver, rejecting options it does not take by name."""
    cls = REGISTRY.get(name)
    accepted = accepted_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"solver {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    return cls(**options)
