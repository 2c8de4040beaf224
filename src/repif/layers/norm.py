"""Rules for normalisation layers: ``nn.BatchNorm1d/2d`` (eval mode) and ``nn.LayerNorm``.

Both are affine in their parameters given the normalised input x̂: ∇γ_i = Σ g_i ⊙ x̂_i and
∇β_i = Σ g_i, summed over positions (BatchNorm: the spatial dimensions; LayerNorm: the leading
dimensions between the batch and the normalised shape). A BatchNorm in training mode couples
the points of a batch through its statistics, so it has no per-sample gradient: not eligible.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repif.layers.base import LayerBlock, LayerRule


class BatchNormRule(LayerRule):
    name = "batchnorm"
    types = (nn.BatchNorm1d, nn.BatchNorm2d)

    def eligible(self, m: nn.Module) -> bool:
        return not m.training and m.track_running_stats and m.running_mean is not None

    def per_sample(self, block: LayerBlock, a: Tensor, g: Tensor, state=None
                   ) -> dict[str, Tensor]:
        m = block.module
        shape = (1, -1) + (1,) * (a.ndim - 2)
        xhat = (a - m.running_mean.reshape(shape)) * torch.rsqrt(
            m.running_var.reshape(shape) + m.eps)
        dims = list(range(2, a.ndim))  # positions; the channel is dim 1
        out = {}
        if m.weight is not None:
            out["weight"] = (g * xhat).sum(dims) if dims else g * xhat
            out["bias"] = g.sum(dims) if dims else g
        return out


class LayerNormRule(LayerRule):
    name = "layernorm"
    types = (nn.LayerNorm,)

    def per_sample(self, block: LayerBlock, a: Tensor, g: Tensor, state=None
                   ) -> dict[str, Tensor]:
        m = block.module
        nd = len(m.normalized_shape)
        red = tuple(range(a.ndim - nd, a.ndim))
        mean = a.mean(red, keepdim=True)
        var = a.var(red, keepdim=True, unbiased=False)
        xhat = (a - mean) * torch.rsqrt(var + m.eps)
        lead = tuple(range(1, a.ndim - nd))
        out = {}
        if m.weight is not None:
            out["weight"] = (g * xhat).sum(lead) if lead else g * xhat
        if m.bias is not None:
            out["bias"] = g.sum(lead) if lead else g
        return out
