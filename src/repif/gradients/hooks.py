"""Per-sample gradients from one ordinary batched backward, layer by layer.

Hooks capture each layer's input activations a and output gradients g during one batched
forward+backward of the summed per-sample losses; a sample's parameter gradient is then a closed
form in (a_i, g_i) (docs/design.md, "Scale"):

* ``nn.Linear``: ∇W_i = Σ_t g_it a_itᵀ (t over any extra dims, e.g. tokens), ∇b_i = Σ_t g_it;
* ``nn.Conv2d``: the same sum over output positions, with a the unfolded input patches (per
  group for grouped and depthwise convolutions);
* ``nn.BatchNorm*d`` (eval mode) and ``nn.LayerNorm``: ∇γ_i = Σ g_i ⊙ x̂_i, ∇β_i = Σ g_i;
* ``nn.Embedding``: ∇E_i = Σ_t e_{id_it} g_itᵀ (a scatter-add);
* Hugging Face's ``Conv1D`` (GPT-2; y = x W + b, W of shape (in, out)): ∇W_i = Σ_t a_it g_itᵀ.

A layer whose output has one row shared by the whole batch (Hugging Face's position
embeddings) is expanded to one row per point in the forward, so each point's gradient stays
its own.

This costs about one backward pass plus one extra product per layer, where ``vmap(grad)`` costs
several times the pass on convolutions. Gradients are produced one layer at a time, so scores
against a query block never need the full p-vector of a point; for ``nn.Linear`` and (when
:func:`conv_route` finds it cheaper, i.e. for few queries) ``nn.Conv2d`` layers, scores are
contracted from (a, g) without forming per-sample gradients at all. Models with any other
parametrised module, a layer called twice per forward, or train-mode BatchNorm are not
eligible; :func:`layer_engine` then returns None and the ``torch.func`` path is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repif.data import batch_len
from repif.gradients.streaming import per_sample_gradients, split_batch
from repif.task import FunctionalModel
from repif.validation import check_choice

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding)

#: Agreement with the torch.func engine required on the self-check, per dtype: round-off of a
#: different summation order, far below any real disagreement (a wrong formula is O(1) off).
SELF_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}

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


@dataclass(frozen=True)
class LayerBlock:
    """One module's trainable parameters: names, flat offsets and sizes in the parameter space."""

    module: nn.Module
    names: tuple[str, ...]  # attribute names on the module: "weight", "bias"
    offsets: tuple[int, ...]
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is Hugging Face's ``Conv1D`` (GPT-2's linear layer with a transposed
    (in, out) weight: y = x W + b), recognised without importing transformers."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int) and \
        isinstance(getattr(m, "weight", None), Tensor) and m.weight.ndim == 2


def _eligible_module(m: nn.Module) -> bool:
    if is_conv1d(m):
        return True
    if not isinstance(m, SUPPORTED):
        return False
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return not m.training and m.track_running_stats and m.running_mean is not None
    return True


class LayerGradientEngine:
    """Per-sample gradients of a :class:`FunctionalModel` at its parameters, by hooks."""

    def __init__(
        self, fm: FunctionalModel, blocks: list[LayerBlock], conv_scores: str = "auto"
    ) -> None:
        self.fm = fm
        self.blocks = blocks
        self.workspace_numel = 0  # one point's largest per-layer temporary, set by the probe
        self.conv_scores = conv_scores

    @property
    def conv_scores(self) -> str:
        """How :meth:`scores` treats ``nn.Conv2d`` blocks: "auto" (per layer, from
        :func:`conv_route`), or "contract" / "materialise" for every one of them."""
        return self._conv_scores

    @conv_scores.setter
    def conv_scores(self, route: str) -> None:
        check_choice(route, CONV_SCORE_ROUTES, "conv_scores")
        self._conv_scores = route

    def conv_route(self, m: nn.Conv2d, a: Tensor, g: Tensor, k: int) -> str:
        """The route :meth:`scores` takes for conv layer ``m`` with ``k`` queries."""
        if self.conv_scores != "auto":
            return self.conv_scores
        return conv_route(m, g[0, 0].numel(), k)

    def row_bytes(self, materialise: bool) -> int:
        """Bytes one point adds beyond its backward pass: the largest layer's temporaries
        (unfolded patches, its gradient block, its einsum output) and, when the full gradient
        is materialised, the p-vector."""
        extra = self.workspace_numel + 2 * self.largest_block
        if materialise:
            extra += self.fm.space.size
        return extra * self.fm.theta.element_size()

    @property
    def largest_block(self) -> int:
        return max(b.numel for b in self.blocks)

    def _capture(self, inputs: Any, targets: Any, measure: str) -> dict[nn.Module, tuple]:
        """One forward and one backward to the hooked layers' outputs only (no parameter
        gradients are formed); (input activation, output gradient) per hooked module."""
        fm = self.fm
        acts: dict[nn.Module, Tensor] = {}
        outs: dict[nn.Module, Tensor] = {}

        n = batch_len(targets)

        def fwd(module: nn.Module, ins: tuple, out: Tensor) -> Tensor:
            a = ins[0]
            if n > 1 and out.shape[:1] == (1,) and a.shape[:1] == (1,):
                # one row shared by every point (e.g. Hugging Face's position embeddings of a
                # (1, T) position_ids buffer, broadcast when added): given to each point as its
                # own row, so the backward keeps each point's share of the gradient apart
                a = a.expand(n, *a.shape[1:])
                out = out.expand(n, *out.shape[1:])
            acts[module] = a.detach()
            outs[module] = out
            # the next layer gets a copy: an in-place op there (VGG's and ResNet's
            # ReLU(inplace=True)) would otherwise overwrite this output, and the gradient taken
            # at it would be the gradient after the ReLU
            return out.clone()

        handles = [b.module.register_forward_hook(fwd) for b in self.blocks]
        try:
            theta = fm.theta.detach().requires_grad_(True)
            values = fm.queries if measure == "query" else fm.losses
            total = values(theta, inputs, targets).sum()
        finally:
            for h in handles:
                h.remove()
        modules = list(outs)
        grads = torch.autograd.grad(total, [outs[m] for m in modules], allow_unused=True)
        return {m: (acts[m], g if g is not None else torch.zeros_like(outs[m]))
                for m, g in zip(modules, grads, strict=True)}

    def layer_gradients(
        self, inputs: Any, targets: Any, measure: str = "loss"
    ) -> Iterator[tuple[int, Tensor]]:
        """(flat offset, (b, numel) per-sample gradients) for each trainable parameter, one
        layer at a time, in parameter order; nothing is copied into a p-wide row."""
        captured = self._capture(inputs, targets, measure)
        for block in self.blocks:
            a, g = captured.pop(block.module)
            named = _per_sample(block.module, a, g)
            for name, off in zip(block.names, block.offsets, strict=True):
                yield off, named.pop(name).reshape(a.shape[0], -1)

    def gradients(self, inputs: Any, targets: Any, measure: str = "loss") -> Tensor:
        """(b, p) per-sample gradients, in the flat parameter order."""
        out: Tensor | None = None
        for off, g in self.layer_gradients(inputs, targets, measure):
            if out is None:
                out = torch.empty(g.shape[0], self.fm.space.size, dtype=g.dtype,
                                  device=g.device)
            out[:, off : off + g.shape[1]] = g
        assert out is not None
        return out

    def scores(self, factors: Tensor, inputs: Any, targets: Any) -> Tensor:
        """(k, b) = factors (k, p) · per-sample gradients (b, p)ᵀ, one layer at a time.

        ``nn.Linear`` layers are contracted without forming any per-sample gradient:
        ⟨V, Σ_t g_t a_tᵀ⟩ = Σ_t g_tᵀ V a_t, one matrix product of the inputs with all k query
        matrices (the same multiply-adds, none of the b × out × in memory traffic).
        ``nn.Conv2d`` layers are contracted the same way — one convolution of the layer input
        with the k stacked query filters, times the output gradient (:func:`_conv_scores`) —
        where :func:`conv_route` finds that cheaper than materialising (few queries), and
        materialised otherwise. Other layers form their per-parameter gradients and take a
        product with the factors.
        """
        captured = self._capture(inputs, targets, "loss")
        out: Tensor | None = None
        for block in self.blocks:
            a, g = captured.pop(block.module)
            if isinstance(block.module, nn.Linear):
                part = _linear_scores(block, factors, a, g)
            elif isinstance(block.module, nn.Conv2d) and self.conv_route(
                    block.module, a, g, factors.shape[0]) == "contract":
                part = _conv_scores(block, factors, a, g, self.workspace_numel)
            else:
                named = _per_sample(block.module, a, g)
                part = sum(
                    factors[:, off : off + size] @ named.pop(name).reshape(a.shape[0], -1).T
                    for name, off, size in zip(block.names, block.offsets, block.numels,
                                               strict=True)
                )
            out = part if out is None else out.add_(part)
        assert out is not None
        return out


def _linear_scores(block: LayerBlock, factors: Tensor, a: Tensor, g: Tensor) -> Tensor:
    """(k, b) scores of an nn.Linear block: Σ_t g_tᵀ V_k a_t (+ Σ_t g_tᵀ v_k for the bias),
    with a (b, …, in), g (b, …, out) and V_k the weight part of factor row k."""
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
    wins for many queries. Layers whose padding mode is not "zeros" are materialised (the hook
    engine does not take them at all today; ``torch.func`` does).
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


def _conv_scores(
    block: LayerBlock, factors: Tensor, a: Tensor, g: Tensor, workspace_numel: int
) -> Tensor:
    """(k, b) scores of an nn.Conv2d block without per-sample gradients.

    With V_q the weight part of factor row q, ⟨V_q, Σ_t g_t cols_tᵀ⟩ = Σ_t g_tᵀ (V_q cols_t) =
    Σ g ⊙ conv2d(x, V_q): one convolution of the layer input with the stacked query filters
    (same stride, padding, dilation and groups, no bias), times the output gradient, summed over
    channels and positions. The bias part is ⟨v_q, Σ_t g_t⟩. Queries go through in blocks whose
    (b, block · out, H', W') output stays within ``workspace_numel`` elements per point (the
    unfolded patches the materialised route would hold), so memory stays within the same row.
    """
    m = block.module
    b, k = a.shape[0], factors.shape[0]
    groups, c_out = m.groups, m.out_channels
    g5 = g.reshape(b, groups, 1, c_out // groups, -1)  # (b, G, 1, out/G, P)
    per_query = g5[0].numel()
    step = max(1, min(k, workspace_numel // max(1, per_query)))
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


#: Routes for a convolution's per-sample weight gradient (see :func:`conv_gradient_route`).
CONV_GRADIENT_ROUTES = ("auto", "unfold", "slices")

#: The route every convolution takes: "auto" (per layer, by the measured rule), or one for all
#: (set by tests and benchmarks that compare the two).
conv_gradient_mode = "auto"

#: Fewest output positions per point from which the shifted-slice route is taken for kernels
#: larger than 1×1 (benchmarks/conv_gradients.py; results/conv-gradients.md). On one CPU
#: thread, ResNet-18 width 16 at 28×28: slices 1.5–2.9× faster at 784 positions, 0.9–1.6× at
#: 196, 0.5–0.75× at 49 and 0.15–0.6× at 16, where kh·kw small products cost more than one
#: unfolded one. A 1×1 kernel is one product either way and always takes the slice.
SLICES_MIN_POSITIONS = 256


def conv_gradient_route(m: nn.Conv2d, positions: int) -> str:
    """"slices" or "unfold" for the per-sample weight gradient of ``m`` with ``positions``
    output positions per point (``conv_gradient_mode`` overrides the rule)."""
    if conv_gradient_mode != "auto":
        return conv_gradient_mode
    if m.kernel_size == (1, 1) or positions >= SLICES_MIN_POSITIONS:
        return "slices"
    return "unfold"


def _conv_weight_by_slices(m: nn.Conv2d, a: Tensor, g4: Tensor) -> Tensor:
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


def _out_width(m: nn.Conv2d, a: Tensor) -> int:
    kw, sw, dw, pw = m.kernel_size[1], m.stride[1], m.dilation[1], m.padding[1]
    return (a.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _per_sample(m: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients of module ``m``'s parameters from its input ``a`` and output
    gradient ``g`` (both with the samples along dimension 0)."""
    b = a.shape[0]
    if isinstance(m, nn.Linear) or is_conv1d(m):
        # Linear: y = x Wᵀ + b, ∇W_i = Σ_t g_it a_itᵀ (out, in); HF Conv1D: y = x W + b with W
        # (in, out), the same sum transposed
        a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        spec = "bti,bto->bio" if is_conv1d(m) else "bti,bto->boi"
        out = {"weight": torch.einsum(spec, a3, g3)}
        if m.bias is not None:
            out["bias"] = g3.sum(1)
        return out
    if isinstance(m, nn.Conv2d):
        groups = m.groups
        g4 = g.reshape(b, groups, g.shape[1] // groups, -1)  # (b, G, out/G, P)
        if conv_gradient_route(m, g4.shape[-1]) == "slices":
            w = _conv_weight_by_slices(m, a, g4)
        else:
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                            stride=m.stride)  # (b, in·kh·kw, P), channel-major rows
            c4 = cols.reshape(b, groups, cols.shape[1] // groups, -1)  # (b, G, in/G·kh·kw, P)
            w = torch.einsum("bgop,bgip->bgoi", g4, c4)
        out = {"weight": w.reshape(b, *m.weight.shape)}
        if m.bias is not None:
            out["bias"] = g4.sum(3).reshape(b, -1)
        return out
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        shape = (1, -1) + (1,) * (a.ndim - 2)
        xhat = (a - m.running_mean.reshape(shape)) * torch.rsqrt(
            m.running_var.reshape(shape) + m.eps)
        dims = list(range(2, a.ndim))  # positions; the channel is dim 1
        out = {}
        if m.weight is not None:
            out["weight"] = (g * xhat).sum(dims) if dims else g * xhat
            out["bias"] = g.sum(dims) if dims else g
        return out
    if isinstance(m, nn.LayerNorm):
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
    if isinstance(m, nn.Embedding):
        ids = a.reshape(b, -1)
        g3 = g.reshape(b, ids.shape[1], -1)
        w = torch.zeros(b, m.num_embeddings, g3.shape[-1], dtype=g.dtype, device=g.device)
        w.scatter_add_(1, ids.unsqueeze(-1).expand_as(g3), g3)
        return {"weight": w}
    raise TypeError(f"no per-sample rule for {type(m).__name__}")


def _blocks(fm: FunctionalModel) -> list[LayerBlock] | None:
    """Trainable parameters grouped by owning module, or None if any module is unsupported."""
    offsets = {}
    off = 0
    for name, numel in zip(fm.space.names, fm.space.numels, strict=True):
        offsets[name] = (off, numel)
        off += numel
    blocks, seen = [], set()
    for mod_name, m in fm.model.named_modules():
        own = [(n, p) for n, p in m.named_parameters(recurse=False)]
        full = [f"{mod_name}.{n}" if mod_name else n for n, _ in own]
        trainable = [(n, f) for (n, _), f in zip(own, full, strict=True) if f in offsets]
        if not trainable:
            continue
        if not _eligible_module(m) or any(n not in ("weight", "bias") for n, _ in trainable):
            return None
        seen.update(f for _, f in trainable)
        blocks.append(LayerBlock(
            m, tuple(n for n, _ in trainable), tuple(offsets[f][0] for _, f in trainable),
            tuple(offsets[f][1] for _, f in trainable)))
    if seen != set(offsets):  # a parameter shared by two modules, or registered oddly
        return None
    return sorted(blocks, key=lambda b: b.offsets[0])


def unsupported_layers(fm: FunctionalModel) -> list[str]:
    """``"name (Type)"`` of every module owning trainable parameters that the hook engine has no
    closed-form rule for (those make the whole model fall back to ``torch.func``)."""
    trainable = set(fm.space.names)
    out = []
    for mod_name, m in fm.model.named_modules():
        own = [f"{mod_name}.{n}" if mod_name else n for n, _ in m.named_parameters(recurse=False)]
        if any(f in trainable for f in own) and not _eligible_module(m):
            out.append(f"{mod_name or '(model)'} ({type(m).__name__})")
    return out


def layer_engine(fm: FunctionalModel, probe_inputs: Any, probe_targets: Any) -> (
    LayerGradientEngine | None
):
    """The hook engine for ``fm`` if every trainable parameter is eligible and a self-check on
    the probe points agrees with ``torch.func``; else None."""
    blocks = _blocks(fm)
    if blocks is None:
        return None
    calls: dict[nn.Module, int] = {}
    handles = [b.module.register_forward_hook(
        lambda m, _i, _o: calls.__setitem__(m, calls.get(m, 0) + 1)) for b in blocks]
    try:
        with torch.no_grad():
            fm.output(fm.theta, probe_inputs)
    finally:
        for h in handles:
            h.remove()
    if any(calls.get(b.module, 0) != 1 for b in blocks):  # unused or called twice
        return None
    engine = LayerGradientEngine(fm, blocks)
    engine.workspace_numel = _workspace_numel(fm, blocks, probe_inputs)
    try:
        mine = engine.gradients(probe_inputs, probe_targets)
    except (RuntimeError, TypeError, KeyError, ValueError):
        return None
    ref = per_sample_gradients(fm, probe_inputs, probe_targets)
    tol = SELF_CHECK_TOL.get(fm.dtype, 1e-4)
    if float((mine - ref).norm()) > tol * max(float(ref.norm()), 1e-30):
        return None
    return engine


def _workspace_numel(fm: FunctionalModel, blocks: list[LayerBlock], inputs: Any) -> int:
    """One point's largest per-layer temporary (a convolution's unfolded patches, or a layer's
    input), in elements, measured by a forward on the probe's first point."""
    sizes: list[int] = []

    def measure(m: nn.Module, ins: tuple, _out: Tensor) -> None:
        a = ins[0][:1]
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            sizes.append(int(a.numel() * kh * kw // max(1, m.stride[0] * m.stride[1])))
        else:
            sizes.append(int(a.numel()))

    handles = [b.module.register_forward_hook(measure) for b in blocks]
    try:
        with torch.no_grad():
            fm.output(fm.theta, inputs)
    finally:
        for h in handles:
            h.remove()
    return max(sizes) if sizes else 0


#: Per-sample gradient engines: "auto" (hooks where eligible, else torch.func), "hooks", "func".
PER_SAMPLE_ENGINES = ("auto", "hooks", "func")

#: Training points the hook engine is checked on against torch.func before it is used.
PROBE_POINTS = 2


def choose_engine(fm: FunctionalModel, source: Any, per_sample: str
                  ) -> LayerGradientEngine | None:
    """The hook-based per-sample engine for ``fm`` ("hooks", or "auto" where the model is
    eligible and agrees with torch.func on a probe of ``source``'s first training points), else
    None (torch.func); "hooks" on a model without a rule for every layer is a ValueError
    naming them."""
    check_choice(per_sample, PER_SAMPLE_ENGINES, "per_sample")
    if per_sample == "func":
        return None
    probe = source.gather(torch.arange(min(PROBE_POINTS, len(source))))
    engine = layer_engine(fm, *split_batch(fm, probe))
    if engine is None and per_sample == "hooks":
        missing = unsupported_layers(fm)
        raise ValueError(
            "per_sample='hooks' needs every trainable parameter in an nn.Linear, Conv2d, "
            "BatchNorm (eval), LayerNorm, Embedding or Hugging Face Conv1D called once per "
            "forward" + (f"; without a rule: {', '.join(missing[:10])}" if missing else
                         " (a layer is called twice, or the self-check disagreed)")
            + "; use per_sample='auto' or 'func'"
        )
    return engine
