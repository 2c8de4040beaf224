"""One rule per layer type: what the per-sample engine, K-FAC and the projection know of a layer.

A :class:`LayerRule` says, for the modules it matches (docs/design/architecture.md, "Layers"):

* what a forward hook keeps of a call (:meth:`LayerRule.capture`: the input activation a and
  the output whose gradient g the backward gives, by default ``args[0]`` and the output tensor);
* the per-sample gradients of the module's parameters from (a, g) (:meth:`LayerRule.per_sample`);
* optionally, scores against k query vectors contracted from (a, g) without forming per-sample
  gradients (:meth:`LayerRule.scores`; None means "materialise them");
* for Kronecker-factored curvature, whether the module is a Kronecker layer and its per-position
  inputs ā and output gradients (:meth:`LayerRule.kronecker_inputs`,
  :meth:`LayerRule.kronecker_grads`).

Rules register themselves by declaring ``name`` (as solvers and samplers do); the one registered
last is tried first, so a user's rule for a custom layer (or a subclass of a built-in one) is one
subclass and wins over the built-ins. Modules no specific rule takes fall to the generic rule
of :mod:`repif.layers.local`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn


@dataclass(frozen=True)
class LayerBlock:
    """One module's trainable parameters: names (relative to the module: "weight", "bias", or
    a submodule's dotted name when the module absorbs it), flat offsets, sizes and shapes in the
    parameter space, the module's path in the model, and the rule that handles it."""

    module: nn.Module
    names: tuple[str, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    rule: LayerRule | None = None
    path: str = ""
    shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def values(self, theta: Tensor) -> dict[str, Tensor]:
        """This block's parameters, by name, as views of the flat ``theta``."""
        return {n: theta[o : o + k].view(s) for n, o, k, s in
                zip(self.names, self.offsets, self.numels, self.shapes, strict=True)}


_RULES: list[LayerRule] = []


class LayerRule:
    """How one layer type is seen by the engines (module doc). Subclasses set ``name`` to
    register; instances hold no per-model state."""

    name: ClassVar[str] = ""
    #: The module types the rule matches (refined by :meth:`matches`).
    types: ClassVar[tuple[type, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls())

    # ---------------------------------------------------------------- which modules
    def matches(self, m: nn.Module) -> bool:
        """Whether this rule handles ``m``'s own parameters."""
        return isinstance(m, self.types)

    def eligible(self, m: nn.Module) -> bool:
        """Whether the per-sample rule is valid for ``m`` as configured (e.g. BatchNorm only in
        eval mode); a matched but ineligible module makes the hook engine step aside."""
        return True

    def parameters(self, m: nn.Module) -> tuple[str, ...]:
        """The direct parameter names the rule covers."""
        return ("weight", "bias")

    # ---------------------------------------------------------------- the hook engine
    def capture(self, m: nn.Module, args: tuple, kwargs: dict, out: Any, n: int
                ) -> tuple[Any, Tensor | tuple[Tensor, ...], Any]:
        """(a, the output(s) to take gradients at, the output the model goes on with) for one
        call with ``n`` points. The default keeps the first positional input; a layer whose
        output has one row shared by the whole batch (Hugging Face's position embeddings) is
        expanded to one row per point, so each point's gradient stays its own. The model goes
        on with a copy: an in-place op downstream (ResNet's ReLU(inplace=True)) would
        otherwise overwrite the output whose gradient is taken."""
        a = args[0]
        if n > 1 and out.shape[:1] == (1,) and a.shape[:1] == (1,):
            a = a.expand(n, *a.shape[1:])
            out = out.expand(n, *out.shape[1:])
        return a.detach(), out, out.clone()

    def per_sample(self, block: LayerBlock, a: Any, g: Any, state: dict[str, Tensor] | None
                   ) -> dict[str, Tensor]:
        """{name: (b, *shape)} per-sample gradients of ``block``'s parameters from its captured
        input ``a`` and output gradient ``g`` (points along dimension 0). ``state`` holds the
        module's parameters and buffers at the engine's point (only rules that rerun the
        module need it)."""
        raise NotImplementedError

    def scores(self, block: LayerBlock, factors: Tensor, a: Any, g: Any, workspace: int,
               route: str = "auto") -> Tensor | None:
        """(k, b) factors · per-sample gradientsᵀ contracted from (a, g), or None when the
        rule has no cheaper route than forming the gradients. ``workspace`` bounds one point's
        temporaries in elements; ``route`` is the caller's preference among a rule's routes
        ("auto", or e.g. "contract" / "materialise" for convolutions)."""
        return None

    def workspace(self, m: nn.Module, a: Any) -> int:
        """Elements of one point's largest temporary in :meth:`per_sample`, from the captured
        input of one point."""
        return int(a.numel()) if isinstance(a, Tensor) else 0

    # ---------------------------------------------------------------- Kronecker factors
    def kronecker(self, m: nn.Module) -> bool:
        """Whether K-FAC/EK-FAC can factor ``m``'s block as G ⊗ A."""
        return False

    def kronecker_inputs(self, m: nn.Module, a: Tensor, bias: bool) -> Tensor:
        """(b, T, d) inputs ā over the T positions of each point, with a column of 1s for the
        bias; positions ordered as in :meth:`kronecker_grads`."""
        raise NotImplementedError

    def kronecker_grads(self, m: nn.Module, g: Tensor) -> Tensor:
        """(b, T, out) gradients with respect to the layer's outputs, per position."""
        raise NotImplementedError


def register(rule: LayerRule) -> None:
    """Add ``rule``, tried before every rule registered earlier (one of the same name is
    replaced)."""
    _RULES[:] = [old for old in _RULES if old.name != rule.name]
    _RULES.insert(0, rule)


def rules() -> list[LayerRule]:
    """The registered rules, in the order they are tried (newest first)."""
    return list(_RULES)


def names() -> list[str]:
    return [r.name for r in _RULES]


def rule_for(m: nn.Module) -> LayerRule | None:
    """The first specific rule matching ``m`` (None: only the generic rule can take it)."""
    for rule in _RULES:
        if rule.matches(m):
            return rule
    return None
