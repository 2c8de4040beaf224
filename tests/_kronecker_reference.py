"""K-FAC's factors built by hand, point by point, as the independent reference of the K-FAC
tests (tests/test_kfac.py, tests/test_kfac_reduce.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hand_factors(model: nn.Module, layers, x, y, w, task, weight_sharing: str = "expand"
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A and G per layer: inputs from forward hooks (a convolution's patches by F.unfold, with
    a column of 1s for a bias); per point i and output row c the gradient of (B_i f_i)_c with
    respect to each layer's output through a zero probe added to that output (one autograd
    call per point and row). "expand": A = Σ w_i (1/T) Σ_t ā ā ᵀ, G = Σ w_i Σ_c Σ_t g gᵀ;
    "reduce": A = Σ w_i ā_mean ā_meanᵀ, G = Σ w_i Σ_c (Σ_t g)(Σ_t g)ᵀ."""
    reduce = weight_sharing == "reduce"
    mods = [layer.module for layer in layers]
    out_a = [torch.zeros(layer.d, layer.d, dtype=torch.float64) for layer in layers]
    out_g = [torch.zeros(layer.out, layer.out, dtype=torch.float64) for layer in layers]
    acts, probes = {}, {}

    def hook(m, ins, out):
        acts[m] = ins[0].detach()
        probes[m] = torch.zeros_like(out, requires_grad=True)
        return out + probes[m]

    for i in range(x.shape[0]):
        handles = [m.register_forward_hook(hook) for m in mods]
        f = model(x[i : i + 1])
        for h in handles:
            h.remove()
        b = task.output_hessian_factor(f.detach(), y[i : i + 1])[0]
        for li, (layer, m) in enumerate(zip(layers, mods, strict=True)):
            a = acts[m]
            if isinstance(m, nn.Conv2d):
                cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                                stride=m.stride)[0].T  # (P, d_w)
            else:
                cols = a.reshape(-1, a.shape[-1])
            if layer.bias_offset is not None:
                cols = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype)], 1)
            if reduce:
                cols = cols.mean(0, keepdim=True)
            out_a[li] += w[i] * cols.T @ cols / cols.shape[0]
        for c in range(b.shape[0]):
            grads = torch.autograd.grad((b[c] * f[0]).sum(), [probes[m] for m in mods],
                                        retain_graph=True)
            for li, (m, g) in enumerate(zip(mods, grads, strict=True)):
                g = g[0].reshape(g.shape[1], -1).T if isinstance(m, nn.Conv2d) else g.reshape(
                    -1, g.shape[-1])  # (T, out)
                if reduce:
                    g = g.sum(0, keepdim=True)
                out_g[li] += w[i] * g.T @ g
    return out_a, out_g
