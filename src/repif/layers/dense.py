"""Rules for affine layers applied per position: ``nn.Linear`` and Hugging Face's ``Conv1D``.

``nn.Linear`` (y = x Wᵀ + b): ∇W_i = Σ_t g_it a_itᵀ, ∇b_i = Σ_t g_it, with t over any extra
dimensions (a sequence's tokens). Scores against k query vectors V_q are contracted without
per-sample gradients: ⟨V_q, Σ_t g_t a_tᵀ⟩ = Σ_t g_tᵀ V_q a_t, one product of the inputs with all
k query matrices. Kronecker statistics: ā = the inputs per position (with a 1 for the bias), g
the output gradients per position.

Hugging Face's ``Conv1D`` (GPT-2; y = x W + b with W of shape (in, out)): the same sum,
transposed; recognised without importing transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repif.layers.base import LayerBlock, LayerRule


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is Hugging Face's ``Conv1D`` (GPT-2's linear layer with a transposed
    (in, out) weight: y = x W + b), recognised without importing transformers."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int) and \
        isinstance(getattr(m, "weight", None), Tensor) and m.weight.ndim == 2


def _per_position(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    b = a.shape[0]
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


class LinearRule(LayerRule):
    name = "linear"
    types = (nn.Linear,)
    #: The per-sample weight gradient Σ_t over positions, in the weight's (out, in) layout.
    weight_spec = "bti,bto->boi"

    def per_sample(self, block: LayerBlock, a: Tensor, g: Tensor, state=None
                   ) -> dict[str, Tensor]:
        a3, g3 = _per_position(a, g)
        out = {"weight": torch.einsum(self.weight_spec, a3, g3)}
        if block.module.bias is not None:
            out["bias"] = g3.sum(1)
        return out

    def scores(self, block: LayerBlock, factors: Tensor, a: Tensor, g: Tensor, workspace: int,
               route: str = "auto") -> Tensor:
        """Σ_t g_tᵀ V_q a_t (+ Σ_t g_tᵀ v_q for the bias), with a (b, …, in), g (b, …, out)."""
        m = block.module
        b, k = a.shape[0], factors.shape[0]
        a3, g3 = a.reshape(b, -1, m.in_features), g.reshape(b, -1, m.out_features)
        out = torch.zeros(k, b, dtype=g.dtype, device=g.device)
        for name, off, size in zip(block.names, block.offsets, block.numels, strict=True):
            v = factors[:, off : off + size]
            if name == "weight":  # (b·T, in) @ (in, k·out) → (b, T, k, out), then · g over out
                va = a3.reshape(-1, m.in_features) @ v.reshape(k * m.out_features, -1).T
                va = va.reshape(b, -1, k, m.out_features)
                out += torch.einsum("btko,bto->kb", va, g3)
            else:
                out += v @ g3.sum(1).T
        return out

    def kronecker(self, m: nn.Module) -> bool:
        return True

    def kronecker_inputs(self, m: nn.Module, a: Tensor, bias: bool) -> Tensor:
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        if bias:
            a3 = torch.cat([a3, a3.new_ones(*a3.shape[:2], 1)], dim=2)
        return a3

    def kronecker_grads(self, m: nn.Module, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1])


class Conv1DRule(LinearRule):
    """Hugging Face's ``Conv1D``: ∇W_i = Σ_t a_it g_itᵀ, the weight being (in, out). Its
    scores and Kronecker statistics are not specialised (it is scored by materialising)."""

    name = "hf-conv1d"
    types = ()
    weight_spec = "bti,bto->bio"

    def matches(self, m: nn.Module) -> bool:
        return is_conv1d(m)

    def scores(self, block: LayerBlock, factors: Tensor, a: Tensor, g: Tensor, workspace: int,
               route: str = "auto") -> None:
        return None

    def kronecker(self, m: nn.Module) -> bool:
        return False
