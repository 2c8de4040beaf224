"""Curvature-vector products on a weighted subset of training points.

C = Σ_i w_i ∇²l(z_i) (``"hessian"``) or Σ_i w_i J_iᵀ Λ_i J_i (``"ggn"``, always PSD), plus
``weight_decay``·I when the model was trained with the L2 term (wd/2)‖θ‖². Damping is *not*
included here: solvers add λI themselves. The p × p matrix is formed only by :meth:`dense`.

``shrinkage`` ρ ∈ [0, 1] (GGN only) replaces C_T by (1 − ρ) C_T + ρ diag(C_T): a subset of m
points gives a GGN of rank ≤ m·(C − 1), and in the directions it misses the solve would see only
λ, so its inverse comes out far too long; the diagonal is full rank and fills them in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from repif import distributed
from repif.data import batch_len, take, to_device
from repif.memory import MemoryBudget
from repif.task import FunctionalModel, vmap_points

CURVATURES = ("ggn", "hessian")

#: Basis vectors pushed through one product when building a dense Hessian.
DENSE_BLOCK = 256

#: Copies of one point's (C, p) Jacobian alive while the GGN factor is built (jacrev's rows, the
#: B·J product and its reshaped output).
JACOBIAN_COPIES = 3

#: Saved tensors per activation element in a forward-over-reverse product (measured ≈ 4.4 on
#: the Fashion-MNIST CNN: forward values, tangents and the backward's saved inputs); rounded up.
PRODUCT_OVERHEAD = 6


#: Column blocks of the Gram matrix AᵀA: only blocks on or above the diagonal are multiplied,
#: so the product costs (k + 1)/(2k) of a full one (0.56 for k = 8); more blocks mean smaller,
#: less efficient matrix products.
GRAM_BLOCKS = 8
#: Narrower blocks than this make matrix products too small to run efficiently.
MIN_GRAM_BLOCK = 128


def gram(a: Tensor, out: Tensor | None = None, blocks: int = GRAM_BLOCKS) -> Tensor:
    """AᵀA for an (N, p) matrix, added into ``out`` (p, p) if given; each off-diagonal block
    is multiplied once and mirrored, so the result is exactly symmetric."""
    p = a.shape[1]
    if out is None:
        out = torch.zeros(p, p, dtype=a.dtype, device=a.device)
    width = max(-(-p // blocks), MIN_GRAM_BLOCK)
    for i in range(0, p, width):
        ai = a[:, i : i + width]
        for j in range(i, p, width):
            block = ai.T @ a[:, j : j + width]
            if j == i:  # a product's round-off is not symmetric
                block = 0.5 * (block + block.T)
            out[i : i + width, j : j + width] += block
            if j > i:
                out[j : j + width, i : i + width] += block.T
    return out


#: ``shrinkage="auto"``: ρ = SHRINK_SIZE / (SHRINK_SIZE + m). The subset's information grows
#: with m while the diagonal target's bias does not shrink, so ρ decays like 1/m; at m =
#: SHRINK_SIZE the two are weighted equally (value chosen on the digits benchmark, see README).
SHRINK_SIZE = 64


def resolve_shrinkage(shrinkage: float | str, m: int) -> float:
    """The shrinkage ρ for a subset of m points: a number is used as is; "auto" decays in m."""
    if shrinkage == "auto":
        return SHRINK_SIZE / (SHRINK_SIZE + m)
    if isinstance(shrinkage, str) or not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
    return float(shrinkage)


#: Curvature products run scaled-dot-product attention on its composite "math" kernel: the
#: fused CPU/GPU kernels (flash, memory-efficient) have neither forward-mode AD nor a second
#: derivative, which the GGN's J v and the Hessian's products need (Hugging Face models call
#: ``F.scaled_dot_product_attention`` by default). Same values, only slower attention.
_MATH_ATTENTION = SDPBackend.MATH


class CurvatureOperator:
    """The linear map v ↦ C v for a fixed model, subset and weights w (Σ w = 1).

    ``x`` holds the subset's model inputs (a tensor, or any structure of tensors with the points
    along dimension 0) and ``y`` its targets; both are kept whole (m points). ``weight_decay``
    defaults to the task's. ``budget`` sizes the vmapped product calls and the factor chunks.
    The operator caches nothing but the (p,) diagonal: a solver that wants the GGN factor
    builds it (:meth:`ggn_factor`) and owns it.
    """

    def __init__(
        self,
        fm: FunctionalModel,
        x: Any,
        y: Any,
        weights: Tensor,
        *,
        kind: str = "ggn",
        weight_decay: float | None = None,
        shrinkage: float = 0.0,
        budget: MemoryBudget | None = None,
    ) -> None:
        if kind not in CURVATURES:
            known = ", ".join(CURVATURES)
            raise ValueError(f"unknown curvature {kind!r}; known curvatures: {known}")
        if batch_len(y) == 0:
            raise ValueError("the curvature subset is empty; use a non-empty pool")
        self.fm = fm
        self.x = _to(x, fm)
        self.y = _to(y, fm)
        self.weights = weights.to(device=fm.device, dtype=fm.dtype)
        self.kind = kind
        wd = fm.task.weight_decay if weight_decay is None else weight_decay
        self.weight_decay = float(wd)
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        if shrinkage and kind != "ggn":
            raise ValueError("shrinkage needs curvature='ggn' (it uses the GGN's diagonal)")
        self.shrinkage = float(shrinkage)
        # A product with k vectors over b points keeps ≈ PRODUCT_OVERHEAD·k·b·(one point's
        # activations) alive, so b is chosen to fit the budget (default: a share of free memory)
        self.budget = budget or MemoryBudget.resolve(None, fm.device)
        self._diag: Tensor | None = None
        self._activation_numel: int | None = None  # one point's activations, measured once
        #: False once a product met an op without forward-mode AD: J v then comes from two
        #: reverse passes (the transpose of the pullback), which every differentiable op has.
        self._forward_ad = True

    @property
    def size(self) -> int:
        return self.fm.space.size

    @property
    def n(self) -> int:
        return batch_len(self.y)

    @property
    def output_dim(self) -> int:
        """Size of one point's model output (classes, for a classifier)."""
        with torch.no_grad():
            return int(self.fm.output(self.fm.theta, take(self.x, slice(0, 1))).shape[-1])

    def restrict(self, local: Tensor, weights: Tensor) -> CurvatureOperator:
        """The same curvature on rows ``local`` of this subset with new weights (e.g. a batch)."""
        sub = CurvatureOperator(
            self.fm, take(self.x, local), take(self.y, local), weights, kind=self.kind,
            weight_decay=self.weight_decay, shrinkage=self.shrinkage, budget=self.budget,
        )
        sub._activation_numel = self._activations()  # same model: measured once, not per batch
        sub._diag = self._diag if self.shrinkage else None
        return sub

    def _chunk_product(self, x: Any, y: Any, w: Tensor, v: Tensor) -> Tensor:
        theta = self.fm.theta
        if self.kind == "hessian":
            def weighted_loss(t: Tensor) -> Tensor:
                return (w * self.fm.losses(t, x, y)).sum()

            return jvp(grad(weighted_loss), (theta,), (v,))[1]

        def f(t: Tensor) -> Tensor:
            return self.fm.output(t, x)

        out, pullback = vjp(f, theta)
        if self._forward_ad:
            try:
                jv = jvp(f, (theta,), (v,))[1]
            except NotImplementedError:  # an op without forward AD (e.g. CPU flash attention)
                self._forward_ad = False
        if not self._forward_ad:
            # J v as the transpose of the (linear) pullback u ↦ Jᵀu: two reverse passes
            jv = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))[1](v)[0]
        u = self.fm.task.output_hessian_vector(out.detach(), y, jv) * w[:, None]
        return pullback(u)[0]

    def matvec(self, v: Tensor) -> Tensor:
        """C v for a (p,) vector."""
        return self.matmat(v[None])[0]

    def matmat(self, vs: Tensor) -> Tensor:
        """C V for (k, p) rows: one pass over the subset, the rows vmapped together."""
        out = self._pass(vs)
        if self.shrinkage:
            out = (1.0 - self.shrinkage) * out + self.shrinkage * self.diagonal() * vs
        return out + self.weight_decay * vs if self.weight_decay else out

    def _pass(self, vs: Tensor) -> Tensor:
        """Σ_i w_i (curvature of point i) V through the model, as many (point, row) pairs per
        vmapped call as the budget allows."""
        with sdpa_kernel(_MATH_ATTENTION):
            return self._pass_math(vs)

    def _pass_math(self, vs: Tensor) -> Tensor:
        k = vs.shape[0]
        step = self._points_per_call(k)
        batched = vmap(self._chunk_product, in_dims=(None, None, None, 0))
        out = torch.zeros_like(vs)
        lo, hi = distributed.local_range(self.n)  # this rank's points; (0, n) in one process
        for s in range(lo, hi, step):
            rows = slice(s, min(s + step, hi))
            x, y, w = take(self.x, rows), take(self.y, rows), self.weights[rows]
            if k == 1:
                out[0] += self._chunk_product(x, y, w, vs[0])
                continue
            try:
                out += batched(x, y, w, vs)
            except RuntimeError:  # an op without a batching rule: fall back to a loop
                out += torch.stack([self._chunk_product(x, y, w, v) for v in vs])
        return distributed.all_reduce_sum(out)  # the ranks' partial sums (no-op in one process)

    def _activations(self) -> int:
        if self._activation_numel is None:
            self._activation_numel = self.fm.activation_numel(self.x)
        return self._activation_numel

    def _pair_cost(self) -> int:
        """Bytes one (point, vector) pair keeps alive in a product."""
        return PRODUCT_OVERHEAD * self._activations() * self.fm.theta.element_size()

    def _points_per_call(self, k: int) -> int:
        """Points per vmapped call for k vectors, to stay within the budget."""
        return self.budget.rows(self._pair_cost() * k, limit=self.n)

    def factor_bytes(self) -> int:
        """Bytes of the (n·C, p) GGN factor (:meth:`ggn_factor`)."""
        return self.n * self.output_dim * self.size * self.fm.theta.element_size()

    def diagonal(self) -> Tensor:
        """(p,) diagonal of the subset GGN Σ w_i J_iᵀΛ_iJ_i (no weight decay, no shrinkage),
        summed chunk by chunk from the factor's rows without keeping them; cached."""
        if self._diag is None:
            diag = torch.zeros(self.size, dtype=self.fm.dtype, device=self.fm.device)
            for rows in self._factor_chunks():
                diag += rows.pow(2).sum(0)
            self._diag = distributed.all_reduce_sum(diag)
        return self._diag

    def ggn_factor(self) -> Tensor:
        """(n·C, p) matrix A with AᵀA = Σ_i w_i J_iᵀ Λ_i J_i (the GGN without weight decay).

        Rows i·C … i·C + C − 1 are √w_i B_i J_i, with B_i the task's factor of Λ_i. Built anew on
        each call into one preallocated matrix; the caller owns it. Over several processes each
        rank builds its points' rows and every rank receives the whole factor.
        """
        lo, hi = distributed.local_range(self.n)
        out = torch.empty(
            (hi - lo) * self.output_dim, self.size, dtype=self.fm.dtype, device=self.fm.device
        )
        s = 0
        for rows in self._factor_chunks():
            out[s : s + rows.shape[0]] = rows
            s += rows.shape[0]
        return distributed.all_gather_cat(out)  # rows in point order (no-op in one process)

    def _factor_chunks(self) -> Iterator[Tensor]:
        """The rows of :meth:`ggn_factor` for this rank's points (all of them in one process),
        as many points at a time as the budget allows."""
        if self.kind != "ggn":
            raise ValueError("ggn_factor needs curvature='ggn' (the Hessian has no such factor)")
        fm = self.fm

        def single(theta: Tensor, xi: Any) -> Tensor:
            return fm.output(theta, take(xi, None)).squeeze(0)  # t[None]: a batch of one

        jac = vmap_points(jacrev(single), (None, 0))
        per_point = JACOBIAN_COPIES * self.output_dim * self.size * fm.theta.element_size()
        step = self.budget.rows(per_point + self._pair_cost(), limit=self.n)
        lo, hi = distributed.local_range(self.n)
        for s in range(lo, hi, step):
            rows = slice(s, min(s + step, hi))
            x, y, w = take(self.x, rows), take(self.y, rows), self.weights[rows]
            with sdpa_kernel(_MATH_ATTENTION):  # jacrev batches the backward
                j = jac(fm.theta, x)  # (b, C, p)
            with torch.no_grad():
                b = fm.task.output_hessian_factor(fm.output(fm.theta, x), y)  # (b, C, C)
            yield (w.sqrt()[:, None, None] * (b @ j)).reshape(-1, self.size)

    def dense(self) -> Tensor:
        """The (p, p) matrix C, symmetric. The GGN is summed chunk by chunk (AᵀA without
        keeping A); the Hessian is formed from products with basis vectors and symmetrised to
        remove round-off asymmetry."""
        if self.kind == "ggn":
            m = torch.zeros(self.size, self.size, dtype=self.fm.dtype, device=self.fm.device)
            diag = torch.zeros(self.size, dtype=self.fm.dtype, device=self.fm.device)
            for rows in self._factor_chunks():
                gram(rows, out=m)
                diag += rows.pow(2).sum(0)
            m = distributed.all_reduce_sum(m)  # p² numbers per rank: the dense path's price
            self._diag = distributed.all_reduce_sum(diag)
            m.mul_(1.0 - self.shrinkage)
            m.diagonal().add_(self.weight_decay + self.shrinkage * self.diagonal())
            return m
        p = self.size
        eye = torch.eye(p, dtype=self.fm.dtype, device=self.fm.device)
        cols = [self.matmat(eye[s : s + DENSE_BLOCK]) for s in range(0, p, DENSE_BLOCK)]
        m = torch.cat(cols, dim=0)
        return 0.5 * (m + m.T)


def _to(batch: Any, fm: FunctionalModel) -> Any:
    """Move a batch's tensors to the model's device; floating ones to its dtype."""
    return to_device(batch, fm.device, fm.dtype)
