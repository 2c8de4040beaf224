"""The passes that gather Kronecker statistics over the weighted subset, chunk by chunk: the
factors A and G (one forward and C — or, sampled, one — backward passes per chunk) and EK-FAC's
eigenvalue corrections (:mod:`repif.curvature.kfac` has the maths; the memory budget sizes the
chunks).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from repif import distributed
from repif.curvature.kronecker_layers import FISHER_MODES, WEIGHT_SHARING, KroneckerLayer
from repif.data import batch_len, take, to_device
from repif.memory import MemoryBudget
from repif.modules import forward_hooks
from repif.progress import bar as progress_bar
from repif.task import FunctionalModel
from repif.validation import check_choice

#: Bytes per activation element of one point alive while its chunk's factors are gathered: the
#: forward values and what autograd saves (gradients.BACKWARD_OVERHEAD's 3) plus one backward's
#: output gradients at every hooked layer (≤ the activations), retained across the C passes.
KFAC_ACTIVATION_COPIES = 4

def _capture(fm: FunctionalModel, layers: list[KroneckerLayer], inputs: Any
             ) -> tuple[Tensor, dict[nn.Module, Tensor], dict[nn.Module, Tensor]]:
    """One forward with the parameters requiring grad: the model output, and each layer's input
    activation (detached) and output (in the graph). A layer called twice is refused."""
    acts: dict[nn.Module, Tensor] = {}
    outs: dict[nn.Module, Tensor] = {}
    names = {layer.module: layer.name for layer in layers}

    def hook(module: nn.Module, ins: tuple, out: Tensor) -> None:
        if module in outs:
            raise ValueError(
                f"layer {names[module]!r} is called more than once per forward (a shared or "
                "recurrent layer); K-FAC needs each layer called once: use curvature='ggn'")
        acts[module] = ins[0].detach()
        outs[module] = out

    with forward_hooks([layer.module for layer in layers], hook):
        output = fm.output(fm.theta.detach().requires_grad_(True), inputs)
    return output, acts, outs


def _inputs(layer: KroneckerLayer, a: Tensor) -> Tensor:
    """(b, T, d) layer inputs ā over the T positions of each point, with the bias column of 1s
    (the layer rule's :meth:`~repif.layers.LayerRule.kronecker_inputs`)."""
    return layer.rule.kronecker_inputs(layer.module, a, layer.bias_offset is not None)


def _grads(layer: KroneckerLayer, g: Tensor) -> Tensor:
    """(b, T, out) gradients with respect to the layer's outputs, positions in the order of
    :func:`_inputs`."""
    return layer.rule.kronecker_grads(layer.module, g)


def _output_vectors(fm: FunctionalModel, output: Tensor, y: Any, root_w: Tensor, fisher: str,
                    noise: Tensor | None) -> list[Tensor]:
    """The (b, C) vectors u backpropagated from the output, each row scaled by √w_i: the C rows
    of B_i (exact), or one sampled u_i with E[u_i u_iᵀ] = Λ_i."""
    out = output.detach()
    with torch.no_grad():
        if fisher == "sampled":
            assert noise is not None
            return [fm.task.sampled_output_gradient(out, y, noise) * root_w[:, None]]
        b = fm.task.output_hessian_factor(out, y) * root_w[:, None, None]  # (b, C, C)
    return [b[:, c, :] for c in range(b.shape[1])]


@dataclass
class _Chunk:
    rows: slice
    acts: dict[nn.Module, Tensor]
    passes: Iterator[dict[nn.Module, Tensor]]


def _chunks(fm: FunctionalModel, layers: list[KroneckerLayer], x: Any, y: Any, weights: Tensor,
            rows: int, fisher: str, noise: Tensor | None) -> Iterator[_Chunk]:
    """For each chunk of this rank's subset points (all of them in one process): the layers'
    input activations and the backward passes, each giving every layer's output gradient
    (√w-scaled; zeros for a layer the output does not depend on)."""
    lo, hi = distributed.local_range(batch_len(y))
    for s in range(lo, hi, rows):
        sl = slice(s, min(s + rows, hi))
        output, acts, outs = _capture(fm, layers, take(x, sl))
        vectors = _output_vectors(fm, output, take(y, sl), weights[sl].clamp_min(0).sqrt(),
                                  fisher, None if noise is None else noise[sl])

        def passes(output=output, outs=outs, vectors=vectors):
            modules = list(outs)
            for i, u in enumerate(vectors):
                grads = torch.autograd.grad(output, [outs[m] for m in modules], grad_outputs=u,
                                            retain_graph=i < len(vectors) - 1,
                                            allow_unused=True)
                yield {m: (g if g is not None else torch.zeros_like(outs[m]))
                       for m, g in zip(modules, grads, strict=True)}

        yield _Chunk(sl, acts, passes())


def _layer_shapes(fm: FunctionalModel, layers: list[KroneckerLayer], x: Any
                  ) -> list[tuple[int, int, int]]:
    """Per layer (T positions, d, out), measured by a no-grad forward on one point."""
    shapes: dict[nn.Module, tuple[int, int, int]] = {}
    by_module = {layer.module: layer for layer in layers}

    def hook(module: nn.Module, _ins: tuple, out: Tensor) -> None:
        layer = by_module[module]
        shapes[module] = (max(1, out[:1].numel() // layer.out), layer.d, layer.out)

    with forward_hooks([layer.module for layer in layers], hook), torch.no_grad():
        fm.output(fm.theta, take(x, slice(0, 1)))
    return list(shapes.values())


def factor_bytes(fm: FunctionalModel, layers: list[KroneckerLayer]) -> int:
    """Bytes the fitted factors keep: per layer A and G (then their eigenvectors) and Λ, plus
    one more A and G while they are decomposed."""
    item = fm.theta.element_size()
    return sum(2 * (layer.d ** 2 + layer.out ** 2) + layer.out * layer.d
               for layer in layers) * item


def _chunk_rows(fm: FunctionalModel, layers: list[KroneckerLayer], x: Any, budget: MemoryBudget,
                fixed: int, corrections: bool, n: int) -> int:
    """Points per chunk: one point's activations (KFAC_ACTIVATION_COPIES copies) and the largest
    layer's temporaries — ā and g over its positions, and for the EK-FAC corrections the
    point's gradient matrix, its rotation and the rotation's square — beside the ``fixed``
    factor storage. One layer's temporaries are alive at a time, so memory is bounded per
    layer; but the corrections pass unfolds every layer's inputs ā once per chunk and keeps
    them across its backward passes, so there all layers' ā count."""
    item = fm.theta.element_size()
    shapes = _layer_shapes(fm, layers, x)
    if corrections:
        held = sum(t * d for t, d, _ in shapes)
        per_layer = [t * o + 3 * o * d for t, d, o in shapes]
    else:
        held, per_layer = 0, [t * (d + o) for t, d, o in shapes]
    row = (KFAC_ACTIVATION_COPIES * fm.activation_numel(x) + held
           + max(per_layer, default=0)) * item
    return budget.rows(row, fixed=fixed, limit=n)


def _noise(fm: FunctionalModel, x: Any, n: int, seed: int) -> Tensor:
    """(n, C) U(0, 1) draws for the sampled Fisher, one row per subset point, drawn for all
    points at once so that they do not depend on the chunking or the number of ranks."""
    with torch.no_grad():
        c = int(fm.output(fm.theta, take(x, slice(0, 1))).shape[-1])
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(n, c, generator=gen, dtype=torch.float64).to(fm.device, fm.dtype)


@dataclass
class _Pass:
    """What both passes over the subset share: the points on the model's device, the weights,
    the chunk size and the sampled-Fisher draws."""

    x: Any
    y: Any
    weights: Tensor
    rows: int
    fisher: str
    noise: Tensor | None
    progress: bool | None = False  # a bar per pass (see repif.progress.bar)
    weight_sharing: str = "expand"

    def chunks(self, fm: FunctionalModel, layers: list[KroneckerLayer], desc: str
               ) -> Iterator[_Chunk]:
        lo, hi = distributed.local_range(batch_len(self.y))
        with progress_bar(hi - lo, desc, self.progress) as bar:
            for chunk in _chunks(fm, layers, self.x, self.y, self.weights, self.rows,
                                 self.fisher, self.noise):
                yield chunk
                bar.update(chunk.rows.stop - chunk.rows.start)


def _setup(fm: FunctionalModel, x: Any, y: Any, weights: Tensor, layers: list[KroneckerLayer],
           fisher: str, budget: MemoryBudget | None, seed: int, corrections: bool,
           progress: bool | None = False, weight_sharing: str = "expand") -> _Pass:
    check_choice(fisher, FISHER_MODES, "fisher")
    check_choice(weight_sharing, WEIGHT_SHARING, "weight_sharing")
    x, y = to_device(x, fm.device, fm.dtype), to_device(y, fm.device, fm.dtype)
    n = batch_len(y)
    if n == 0:
        raise ValueError("the curvature subset is empty; use a non-empty pool")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), one per point, got "
                         f"{tuple(weights.shape)}")
    budget = budget or MemoryBudget.resolve(None, fm.device)
    kept = factor_bytes(fm, layers)
    budget.require(
        kept, f"the K-FAC factors of {len(layers)} layers (largest layer "
        f"{max((layer.d for layer in layers), default=0):,} inputs)",
        "set kronecker_options={'other_layers': 'identity'} and requires_grad=False on the "
        "largest layers, use curvature='ggn' with solver='cg', or raise max_memory")
    rows = _chunk_rows(fm, layers, x, budget, kept, corrections, n) if layers else n
    noise = _noise(fm, x, n, seed) if fisher == "sampled" else None
    w = weights.to(device=fm.device, dtype=fm.dtype)
    return _Pass(x, y, w, rows, fisher, noise, progress, weight_sharing)


def kronecker_statistics(
    fm: FunctionalModel, x: Any, y: Any, weights: Tensor, layers: list[KroneckerLayer], *,
    fisher: str = "exact", budget: MemoryBudget | None = None, seed: int = 0,
    weight_sharing: str = "expand",
) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer the factors A (d, d) and G (out, out) on the points ``(x, y)`` (model inputs
    and targets) with ``weights`` (see the module doc). Over several processes each rank sums
    its share of the points and the sums are added."""
    setup = _setup(fm, x, y, weights, layers, fisher, budget, seed, corrections=False,
                   weight_sharing=weight_sharing)
    return _factor_sums(fm, layers, setup)


def _factor_sums(fm: FunctionalModel, layers: list[KroneckerLayer], setup: _Pass
                 ) -> tuple[list[Tensor], list[Tensor]]:
    dt, dev = fm.dtype, fm.device
    reduce = setup.weight_sharing == "reduce"
    a_mats = [torch.zeros(layer.d, layer.d, dtype=dt, device=dev) for layer in layers]
    g_mats = [torch.zeros(layer.out, layer.out, dtype=dt, device=dev) for layer in layers]
    for chunk in setup.chunks(fm, layers, "K-FAC factors"):
        w = setup.weights[chunk.rows].clamp_min(0)
        for i, layer in enumerate(layers):
            a = chunk.acts.get(layer.module)
            if a is None:
                continue  # not called in this forward: no statistics
            a3 = _inputs(layer, a)
            if reduce:  # (b, 1, d): the mean over positions, then one outer product per point
                a3 = a3.mean(1, keepdim=True)
            flat = (a3 * (w / a3.shape[1]).sqrt()[:, None, None]).reshape(-1, layer.d)
            a_mats[i] += flat.T @ flat
        for grads in chunk.passes:
            for i, layer in enumerate(layers):
                if layer.module in grads:
                    g3 = _grads(layer, grads[layer.module])
                    flat = (g3.sum(1) if reduce else g3).reshape(-1, layer.out)
                    g_mats[i] += flat.T @ flat
    a_mats = [distributed.all_reduce_sum(a) for a in a_mats]
    g_mats = [distributed.all_reduce_sum(g) for g in g_mats]
    return a_mats, g_mats


def _corrections(fm: FunctionalModel, layers: list[KroneckerLayer], setup: _Pass,
                 bases: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """EK-FAC's Λ per layer: Σ_i w_i Σ_c (Q_Gᵀ R_ic Q_A)² with R_ic = Σ_t g_ict ā_itᵀ the
    per-point, per-output-vector gradient matrix; ``bases`` holds (Q_A, Q_G) per layer."""
    out = [torch.zeros(layer.out, layer.d, dtype=fm.dtype, device=fm.device) for layer in layers]
    for chunk in setup.chunks(fm, layers, "EK-FAC eigenvalues"):
        inputs = {}
        for i, layer in enumerate(layers):
            if layer.module in chunk.acts:
                a3 = _inputs(layer, chunk.acts[layer.module])
                # one position: R = g āᵀ is rank one, so (Q_Gᵀ R Q_A)² = (Q_Gᵀg)²((Q_Aᵀā)²)ᵀ
                inputs[layer.module] = (a3[:, 0] @ bases[i][0]).square() if a3.shape[1] == 1 \
                    else a3
        for grads in chunk.passes:
            for i, layer in enumerate(layers):
                a3 = inputs.get(layer.module)
                if a3 is None:
                    continue
                q_a, q_g = bases[i]
                g3 = _grads(layer, grads[layer.module])
                if a3.ndim == 2:  # the rank-one case above: (b, d) squared rotated inputs
                    out[i] += (g3[:, 0] @ q_g).square().T @ a3
                    continue
                r = torch.einsum("bto,bti->boi", g3, a3)
                rot = torch.matmul(q_g.T, r) @ q_a
                out[i] += rot.square().sum(0)
    return [distributed.all_reduce_sum(t) for t in out]

