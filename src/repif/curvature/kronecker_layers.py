"""The layers Kronecker-factored curvature covers, and where each sits in the flat parameter
vector (:mod:`repif.curvature.kfac` has the maths). Which module types qualify, and how their
inputs and output gradients are laid out per position, is the layer rules' knowledge
(:mod:`repif.layers`); here they are found in a model and indexed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from repif.layers import LayerRule, rule_for
from repif.task import FunctionalModel
from repif.validation import check_choice

KINDS = ("kfac", "ekfac")
FISHER_MODES = ("exact", "sampled")
OTHER_LAYERS = ("error", "identity", "frozen")
#: How a layer applied at several positions (convolution, tokens) enters A and G
#: (:mod:`repif.curvature.kfac`).
WEIGHT_SHARING = ("expand", "reduce")


@dataclass(frozen=True)
class KroneckerLayer:
    """One ``nn.Linear`` / ``nn.Conv2d`` layer: its weight (and bias) in the flat parameter
    vector. Its block is seen as an (out, d) matrix: the weight reshaped to (out, d_w), then the
    bias as one more column (d = d_w + 1 with a bias)."""

    name: str
    module: nn.Module
    weight_offset: int
    weight_shape: tuple[int, ...]
    bias_offset: int | None

    @property
    def out(self) -> int:
        return int(self.weight_shape[0])

    @property
    def d_weight(self) -> int:
        return int(math.prod(self.weight_shape[1:]))

    @property
    def d(self) -> int:
        return self.d_weight + (self.bias_offset is not None)

    def gather(self, v: Tensor) -> Tensor:
        """(k, p) flat vectors → (k, out, d) matrices of this layer's entries."""
        k, o, dw = v.shape[0], self.out, self.d_weight
        w = v[:, self.weight_offset : self.weight_offset + o * dw].reshape(k, o, dw)
        if self.bias_offset is None:
            return w
        b = v[:, self.bias_offset : self.bias_offset + o].reshape(k, o, 1)
        return torch.cat([w, b], dim=2)

    def scatter(self, m: Tensor, out: Tensor) -> None:
        """Write (k, out, d) matrices into this layer's entries of the (k, p) ``out``."""
        k, o, dw = m.shape[0], self.out, self.d_weight
        out[:, self.weight_offset : self.weight_offset + o * dw] = m[:, :, :dw].reshape(k, -1)
        if self.bias_offset is not None:
            out[:, self.bias_offset : self.bias_offset + o] = m[:, :, dw]

    @property
    def rule(self) -> LayerRule:
        rule = _kronecker_rule(self.module)
        assert rule is not None, f"{self.name} is not a Kronecker layer"
        return rule

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": type(self.module).__name__,
                "weight_offset": self.weight_offset, "weight_shape": list(self.weight_shape),
                "bias_offset": self.bias_offset}


def _kronecker_rule(m: nn.Module) -> LayerRule | None:
    """The layer rule that factors ``m`` as G ⊗ A (:mod:`repif.layers`), or None."""
    rule = rule_for(m)
    return rule if rule is not None and rule.kronecker(m) else None


def kronecker_layers(
    fm: FunctionalModel, other_layers: str = "error"
) -> tuple[list[KroneckerLayer], list[tuple[str, int, int]]]:
    """The model's Kronecker layers (in parameter order) and the (name, offset, numel) of every
    trainable parameter outside them. With ``other_layers="error"`` the latter must be empty:
    a ValueError lists the layers and the options."""
    check_choice(other_layers, OTHER_LAYERS, "other_layers")
    offsets: dict[str, tuple[int, int]] = {}
    off = 0
    for name, numel in zip(fm.space.names, fm.space.numels, strict=True):
        offsets[name] = (off, numel)
        off += numel
    owners: dict[int, int] = {}
    for m in fm.model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layers: list[KroneckerLayer] = []
    covered: set[str] = set()
    unsupported: list[str] = []
    for mod_name, m in fm.model.named_modules():
        own = {n: p for n, p in m.named_parameters(recurse=False)}
        full = {n: f"{mod_name}.{n}" if mod_name else n for n in own}
        trainable = [n for n in own if full[n] in offsets]
        if not trainable:
            continue
        shared = any(owners[id(own[n])] > 1 for n in trainable)
        if (_kronecker_rule(m) is not None and "weight" in trainable and not shared
                and set(trainable) <= {"weight", "bias"}):
            w_off = offsets[full["weight"]][0]
            b_off = offsets[full["bias"]][0] if "bias" in trainable else None
            layers.append(KroneckerLayer(mod_name or "(model)", m, w_off,
                                         tuple(m.weight.shape), b_off))
            covered.update(full[n] for n in trainable)
        else:
            why = "shared with another module" if shared else type(m).__name__
            if isinstance(m, nn.Conv2d) and not shared:
                why = (f"Conv2d with groups={m.groups}, padding={m.padding!r}, "
                       f"padding_mode={m.padding_mode!r}")
            unsupported.append(f"{mod_name or '(model)'} ({why}: {', '.join(trainable)})")
    others = [(n, *offsets[n]) for n in fm.space.names if n not in covered]
    if others and other_layers == "error":
        raise ValueError(
            "K-FAC/EK-FAC covers nn.Linear and nn.Conv2d layers (groups=1, numeric zero "
            "padding) only, and these trainable parameters lie elsewhere: "
            f"{'; '.join(unsupported) or ', '.join(n for n, _, _ in others)}. Pass "
            "kronecker_options={'other_layers': 'identity'} (their curvature is then "
            "weight_decay·I: only damping and weight decay act there) or 'frozen' (left out "
            "of the solve: 0 there), set requires_grad=False on them, or use curvature='ggn'"
        )
    layers.sort(key=lambda layer: layer.weight_offset)
    return layers, others

