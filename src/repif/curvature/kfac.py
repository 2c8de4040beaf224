"""Kronecker-factored curvature (K-FAC, EK-FAC) fitted on the weighted curvature subset.

For every ``nn.Linear`` and ``nn.Conv2d`` layer (groups 1, numeric zero padding) the GGN block of
its parameters (weight, and bias as one more input column of 1s) is approximated by a Kronecker
product G ⊗ A in repif's flat parameter order (docs/design.md, "Kronecker factors"):

* A = Σ_i w_i (1/T) Σ_t ā_it ā_itᵀ — the layer's inputs ā (with a 1 appended when it has a
  bias), averaged over the T positions of a point (a convolution's output positions, with ā
  the unfolded input patch; a sequence's tokens; T = 1 for a plain Linear);
* G = Σ_i w_i Σ_c Σ_t g_ict g_ictᵀ — the gradients of (B_i f_i)_c with respect to the layer's
  outputs s_it, summed over positions, where B_iᵀB_i = Λ_i is the task's factor of the output
  Hessian (``fisher="exact"``: C backward passes per point, so G is the GGN's exact
  Kronecker statistic), or of u_iᵀ f_i for one random u_i with E[u_i u_iᵀ] = Λ_i
  (``fisher="sampled"``: one backward, e.g. the gradient at a label drawn from the model's
  predictive; cheaper, noisier).

Averaging A over positions and summing G gives the KFC convention (Grosse & Martens, 2016):
G ⊗ A = |T| Ω̃ ⊗ Γ̃ with Ω̃, Γ̃ the per-position means (``weight_sharing="expand"``, the
default). ``weight_sharing="reduce"`` (K-FAC-reduce, Eschenhagen et al., 2023) takes the
outer products after reducing the positions: A = Σ_i w_i ā_i ā_iᵀ with ā_i = (1/T) Σ_t ā_it
and G = Σ_i w_i Σ_c ĝ_ic ĝ_icᵀ with ĝ_ic = Σ_t g_ict — exact for a point whose output
gradients do not vary over positions (a linear network up to a pooling), and T times cheaper
to accumulate: T·d² multiply-adds per point and layer become d², which on a full-width
ResNet-18 at 28×28 is most of the factor pass. The weights w_i are the sampler's, so a
Horvitz–Thompson subset (``logit-importance``) gives unbiased A and G.

With A = Q_A diag(s_A) Q_Aᵀ and G = Q_G diag(s_G) Q_Gᵀ, the layer's block is
(Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ with Λ_kl = s_G,k s_A,l (``"kfac"``) or, for ``"ekfac"``
(George et al., 2018), the exact second moments of the per-sample per-output gradients in that
eigenbasis: Λ_kl = Σ_i w_i Σ_c (Q_Gᵀ R_ic Q_A)²_kl with R_ic = Σ_t g_ict ā_itᵀ — the GGN
block's own diagonal in the Kronecker eigenbasis. Weight decay adds wd to every eigenvalue; a
solve with damping λ divides by Λ + wd + λ, one small matrix product per side and layer.

Trainable parameters outside such layers raise a ValueError naming them, unless
``other_layers="identity"`` (their block is wd·I: only damping and weight decay act there) or
``"frozen"`` (left out: their entries of every product and solve are 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repif import distributed
from repif.data import batch_len, take, to_device
from repif.errors import CorruptFileError
from repif.io import environment_metadata, load_tensors, save_tensors_atomic
from repif.layers import LayerRule, rule_for
from repif.memory import MemoryBudget
from repif.progress import bar as progress_bar
from repif.task import FunctionalModel
from repif.validation import check_choice

KINDS = ("kfac", "ekfac")
FISHER_MODES = ("exact", "sampled")
OTHER_LAYERS = ("error", "identity", "frozen")
#: How a layer applied at several positions (convolution, tokens) enters A and G (module doc).
WEIGHT_SHARING = ("expand", "reduce")

#: Bytes per activation element of one point alive while its chunk's factors are gathered: the
#: forward values and what autograd saves (gradients.BACKWARD_OVERHEAD's 3) plus one backward's
#: output gradients at every hooked layer (≤ the activations), retained across the C passes.
KFAC_ACTIVATION_COPIES = 4

#: Basis vectors pushed through one product when :meth:`KroneckerCurvature.dense` is built.
DENSE_BLOCK = 256

#: Version of the factor file layout; a file of another version is refitted.
CACHE_FORMAT = 1


# --------------------------------------------------------------------------- layers
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


# --------------------------------------------------------------------------- the passes
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

    handles = [layer.module.register_forward_hook(hook) for layer in layers]
    try:
        theta = fm.theta.detach().requires_grad_(True)
        output = fm.output(theta, inputs)
    finally:
        for h in handles:
            h.remove()
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

    handles = [layer.module.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            fm.output(fm.theta, take(x, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
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


#: Relative diagonal shift for a retried factor eigendecomposition (see :func:`_eigh`).
EIGH_JITTER = 1e-10


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clipped at 0: the factor is PSD, negatives are round-off) and eigenvectors
    of a symmetric matrix, computed in float64 and returned in its dtype."""
    sym = (0.5 * (m + m.T)).double()
    try:
        vals, vecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        # LAPACK's divide-and-conquer can fail to converge on a large, low-rank factor with
        # many repeated (zero) eigenvalues (ResNet-18's 4,608-wide A on a few images). A shift
        # of EIGH_JITTER × the largest diagonal entry separates them; it is taken back from
        # the eigenvalues, so only round-off of that size remains.
        shift = EIGH_JITTER * float(sym.diagonal().abs().max().clamp_min(1e-300))
        eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
        noise = torch.randn(sym.shape, generator=torch.Generator(device=sym.device)
                            .manual_seed(0), dtype=sym.dtype, device=sym.device)
        vals, vecs = torch.linalg.eigh(sym + shift * (eye + 1e-3 * (noise + noise.T)))
        vals = vals - shift
    # contiguous: a basis read back from the factor cache is contiguous, and the same layout
    # makes the same kernels run, so a cached fit solves bit for bit as the fresh one
    return vals.clamp_min(0).to(m.dtype), vecs.to(m.dtype).contiguous()


@dataclass(frozen=True)
class LayerFactors:
    """A layer's eigenbases Q_A (d, d) and Q_G (out, out), their eigenvalues s_A and s_G, and
    the eigenvalues Λ (out, d) of its block in the basis Q_G ⊗ Q_A."""

    q_a: Tensor
    s_a: Tensor
    q_g: Tensor
    s_g: Tensor
    eigenvalues: Tensor


def fit_kronecker(
    fm: FunctionalModel, x: Any, y: Any, weights: Tensor, *, kind: str = "ekfac",
    fisher: str = "exact", other_layers: str = "error", budget: MemoryBudget | None = None,
    seed: int = 0, progress: bool | None = False, weight_sharing: str = "expand",
) -> KroneckerCurvature:
    """K-FAC (``kind="kfac"``) or EK-FAC (``"ekfac"``) of ``fm`` on the points ``(x, y)`` (the
    gathered subset's model inputs and targets) with the sampler's ``weights``: one pass for A
    and G, their eigendecompositions, and for EK-FAC a second pass for the eigenvalue
    corrections. ``seed`` drives the sampled Fisher's draws; ``progress`` shows a bar per pass
    (:func:`repif.progress.bar`); ``weight_sharing`` is "expand" or "reduce" (module doc; it
    changes the basis, not EK-FAC's exact per-point Λ)."""
    check_choice(kind, KINDS, "kind")
    layers, others = kronecker_layers(fm, other_layers)
    setup = _setup(fm, x, y, weights, layers, fisher, budget, seed, corrections=kind == "ekfac",
                   progress=progress, weight_sharing=weight_sharing)
    a_mats, g_mats = _factor_sums(fm, layers, setup)
    factors: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for i in range(len(layers)):
        s_a, q_a = _eigh(a_mats[i])
        a_mats[i] = None  # type: ignore[call-overload]  # free as we go
        s_g, q_g = _eigh(g_mats[i])
        g_mats[i] = None  # type: ignore[call-overload]
        factors.append((q_a, s_a, q_g, s_g))
    if kind == "ekfac":
        lams = _corrections(fm, layers, setup, [(f[0], f[2]) for f in factors])
    else:
        lams = [torch.outer(f[3], f[1]) for f in factors]
    fitted = [LayerFactors(q_a, s_a, q_g, s_g, lam)
              for (q_a, s_a, q_g, s_g), lam in zip(factors, lams, strict=True)]
    return KroneckerCurvature(kind, fm, layers, fitted, others, other_layers, fisher,
                              budget=budget, weight_sharing=weight_sharing)


# --------------------------------------------------------------------------- the curvature
class KroneckerCurvature:
    """A fitted K-FAC / EK-FAC curvature C = ⊕_layers (Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ + wd·I
    (see the module doc). Offers ``matmat`` (C V), ``inverse`` ((C + λI)⁻¹ V),
    ``inverse_sqrt`` and ``dense``; the ``eigen`` solver inverts it and ``cg``/``lissa`` use
    its inverse as a preconditioner. ``kind`` is "kfac" or "ekfac"."""

    def __init__(
        self, kind: str, fm: FunctionalModel, layers: list[KroneckerLayer],
        factors: list[LayerFactors], others: list[tuple[str, int, int]], other_layers: str,
        fisher: str, *, weight_decay: float | None = None, budget: MemoryBudget | None = None,
        weight_sharing: str = "expand",
    ) -> None:
        self.kind, self.fm, self.layers, self.factors = kind, fm, layers, factors
        self.others, self.other_layers, self.fisher = others, other_layers, fisher
        self.weight_sharing = weight_sharing
        wd = fm.task.weight_decay if weight_decay is None else weight_decay
        self.weight_decay = float(wd)
        self.budget = budget or MemoryBudget.resolve(None, fm.device)

    @property
    def size(self) -> int:
        return self.fm.space.size

    def _map(self, v: Tensor, layer_fn: Callable[[Tensor], Tensor], other_scale: float) -> Tensor:
        """Q f(Λ) Qᵀ V per layer for (k, p) rows V, ``layer_fn`` giving f(Λ); the parameters
        outside the layers are multiplied by ``other_scale`` (0 when frozen)."""
        squeeze = v.ndim == 1
        rows = v[None] if squeeze else v
        out = torch.zeros_like(rows)
        for layer, f in zip(self.layers, self.factors, strict=True):
            m = layer.gather(rows)
            rot = torch.matmul(f.q_g.T, m) @ f.q_a
            rot = rot * layer_fn(f.eigenvalues)
            layer.scatter(torch.matmul(f.q_g, rot) @ f.q_a.T, out)
        if self.other_layers == "identity":
            for _, off, numel in self.others:
                out[:, off : off + numel] = other_scale * rows[:, off : off + numel]
        return out[0] if squeeze else out

    def matmat(self, v: Tensor) -> Tensor:
        """C V for (k, p) rows (or a (p,) vector)."""
        wd = self.weight_decay
        return self._map(v, lambda lam: lam + wd, wd)

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v)

    def inverse(self, v: Tensor, damping: float) -> Tensor:
        """(C + λI)⁻¹ V for (k, p) rows, λ = ``damping``."""
        mu = self.weight_decay + damping
        return self._map(v, lambda lam: (lam + mu).reciprocal(), 1.0 / mu if mu > 0 else 0.0)

    def quadratic(self, v: Tensor, damping: float) -> Tensor:
        """(k,) v_iᵀ(C + λI)⁻¹v_i for (k, p) rows: per layer Σ (Q_Gᵀ V Q_A)² / (Λ + wd + λ),
        the parameters outside the layers over wd + λ ("identity") or left out ("frozen")."""
        mu = self.weight_decay + damping
        out = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        for layer, f in zip(self.layers, self.factors, strict=True):
            rot = torch.matmul(f.q_g.T, layer.gather(v)) @ f.q_a
            out += (rot.pow(2) / (f.eigenvalues + mu)).sum((1, 2))
        if self.other_layers == "identity" and mu > 0:
            for _, off, numel in self.others:
                out += v[:, off : off + numel].pow(2).sum(1) / mu
        return out

    def inverse_sqrt(self, v: Tensor, damping: float) -> Tensor:
        """(C + λI)^(-1/2) V for (k, p) rows (the symmetric square root)."""
        mu = self.weight_decay + damping
        return self._map(v, lambda lam: (lam + mu).rsqrt(), mu ** -0.5 if mu > 0 else 0.0)

    def spectrum(self, damping: float) -> tuple[float, float]:
        """Smallest and largest eigenvalue of C + λI over the layers (and the identity-treated
        parameters)."""
        mu = self.weight_decay + damping
        lows = [float(f.eigenvalues.min()) + mu for f in self.factors]
        highs = [float(f.eigenvalues.max()) + mu for f in self.factors]
        if self.others and self.other_layers == "identity":
            lows.append(mu)
            highs.append(mu)
        return (min(lows), max(highs)) if lows else (mu, mu)

    def dense(self) -> Tensor:
        """The (p, p) matrix C (for checks on small models)."""
        p = self.size
        eye = torch.eye(p, dtype=self.fm.dtype, device=self.fm.device)
        return torch.cat([self.matmat(eye[s : s + DENSE_BLOCK]) for s in range(0, p, DENSE_BLOCK)])

    # ------------------------------------------------------------------ files
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata describing the fit (for :func:`save_tensors_atomic`)."""
        tensors: dict[str, Tensor] = {}
        for i, f in enumerate(self.factors):
            for key in ("q_a", "s_a", "q_g", "s_g", "eigenvalues"):
                tensors[f"{i}.{key}"] = getattr(f, key)
        meta = {"kind": self.kind, "fisher": self.fisher, "other_layers": self.other_layers,
                "weight_sharing": self.weight_sharing,
                "layers": [layer.describe() for layer in self.layers],
                "others": [list(o) for o in self.others]}
        return tensors, meta

    @classmethod
    def from_state(cls, fm: FunctionalModel, tensors: dict[str, Tensor], meta: dict[str, Any],
                   budget: MemoryBudget | None = None) -> KroneckerCurvature:
        """Rebuild a fit saved by :meth:`state` for ``fm`` (its layers must match)."""
        layers, others = kronecker_layers(fm, meta["other_layers"])
        if [layer.describe() for layer in layers] != meta["layers"] or [
                list(o) for o in others] != meta["others"]:
            raise CorruptFileError("the saved factors describe other layers than the model's")
        factors = []
        for i in range(len(layers)):
            parts = {k: tensors[f"{i}.{k}"].to(fm.device, fm.dtype)
                     for k in ("q_a", "s_a", "q_g", "s_g", "eigenvalues")}
            factors.append(LayerFactors(**parts))
        return cls(meta["kind"], fm, layers, factors, others, meta["other_layers"],
                   meta["fisher"], budget=budget,
                   weight_sharing=meta.get("weight_sharing", "expand"))


# --------------------------------------------------------------------------- caching
def _digest(parts: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in parts:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(fm: FunctionalModel) -> str:
    """SHA-256 of the model's parameter names, shapes and values, its buffers and frozen
    parameters."""
    names = json.dumps([list(fm.space.names), [list(s) for s in fm.space.shapes],
                        sorted(fm.buffers), sorted(fm.frozen)]).encode()
    rest = [fm.buffers[k] for k in sorted(fm.buffers)] + [fm.frozen[k] for k in sorted(fm.frozen)]
    return hashlib.sha256(names + _digest([fm.theta, *rest]).encode()).hexdigest()


def data_fingerprint(x: Any, y: Any) -> str:
    """SHA-256 of the gathered subset's input and target tensors."""
    from torch.utils._pytree import tree_flatten

    leaves = [t for t in tree_flatten((x, y))[0] if isinstance(t, Tensor)]
    return _digest(leaves)


#: A Kronecker fit that takes at least this long (seconds) is kept in the default cache when the
#: user names none (``cache_dir=None``): long enough that short fits, the common case, never
#: touch the disk; short enough that a fit worth minutes survives an error raised after it.
LONG_FIT_S = 30.0

#: Environment variable naming the default cache directory of Kronecker factors.
CACHE_ENV = "REPIF_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$REPIF_CACHE_DIR`` if set, else ``~/.cache/repif/factors``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "repif" / "factors"


def load_or_fit(
    cache_dir: str | Path, metadata: dict[str, Any], fm: FunctionalModel,
    fit: Callable[[], KroneckerCurvature], budget: MemoryBudget | None = None,
    save_after_s: float | None = None,
) -> KroneckerCurvature:
    """The factors stored under ``cache_dir`` for exactly this ``metadata`` (model digest, data
    fingerprint, subset, sampler, m, seed, kind, …), else ``fit()`` and store them (only when
    the fit took at least ``save_after_s`` seconds, if given; a store that fails then warns
    instead of raising). A stored file that is damaged or records other metadata is refitted
    with a warning. Over several processes every rank must load (else all refit) and rank 0
    writes."""
    meta = {"format": CACHE_FORMAT, **metadata, **environment_metadata()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{metadata.get('kind', 'kfac')}-{key}.safetensors"
    loaded: KroneckerCurvature | None = None
    if path.exists():
        try:
            tensors, stored = load_tensors(path)
            if stored.get("cache") != meta:
                diff = sorted(k for k in set(meta) | set(stored.get("cache", {}))
                              if meta.get(k) != stored.get("cache", {}).get(k))
                raise CorruptFileError(f"{path}: it records other metadata ({', '.join(diff)})")
            loaded = KroneckerCurvature.from_state(fm, tensors, stored["curvature"], budget)
        except (CorruptFileError, KeyError, TypeError) as err:
            warnings.warn(f"refitting the Kronecker factors: {err}", RuntimeWarning,
                          stacklevel=3)
            loaded = None
    if distributed.agree(int(loaded is not None)) and loaded is not None:
        return loaded
    t0 = time.perf_counter()
    fitted = fit()
    took = time.perf_counter() - t0
    if save_after_s is not None and took < save_after_s:
        return fitted
    if distributed.is_main():
        tensors, curv_meta = fitted.state()
        try:
            save_tensors_atomic(path, tensors, {"cache": meta, "curvature": curv_meta})
        except OSError as err:
            if save_after_s is None:  # a directory the user named: its failure is theirs to see
                raise
            warnings.warn(f"could not keep the {took:.0f} s Kronecker fit in the default cache "
                          f"({err}); set {CACHE_ENV} or kronecker_options={{'cache_dir': ...}}",
                          RuntimeWarning, stacklevel=3)
    return fitted
