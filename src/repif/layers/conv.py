"""The rule for ``nn.Conv2d``: per-sample gradients by one of two routes, scores by contraction
or by materialising, and K-FAC's unfolded patches.

Per-sample weight gradient: the same sum as a Linear over the H'·W' output positions, with a the
unfolded input patches (per group for grouped and depthwise convolutions). Three routes give it
(:func:`conv_gradient_route`): "unfold" writes the (in·kh·kw × P) patches and takes one product;
"slices" takes kh·kw products of strided slices of the padded input, without the patch tensor;
"grouped" asks torch's own convolution weight-gradient kernel for all points at once, the batch
folded into the channels as b groups (faster on 3×3 layers with many positions per input
channel; benchmarks/results/conv-gradients.md).

Scores against k queries: "contract" convolves the layer input with the k stacked query filters
and multiplies by the output gradient; "materialise" forms the per-sample gradients; a cost
model picks per layer (:func:`conv_route`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repif.layers.base import LayerBlock, LayerRule
from repif.validation import check_choice

#: Routes for scoring an ``nn.Conv2d`` block against k queries (see :func:`conv_route`).
CONV_SCORE_ROUTES = ("auto", "contract", "materialise")

#: Cost of moving one element through the materialised convolution route (unfolding the
#: patches, writing and reading the per-sample gradient block), in multiply-adds of a
#: convolution. Measured on one CPU thread (ResNet-18 width 16, 128 points): ``F.unfold`` and
#: the per-sample batched product (inner dimension = output positions, often 16–49) move
#: 2–7 ns per element while a convolution runs at 30–50 G multiply-adds/s, i.e. ~100–300
#: multiply-adds per element. At 128 each ResNet-18 layer lands on the faster side of its
#: measured crossover: 1 query contracts every layer; 10 queries contract only the 4×4 layers
#: (few positions, large weights); 100 queries materialise all. On hardware where memory
#: traffic is cheaper relative to arithmetic (GPUs) the figure is lower; both routes give the
#: same scores, so it only moves the crossover.
MATERIALISE_ELEMENT_MACS = 128

#: Routes for a convolution's per-sample weight gradient (see :func:`conv_gradient_route`).
CONV_GRADIENT_ROUTES = ("auto", "unfold", "slices", "grouped")

#: The route every convolution takes: "auto" (per layer, by the measured rule), or one for all
#: (set by tests and benchmarks that compare the two).
conv_gradient_mode = "auto"

#: Fewest output positions per point from which the shifted-slice route is taken for kernels
#: larger than 1×1 (benchmarks/conv_gradients.py; results/conv-gradients.md). On one CPU
#: thread, ResNet-18 width 16 at 28×28: slices 1.5–2.9× faster at 784 positions, 0.9–1.6× at
#: 196, 0.5–0.75× at 49 and 0.15–0.6× at 16, where kh·kw small products cost more than one
#: unfolded one. A 1×1 kernel is one product either way and always takes the slice.
SLICES_MIN_POSITIONS = 256


def conv_route(m: nn.Conv2d, positions: int, k: int) -> str:
    """How to score conv layer ``m`` (``positions`` = H'·W' output positions per point) against
    ``k`` queries: "contract" or "materialise", whichever the cost model finds cheaper.

    Per point, in multiply-adds of a convolution, with F = weight.numel()·positions the cost of
    the layer's forward convolution, p = weight.numel() and U the unfolded patches
    (in_channels·kh·kw·positions elements):

    * contract: k·F (one convolution with k·out_channels filters; its output is read once more
      by the product with the output gradient, which is cheap beside it);
    * materialise: F (the per-sample product over positions) + k·p (the factor product, one
      efficient matrix product) + MATERIALISE_ELEMENT_MACS·(U + p) (unfolding the patches and
      writing, then reading, the per-sample gradient block).

    Contraction wins for few queries and for layers with few output positions; materialising
    wins for many queries. Layers whose padding mode is not "zeros" are materialised.
    """
    if m.padding_mode != "zeros":
        return "materialise"
    kh, kw = m.kernel_size
    p = m.weight.numel()
    flops = p * positions
    unfolded = m.in_channels * kh * kw * positions
    contract = k * flops
    materialise = flops + k * p + MATERIALISE_ELEMENT_MACS * (unfolded + p)
    return "contract" if contract < materialise else "materialise"


#: Fewest input channels per group from which the grouped route is taken (with kernels larger
#: than 1×1 and at least as many output positions as input channels per group). Measured on one
#: CPU thread (ResNet-18 layers at widths 16 and 64, 64–128 points): 3×3 layers with positions
#: ≥ channels ran 1.0–3.2× faster grouped than by the best other route; with positions well
#: below the channels (the 4×4 and 7×7 maps of wide layers) 2–3× slower; 1×1 kernels and the
#: 3-channel stem 0.7–0.9×.
GROUPED_MIN_CHANNELS = 16


def conv_gradient_route(m: nn.Conv2d, positions: int) -> str:
    """"grouped", "slices" or "unfold" for the per-sample weight gradient of ``m`` with
    ``positions`` output positions per point (``conv_gradient_mode`` overrides the rule)."""
    if conv_gradient_mode != "auto":
        return conv_gradient_mode
    per_group = m.in_channels // m.groups
    if (m.kernel_size != (1, 1) and per_group >= GROUPED_MIN_CHANNELS
            and positions >= per_group):
        return "grouped"
    if m.kernel_size == (1, 1) or positions >= SLICES_MIN_POSITIONS:
        return "slices"
    return "unfold"


def conv_weight_by_slices(m: nn.Conv2d, a: Tensor, g4: Tensor) -> Tensor:
    """(b, G, out/G, in/G·kh·kw) per-sample weight gradients without unfolding: for each kernel
    offset (u, v), the strided slice of the padded input that meets the output positions is
    multiplied with the output gradient, Σ_p g[o, p] a_pad[i, p·s + (u, v)·d]; kh·kw products
    of (out × P)(P × in), no (in·kh·kw × P) patch tensor written and read back."""
    b = a.shape[0]
    kh, kw = m.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = m.stride, m.dilation, m.padding
    groups = m.groups
    ho, wo = g4.shape[-1] // _out_width(m, a), _out_width(m, a)
    ap = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    cin = a.shape[1] // groups
    out = torch.empty(b, groups, g4.shape[2], cin, kh, kw, dtype=a.dtype, device=a.device)
    for u in range(kh):
        for v in range(kw):
            sl = ap[:, :, u * dh : u * dh + sh * (ho - 1) + 1 : sh,
                    v * dw : v * dw + sw * (wo - 1) + 1 : sw]  # (b, in, H', W')
            sl = sl.reshape(b, groups, cin, -1)
            out[..., u, v] = g4 @ sl.transpose(-1, -2)
    return out.reshape(b, groups, g4.shape[2], -1)


def conv_weight_grouped(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """(b, c, in/G, kh, kw) per-sample weight gradients from torch's convolution weight-gradient
    kernel, the b points folded into the channels as b·G groups: input (1, b·in, H, W), output
    gradient (1, b·c, H', W') with any c divisible by G (a projected output side too)."""
    b = a.shape[0]
    c = g.shape[1]
    g4 = g.reshape(1, b * c, *g.shape[2:]) if g.ndim == 4 else g.reshape(
        1, b * c, -1, _out_width(m, a))
    w = torch.nn.grad.conv2d_weight(
        a.reshape(1, -1, *a.shape[2:]), (b * c, m.in_channels // m.groups, *m.kernel_size), g4,
        stride=m.stride, padding=m.padding, dilation=m.dilation, groups=b * m.groups)
    return w.reshape(b, c, m.in_channels // m.groups, *m.kernel_size)


def _out_width(m: nn.Conv2d, a: Tensor) -> int:
    kw, sw, dw, pw = m.kernel_size[1], m.stride[1], m.dilation[1], m.padding[1]
    return (a.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def conv_scores(block: LayerBlock, factors: Tensor, a: Tensor, g: Tensor, workspace: int
                ) -> Tensor:
    """(k, b) scores of an nn.Conv2d block without per-sample gradients.

    With V_q the weight part of factor row q, ⟨V_q, Σ_t g_t cols_tᵀ⟩ = Σ_t g_tᵀ (V_q cols_t) =
    Σ g ⊙ conv2d(x, V_q): one convolution of the layer input with the stacked query filters
    (same stride, padding, dilation and groups, no bias), times the output gradient, summed over
    channels and positions. The bias part is ⟨v_q, Σ_t g_t⟩. Queries go through in blocks whose
    (b, block · out, H', W') output stays within ``workspace`` elements per point (the unfolded
    patches the materialised route would hold), so memory stays within the same row.
    """
    m = block.module
    b, k = a.shape[0], factors.shape[0]
    groups, c_out = m.groups, m.out_channels
    g5 = g.reshape(b, groups, 1, c_out // groups, -1)  # (b, G, 1, out/G, P)
    per_query = g5[0].numel()
    step = max(1, min(k, workspace // max(1, per_query)))
    out = torch.zeros(k, b, dtype=g.dtype, device=g.device)
    for name, off, size in zip(block.names, block.offsets, block.numels, strict=True):
        v = factors[:, off : off + size]
        if name == "bias":
            out += v @ g5.sum(4).reshape(b, c_out).T
            continue
        for q0 in range(0, k, step):
            kq = min(step, k - q0)
            # filters ordered (group, query, out/G, …) so each group's conv sees its own inputs
            w = v[q0 : q0 + kq].reshape(kq, groups, c_out // groups, *m.weight.shape[1:])
            w = w.transpose(0, 1).reshape(groups * kq * (c_out // groups), *m.weight.shape[1:])
            y = F.conv2d(a, w, None, m.stride, m.padding, m.dilation, groups)
            y = y.reshape(b, groups, kq, c_out // groups, -1)
            out[q0 : q0 + kq] += torch.einsum("bgqop,bgop->qb", y, g5[:, :, 0])
    return out


class Conv2dRule(LayerRule):
    """``nn.Conv2d`` with numeric zero padding (other padding modes and string padding go to the
    generic rule)."""

    name = "conv2d"
    types = (nn.Conv2d,)

    def matches(self, m: nn.Module) -> bool:
        return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and \
            not isinstance(m.padding, str)

    def per_sample(self, block: LayerBlock, a: Tensor, g: Tensor, state=None
                   ) -> dict[str, Tensor]:
        m, b = block.module, a.shape[0]
        groups = m.groups
        g4 = g.reshape(b, groups, g.shape[1] // groups, -1)  # (b, G, out/G, P)
        route = conv_gradient_route(m, g4.shape[-1])
        if route == "grouped":
            w = conv_weight_grouped(m, a, g)
        elif route == "slices":
            w = conv_weight_by_slices(m, a, g4)
        else:
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                            stride=m.stride)  # (b, in·kh·kw, P), channel-major rows
            c4 = cols.reshape(b, groups, cols.shape[1] // groups, -1)  # (b, G, in/G·kh·kw, P)
            w = g4 @ c4.transpose(-1, -2)  # a batched product: einsum took up to 2× longer
        out = {"weight": w.reshape(b, *m.weight.shape)}
        if m.bias is not None:
            out["bias"] = g4.sum(3).reshape(b, -1)
        return out

    def scores(self, block: LayerBlock, factors: Tensor, a: Tensor, g: Tensor, workspace: int,
               route: str = "auto") -> Tensor | None:
        """Contracted (:func:`conv_scores`) where ``route`` (or, for "auto", :func:`conv_route`)
        says "contract"; None (materialise) otherwise."""
        check_choice(route, CONV_SCORE_ROUTES, "conv_scores")
        if route == "auto":
            route = conv_route(block.module, g[0, 0].numel(), factors.shape[0])
        return conv_scores(block, factors, a, g, workspace) if route == "contract" else None

    def workspace(self, m: nn.Module, a: Tensor) -> int:
        kh, kw = m.kernel_size
        return int(a.numel() * kh * kw // max(1, m.stride[0] * m.stride[1]))

    def kronecker(self, m: nn.Module) -> bool:
        return m.groups == 1

    def kronecker_inputs(self, m: nn.Module, a: Tensor, bias: bool) -> Tensor:
        a3 = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                      stride=m.stride).transpose(1, 2)
        if bias:
            a3 = torch.cat([a3, a3.new_ones(*a3.shape[:2], 1)], dim=2)
        return a3

    def kronecker_grads(self, m: nn.Module, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
