"""Projected scores: many queries against many training points without per-sample gradients.

Every gradient is mapped by a random projection P of the parameter space, block-diagonal over
layers, into D coordinates, and the score I(z_j, z_t) = −∇q_tᵀ(C + λI)⁻¹∇l_j is taken in that
space: −(P∇q_t)ᵀ (P(C + λI)Pᵀ)⁻¹ (P∇l_j), with C the GGN of the fit's subset (its weights and
the objective's weight decay) built from projected per-output gradients (LoGra's design: the
curvature of the projected space, not the projection of a full-space solve):

* an ``nn.Linear`` or ``nn.Conv2d`` (groups 1) layer's gradient is a matrix Σ_t g_t ā_tᵀ (out ×
  in', ā the input — a convolution's input patch — with a 1 appended for the bias), projected
  as P_out (Σ_t g_t ā_tᵀ) P_inᵀ = Σ_t (P_out g_t)(P_in ā_t)ᵀ: the layer's output gradients and
  inputs are projected first and only the small (d_out × d_in) outer products are summed, so no
  per-sample gradient is formed. For a convolution, P_in ā_t for every position t is one
  convolution of the layer input with d_in filters (the rows of P_in, the bias column as their
  bias): no patches are unfolded;
* every other layer (BatchNorm, LayerNorm, Embedding, grouped convolutions) keeps its exact
  per-sample gradient (an identity block): such layers are small in the models this is for.

P_out and P_in have d orthonormal rows: with ``basis="eigen"`` (the default) the top-d
eigenvectors of the layer's K-FAC factors G and A fitted on the curvature subset (with its
weights) — the directions in which the subset's output gradients and inputs are largest, so
the subspace keeps most of every gradient —, with ``basis="random"`` d rows of a Haar-random
rotation (seeded per layer and side). At d = n (``dim`` ≥ every side) P is orthogonal and the
projected scores equal the exact subset-GGN scores up to round-off; below, they are the exact
ones restricted to a subspace of Kronecker structure (benchmarks/results/scores.md measures
Pearson against ``dim``: on the MNIST MLP at d = 64, 0.98 with the eigenbasis against 0.88
with random rows). A query's projected solve is one D-dimensional dense solve, by the
Woodbury identity in the m·C rows of the subset's projected Jacobian when those are fewer
than D.

Projected training gradients (n × D, D = Σ d_out·d_in + the identity blocks' sizes) depend on
the model, the seed and ``dim`` only — not on the curvature or the queries — so they can be
computed once, saved (:meth:`ProjectedGradients.save`) and reused for later queries.

Measured and left out: solving in the full space first and projecting the influence factors
(E[PᵀP] = I, an unbiased sketch of fₜᵀ∇l_j) needs d near full size — on the digits MLP, Pearson
with the exact scores was 0.43 at d = 32 and 0.99 only at d = 64 (D = 4,736 of 4,810): the
factors are large exactly where the training gradients are small (the 1/λ directions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repif.errors import CorruptFileError
from repif.gradients.hooks import LayerGradientEngine
from repif.io import environment_metadata, load_tensors, save_tensors_atomic
from repif.layers import LayerBlock
from repif.layers.conv import conv_gradient_route, conv_weight_by_slices, conv_weight_grouped

#: Score routes of :class:`~repif.estimator.InfluenceEstimator` (its ``scores=`` option):
#: "exact" (every per-sample gradient, layer by layer) or "projected" (this module).
SCORE_METHODS = ("exact", "projected")

#: Bases of the projection (module doc): top eigenvectors of the subset's K-FAC factors, or
#: seeded random orthonormal rows.
PROJECTION_BASES = ("eigen", "random")

#: Default projected dimension per side of each layer (d_out = min(out, dim), d_in = min(in',
#: dim)): the smallest power of two whose mean Pearson correlation with the exact scores was
#: ≥ 0.95 on both models measured (benchmarks/results/scores.md, 100 queries × 2,000 MNIST
#: points, eigenbasis): the MNIST MLP needs 64 (0.985; 32 gave 0.873), a ResNet-18 of width 8
#: 16 (0.967; 64 gave 0.9985). Convolutional models can take 16–32, which is cheaper.
DEFAULT_PROJECTION_DIM = 64

#: Seed stream of the projection matrices, apart from the samplers' streams.
PROJECTION_STREAM = 0x9A0E

#: Version of the stored projected-gradient layout; another version is refused.
FORMAT = 1


def _conv_weight(m: nn.Conv2d, a: Tensor, gp: Tensor) -> Tensor:
    """(b, c, in·kh·kw) Σ_t gp_t ā_tᵀ for a groups-1 convolution ``m`` with (b, c, P) output
    gradients ``gp`` (c need not be m's output channels), by the per-sample engine's route."""
    b = a.shape[0]
    g4 = gp.unsqueeze(1)  # (b, 1, c, P)
    route = conv_gradient_route(m, gp.shape[-1])
    if route == "grouped":
        return conv_weight_grouped(m, a, gp).reshape(b, gp.shape[1], -1)
    if route == "slices":
        return conv_weight_by_slices(m, a, g4).reshape(b, gp.shape[1], -1)
    cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return gp @ cols.transpose(1, 2)


def check_projection(scores: str, dim: int | None, basis: str) -> None:
    """Check the estimator's ``scores``, ``projection_dim`` and ``projection_basis``."""
    from repif.validation import check_choice

    check_choice(scores, SCORE_METHODS, "scores")
    if dim is not None and scores != "projected":
        raise ValueError("projection_dim sets the dimension of scores='projected'; pass "
                         "scores='projected' with it, or drop it")
    check_choice(basis, PROJECTION_BASES, "projection_basis")
    if dim is not None:
        check_dim(dim)


def check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"projection_dim must be a positive integer, got {dim!r}; e.g. "
                         f"{DEFAULT_PROJECTION_DIM}")
    return dim


def eigen_bases(fm: Any, x: Any, y: Any, weights: Tensor, budget: Any
                ) -> dict[nn.Module, tuple[Tensor, Tensor]]:
    """Per Linear/Conv2d module, the eigenvectors (ascending) of its K-FAC factors G and A on
    the weighted points ``(x, y)`` (exact Fisher; other layers are left to the identity)."""
    from repif.curvature.kfac import fit_kronecker

    fitted = fit_kronecker(fm, x, y, weights, kind="kfac", other_layers="identity",
                           budget=budget)
    return {layer.module: (f.q_g, f.q_a) for layer, f in zip(fitted.layers, fitted.factors,
                                                              strict=True)}


def _digest(parts: list[Tensor]) -> str:
    from repif.curvature.kronecker_cache import _digest as digest

    return digest(parts)


def _orthonormal_rows(n: int, d: int, seed: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """(d, n) d orthonormal rows of a Haar rotation of ℝⁿ, from a seeded generator (the sign
    fix makes Q Haar-distributed)."""
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((n, d)))
    q, r = torch.linalg.qr(z)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.T.to(dtype)


@dataclass
class _Side:
    """One layer's projection: the (d_out, out) and (d_in, in') matrices, or None (identity)."""

    block: LayerBlock
    p_out: Tensor | None
    p_in: Tensor | None

    @property
    def size(self) -> int:
        if self.p_out is None:
            return self.block.numel
        return self.p_out.shape[0] * self.p_in.shape[0]


#: Cost of one patch element (in'·P per point) written and read by the output-first route's
#: per-sample convolution gradient, in multiply-adds; fitted to one CPU thread on a ResNet-18 of
#: width 8 at 28×28 (256 points: 16 sends d = 16 to the inputs route and the wide early layers
#: at d = 64 to the outputs route, where each was measured faster).
PATCH_ELEMENT_MACS = 16

#: How a convolution's projection is formed: "auto" (the cheaper by :func:`conv_projection_route`),
#: "inputs" or "outputs" for every one (set by tests that compare the two).
conv_projection_mode = "auto"


def conv_projection_route(m: nn.Conv2d, side: _Side, positions: int) -> str:
    """"inputs" (project every input patch by one convolution with d_in filters, then sum the
    (d_out × d_in) outer products over positions) or "outputs" (the per-sample gradient of a
    d_out-channel convolution, d_out × in', then times P_inᵀ), whichever costs fewer
    multiply-adds per point: P·d_in·in' + P·d_out·d_in against P·d_out·in' + d_out·in'·d_in
    + PATCH_ELEMENT_MACS·P·in' (moving the patches)."""
    if conv_projection_mode != "auto":
        return conv_projection_mode
    d_out, d_in = side.p_out.shape[0], side.p_in.shape[0]
    n_in = side.p_in.shape[1]
    inputs = positions * d_in * n_in + positions * d_out * d_in
    outputs = positions * d_out * n_in + d_out * n_in * d_in + PATCH_ELEMENT_MACS * positions * n_in
    return "inputs" if inputs <= outputs else "outputs"


class KroneckerProjection:
    """The block-diagonal projection P of the module doc for the layers of ``engine``:
    d_out = min(out, ``dim``) and d_in = min(in', ``dim``) per layer, drawn from ``seed``."""

    def __init__(self, engine: LayerGradientEngine, dim: int, seed: int,
                 bases: dict[nn.Module, tuple[Tensor, Tensor]] | None = None) -> None:
        check_dim(dim)
        self.engine, self.dim, self.seed = engine, int(dim), int(seed)
        self.basis = "random" if bases is None else "eigen"
        fm = engine.fm
        self.sides: list[_Side] = []
        for i, block in enumerate(engine.blocks):
            m = block.module
            if not block.rule.kronecker(m):
                self.sides.append(_Side(block, None, None))
                continue
            out = m.weight.shape[0]
            n_in = m.weight[0].numel() + (1 if "bias" in block.names else 0)
            if bases is not None:  # eigenvectors in ascending order: the last d, largest first
                q_g, q_a = bases[m]
                p_out = q_g[:, -min(out, self.dim):].flip(1).T.contiguous().to(fm.dtype)
                p_in = q_a[:, -min(n_in, self.dim):].flip(1).T.contiguous().to(fm.dtype)
            else:
                s = (PROJECTION_STREAM, self.seed, i)
                p_out = _orthonormal_rows(out, min(out, self.dim), (*s, 0), fm.dtype)
                p_in = _orthonormal_rows(n_in, min(n_in, self.dim), (*s, 1), fm.dtype)
            self.sides.append(_Side(block, p_out.to(fm.device), p_in.to(fm.device)))
        self.size = sum(s.size for s in self.sides)

    def describe(self) -> dict[str, Any]:
        """What the projected coordinates depend on (stored beside saved gradients)."""
        from repif.curvature.kronecker_cache import model_digest

        mats = [t for s in self.sides if s.p_out is not None for t in (s.p_out, s.p_in)]
        return {"format": FORMAT, "dim": self.dim, "seed": self.seed, "size": self.size,
                "basis": self.basis, "bases": _digest(mats),
                "model": model_digest(self.engine.fm),
                "layers": [[s.block.offsets[0], s.size] for s in self.sides]}

    # ------------------------------------------------------------------ vectors (queries)
    def vectors(self, v: Tensor) -> Tensor:
        """(k, p) parameter-space vectors → (k, D) projected: P v."""
        k = v.shape[0]
        parts = []
        for s in self.sides:
            b = s.block
            if s.p_out is None:
                parts.append(torch.cat([v[:, o : o + n] for o, n in zip(b.offsets, b.numels,
                                                                         strict=True)], 1))
                continue
            out = s.p_out.shape[1]
            cols = [v[:, o : o + n].reshape(k, out, -1) for o, n in zip(b.offsets, b.numels,
                                                                         strict=True)]
            mat = torch.cat(cols, 2) if len(cols) > 1 else cols[0]  # (k, out, in')
            parts.append((s.p_out @ mat @ s.p_in.T).reshape(k, -1))
        return torch.cat(parts, 1)

    # ------------------------------------------------------------------ batches (training)
    def batch(self, inputs: Any, targets: Any, measure: str = "loss") -> Tensor:
        """(b, D) projected per-sample gradients of a batch (of its losses, or of the task's
        queries with ``measure="query"``), from one forward+backward: each Linear/Conv2d
        layer's inputs and output gradients are projected, never multiplied out."""
        captured = self.engine._capture(inputs, targets, measure)
        return self._project({m: a for m, (a, _) in captured.items()},
                             {m: g for m, (_, g) in captured.items()})

    def output_rows(self, inputs: Any, targets: Any, weights: Tensor) -> Tensor:
        """(b·C, D) projected rows √w_i (B_i J_i)_c of the weighted GGN Σ_i w_i J_iᵀ Λ_i J_i
        (B_iᵀB_i = Λ_i, the task's factor of the output Hessian): one forward and C backward
        passes of the batch."""
        fm = self.engine.fm
        output, acts, outs = self.engine.forward(lambda theta: fm.output(theta, inputs),
                                                 weights.shape[0])
        with torch.no_grad():
            factor = fm.task.output_hessian_factor(output.detach(), targets)
            factor = factor * weights.clamp_min(0).sqrt().to(factor)[:, None, None]
        rows = []
        for c in range(factor.shape[1]):
            grads = self.engine.backward(output, outs, factor[:, c, :],
                                         retain_graph=c < factor.shape[1] - 1)
            rows.append(self._project(acts, grads))
        return torch.cat(rows)

    def _project(self, acts: dict[nn.Module, Tensor], grads: dict[nn.Module, Tensor]) -> Tensor:
        parts = []
        for s in self.sides:
            m = s.block.module
            a, g = acts[m], grads[m]
            b = a.shape[0]
            if s.p_out is None:
                named = self.engine._named(s.block, a, g)
                parts.append(torch.cat([named.pop(n).reshape(b, -1) for n in s.block.names], 1))
                continue
            bias = "bias" in s.block.names
            if isinstance(m, nn.Linear):
                a3 = a.reshape(b, -1, m.in_features)
                pa = a3 @ s.p_in[:, : m.in_features].T  # (b, T, d_in)
                if bias:
                    pa = pa + s.p_in[:, -1]
                pg = g.reshape(b, -1, m.out_features) @ s.p_out.T  # (b, T, d_out)
                parts.append((pg.transpose(1, 2) @ pa).reshape(b, -1))
                continue
            pg = torch.einsum("do,bop->bdp", s.p_out, g.reshape(b, g.shape[1], -1))
            if conv_projection_route(m, s, pg.shape[-1]) == "inputs":
                filters = s.p_in[:, : m.weight[0].numel()].reshape(-1, *m.weight.shape[1:])
                pa = F.conv2d(a, filters, s.p_in[:, -1] if bias else None, m.stride, m.padding,
                              m.dilation)  # (b, d_in, H', W'): P_in times every input patch
                parts.append((pg @ pa.reshape(b, pa.shape[1], -1).transpose(1, 2)
                              ).reshape(b, -1))
                continue
            # output side first: the per-sample gradient of a d_out-channel convolution
            # (Σ_t (P_out g_t) ā_tᵀ, d_out × in'), then P_inᵀ on its right
            w = _conv_weight(m, a, pg)
            if bias:
                w = torch.cat([w, pg.sum(2, keepdim=True)], 2)
            parts.append((w @ s.p_in.T).reshape(b, -1))
        return torch.cat(parts, 1)

    def row_bytes(self) -> int:
        """Bytes one point adds beyond its backward pass: its projected row and the largest
        layer's projected inputs and output gradients (≤ the layer's activations)."""
        return (self.size + 2 * self.engine.workspace_numel) * self.engine.fm.theta.element_size()


class ProjectedCurvature:
    """(P(C + λI)Pᵀ)⁻¹ in the projected space: C = Σ_i w_i J_iᵀΛ_iJ_i + wd·I on a weighted
    subset, from its (r, D) projected rows R (:meth:`KroneckerProjection.output_rows`), so
    P C Pᵀ = RᵀR + wd·I (P has orthonormal rows) and the damped matrix is RᵀR + μI, μ = λ + wd.
    Factored once (Cholesky of the r×r or D×D side, whichever is smaller)."""

    def __init__(self, rows: Tensor, damping: float, weight_decay: float) -> None:
        mu = float(damping) + float(weight_decay)
        if not mu > 0:
            raise ValueError("scores='projected' needs damping + weight_decay > 0 (the projected "
                             "curvature of a subset is singular); e.g. damping=1e-3")
        self.rows, self.mu = rows, mu
        r, d = rows.shape
        self.woodbury = r < d
        small = rows @ rows.T if self.woodbury else rows.T @ rows
        small.diagonal().add_(mu)
        self.chol = torch.linalg.cholesky(small)

    def solve(self, v: Tensor) -> Tensor:
        """(k, D) → (k, D) rows of (RᵀR + μI)⁻¹ v."""
        if not self.woodbury:
            return torch.cholesky_solve(v.T, self.chol).T
        # (RᵀR + μI)⁻¹ = (I − Rᵀ(RRᵀ + μI)⁻¹R)/μ
        inner = torch.cholesky_solve(self.rows @ v.T, self.chol)  # (r, k)
        return (v - (self.rows.T @ inner).T) / self.mu


@dataclass(frozen=True)
class ProjectedGradients:
    """Projected training gradients (n, D) of training ``indices``, with what they depend on
    (``metadata``: projection dim, seed, model digest and layer layout)."""

    values: Tensor
    indices: Tensor
    metadata: dict[str, Any]

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (atomically), metadata and checksum included."""
        save_tensors_atomic(path, {"values": self.values, "indices": self.indices},
                            {**self.metadata, "environment": environment_metadata()})

    @classmethod
    def load(cls, path: str | Path) -> ProjectedGradients:
        """Read what :meth:`save` wrote; a damaged or foreign file is a CorruptFileError."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT or set(tensors) != {"values", "indices"}:
            raise CorruptFileError(f"{path}: not a repif projected-gradient file of format "
                                   f"{FORMAT}")
        meta.pop("environment", None)
        return cls(tensors["values"], tensors["indices"], meta)

    def check(self, projection: KroneckerProjection) -> None:
        """Refuse gradients projected for another model, seed, dimension or layout."""
        want = projection.describe()
        diff = sorted(k for k in want if self.metadata.get(k) != want[k])
        if diff:
            raise ValueError(
                f"these projected gradients do not match the estimator ({', '.join(diff)} "
                "differ): they were made for another model, seed, subset, basis or "
                "projection_dim; project "
                "the training points again with estimator.projected_gradients()"
            )
