"""The solver interface: fitted once on a curvature operator, then applied to any vectors.

Every solve is checked (``Solver.solve``): a result with NaN or inf, or one longer than
(C + λI)⁻¹ can make it for positive semi-definite curvature, raises
:class:`~repif.errors.SolverDivergedError` naming the fix, so a broken solve never reaches a
score. Options are checked when a solver is built: counts are positive integers, tolerances finite
and ≥ 0, scales finite and > 0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from repif.curvature.operator import CurvatureOperator
from repif.errors import SolverDivergedError
from repif.registry import Registry

REGISTRY: Registry[type[Solver]] = Registry("solver")

#: Right-hand sides an iterative solver advances together by default: one pass over the subset
#: then pushes this many vectors through batched (vmapped) products, which costs far less than as
#: many separate passes; the operator bounds the extra activation memory (its memory budget).
RHS_BLOCK_SIZE = 64

#: For PSD curvature, ‖(C + λI)⁻¹g‖ ≤ ‖g‖/(λ + wd) exactly; a solution this many times longer
#: can only come from a numerical breakdown (the margin covers round-off, never a real answer).
EXPLODE_FACTOR = 10.0

#: Curvature kinds that are positive semi-definite by construction (the GGN and its
#: Kronecker-factored approximations), for which the length bound below holds.
PSD_KINDS = frozenset({"ggn", "kfac", "ekfac"})

#: A pivot or eigenvalue of C + λI below this many machine epsilons of the largest makes the
#: system singular to working precision: its solve would amplify round-off past 1/eps.
SINGULAR_EPS = 1.0


def singular_threshold(dtype: torch.dtype) -> float:
    """Relative size below which a pivot/eigenvalue counts as zero in ``dtype``."""
    return SINGULAR_EPS * torch.finfo(dtype).eps


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is a positive integer (bools refused), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def tolerance(value: Any, name: str = "tol") -> float:
    """``value`` as a float if it is finite and ≥ 0 (0: never stop early), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise ValueError(
            f"{name} must be a finite number ≥ 0 (a relative tolerance such as 1e-8), got "
            f"{value!r}"
        )
    return float(value)


def positive_number(value: Any, name: str) -> float:
    """``value`` as a float if it is finite and > 0, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class Solver(ABC):
    """Computes v = (C + λI)⁻¹ g for the curvature C it was fitted on.

    Subclasses set ``name`` to register themselves, take their options as keyword arguments
    and implement ``_solve``; ``solve`` checks its result.
    """

    name: ClassVar[str | None] = None
    #: The curvature kinds this solver inverts; None: any exact (not Kronecker-factored) one.
    curvatures: ClassVar[tuple[str, ...] | None] = None
    #: False for a solver that ignores the curvature (identity): no bound applies to it.
    uses_curvature: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY.add(cls.name, cls)

    def fit(self, operator: CurvatureOperator, damping: float) -> Solver:
        """Prepare for ``solve`` (factorise, estimate a spectrum, …); returns self."""
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
            math.isfinite(damping) and damping >= 0
        ):
            raise ValueError(f"damping must be a finite number ≥ 0, got {damping!r}")
        self.operator = operator
        self.damping = float(damping)
        self._prepare()
        return self

    def _prepare(self) -> None:  # noqa: B027 - optional hook
        """Work done once per fit; default none."""

    def solve(self, g: Tensor) -> Tensor:
        """(k, p) right-hand sides → (k, p) solutions, checked (see module doc). A right-hand
        side with NaN or inf is refused: an iterative solver would otherwise read its NaN norm
        as zero and return zero, a silent wrong answer."""
        bad = ~torch.isfinite(g.reshape(g.shape[0], -1) if g.ndim else g.reshape(1, -1)).all(1)
        if bool(bad.any()):
            raise ValueError(
                f"{int(bad.sum())} of {bad.numel()} right-hand side(s) given to solver "
                f"{self.name!r} hold NaN or inf (rows {torch.nonzero(bad).flatten().tolist()[:10]})"
                ": their gradients are not finite, so an input, target or loss is. Clean the "
                "data, or check the model's parameters"
            )
        v = self._solve(g)
        self._check(g, v)
        return v

    @abstractmethod
    def _solve(self, g: Tensor) -> Tensor:
        """(k, p) right-hand sides → (k, p) solutions."""

    def quadratic(self, g: Tensor) -> Tensor:
        """(k,) the quadratic forms g_iᵀ(C + λI)⁻¹g_i of (k, p) rows (self-influence's form).
        Default: from the checked block solve; a solver with a factorisation overrides it with
        a cheaper form (half the work: only one side of the factorisation is applied)."""
        return (g * self.solve(g)).sum(1)

    def fix(self) -> str:
        """What to change when the solve breaks down, true for this curvature."""
        if getattr(self.operator, "kind", None) == "hessian":
            return (f"the Hessian may be indefinite: use curvature='ggn' (always positive "
                    f"semi-definite) or raise the damping (now {self.damping:g})")
        return f"raise the damping (now {self.damping:g})"

    def _check(self, g: Tensor, v: Tensor) -> None:
        rows = v.reshape(v.shape[0], -1) if v.ndim else v.reshape(1, -1)
        bad = ~torch.isfinite(rows).all(dim=1)
        if bool(bad.any()):
            raise SolverDivergedError(
                f"solver {self.name!r} returned non-finite values (NaN or inf) for "
                f"{int(bad.sum())} of {rows.shape[0]} right-hand sides; {self.fix()}"
            )
        mu = self.damping + getattr(self.operator, "weight_decay", 0.0)
        if not self.uses_curvature or self.operator.kind not in PSD_KINDS or mu <= 0:
            return
        g_norm = g.reshape(rows.shape[0], -1).norm(dim=1)
        ratio = rows.norm(dim=1) / g_norm.clamp_min(torch.finfo(g.dtype).tiny)
        worst = float(ratio.max())
        if worst > EXPLODE_FACTOR / mu:
            raise SolverDivergedError(
                f"solver {self.name!r} returned a solution {worst:.3g} times as long as its "
                f"right-hand side, more than (C + λI)⁻¹ can stretch a vector when the curvature "
                f"is positive semi-definite (1/(damping + weight_decay) = {1 / mu:.3g}): the "
                f"solve broke down numerically; {self.fix()}"
            )


def accepted_options(name: str) -> list[str]:
    """The keyword options a registered solver takes."""
    return REGISTRY.accepted_options(name)


def build(name: str, options: dict[str, Any]) -> Solver:
    """Instantiate a registered solver, rejecting options it does not take by name."""
    return REGISTRY.build(name, options)
