"""Curvature-vector products on a weighted subset of training points.

C = Σ_i w_i ∇²l(z_i) (``"hessian"``) or Σ_i w_i J_iᵀ Λ_i J_i (``"ggn"``, always PSD), plus
``weight_decay``·I when the model was trained with the L2 term (wd/2)‖θ‖². Damping is *not*
included here: solvers add λI themselves. The p × p matrix is formed only by :meth:`dense`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from repif.task import FunctionalModel

CURVATURES = ("ggn", "hessian")

#: Basis vectors pushed through one vmapped product when building a dense matrix.
DENSE_BLOCK = 256


class CurvatureOperator:
    """The linear map v ↦ C v for a fixed model, subset (x, y) and weights w (Σ w = 1)."""

    def __init__(
        self,
        fm: FunctionalModel,
        x: Tensor,
        y: Tensor,
        weights: Tensor,
        *,
        kind: str = "ggn",
        weight_decay: float = 0.0,
        chunk_size: int = 512,
    ) -> None:
        if kind not in CURVATURES:
            known = ", ".join(CURVATURES)
            raise ValueError(f"unknown curvature {kind!r}; known curvatures: {known}")
        if x.shape[0] == 0:
            raise ValueError("the curvature subset is empty; use a non-empty pool")
        self.fm = fm
        self.x = x.to(fm.device)
        self.y = y.to(fm.device)
        self.weights = weights.to(device=fm.device, dtype=fm.dtype)
        self.kind = kind
        self.weight_decay = float(weight_decay)
        self.chunk_size = chunk_size
        self.num_products = 0  # how many products this operator has computed (for benchmarks)

    @property
    def size(self) -> int:
        return self.fm.space.size

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def restrict(self, local: Tensor, weights: Tensor) -> CurvatureOperator:
        """The same curvature on rows ``local`` of this subset with new weights (e.g. a batch)."""
        return CurvatureOperator(
            self.fm, self.x[local], self.y[local], weights,
            kind=self.kind, weight_decay=self.weight_decay, chunk_size=self.chunk_size,
        )

    def _chunk_product(self, x: Tensor, y: Tensor, w: Tensor, v: Tensor) -> Tensor:
        theta = self.fm.theta
        if self.kind == "hessian":
            def weighted_loss(t: Tensor) -> Tensor:
                return (w * self.fm.losses(t, x, y)).sum()

            return jvp(grad(weighted_loss), (theta,), (v,))[1]

        def f(t: Tensor) -> Tensor:
            return self.fm.output(t, x)

        out, jv = jvp(f, (theta,), (v,))
        u = self.fm.task.output_hessian_vector(out.detach(), y, jv) * w[:, None]
        _, pullback = vjp(f, theta)
        return pullback(u)[0]

    def matvec(self, v: Tensor) -> Tensor:
        """C v for a (p,) vector."""
        self.num_products += 1
        out = self.weight_decay * v if self.weight_decay else torch.zeros_like(v)
        for s in range(0, self.n, self.chunk_size):
            e = s + self.chunk_size
            out = out + self._chunk_product(self.x[s:e], self.y[s:e], self.weights[s:e], v)
        return out

    def matmat(self, vs: Tensor) -> Tensor:
        """C V for (k, p) rows, vmapped over the rows."""
        try:
            return vmap(self.matvec)(vs)
        except RuntimeError:  # an op without a batching rule: fall back to a loop
            return torch.stack([self.matvec(v) for v in vs])

    def ggn_factor(self) -> Tensor:
        """(n·C, p) matrix A with AᵀA = Σ_i w_i J_iᵀ Λ_i J_i (the GGN without weight decay).

        Rows i·C … i·C + C − 1 are √w_i B_i J_i, with B_i the task's factor of Λ_i.
        """
        if self.kind != "ggn":
            raise ValueError("ggn_factor needs curvature='ggn' (the Hessian has no such factor)")
        fm = self.fm

        def single(theta: Tensor, xi: Tensor) -> Tensor:
            return fm.output(theta, xi.unsqueeze(0)).squeeze(0)

        jac = vmap(jacrev(single), in_dims=(None, 0))
        rows = []
        for s in range(0, self.n, self.chunk_size):
            x, y = self.x[s : s + self.chunk_size], self.y[s : s + self.chunk_size]
            w = self.weights[s : s + self.chunk_size]
            j = jac(fm.theta, x)  # (b, C, p)
            with torch.no_grad():
                b = fm.task.output_hessian_factor(fm.output(fm.theta, x), y)  # (b, C, C)
            rows.append((w.sqrt()[:, None, None] * (b @ j)).reshape(-1, self.size))
        return torch.cat(rows)

    def dense(self) -> Tensor:
        """The (p, p) matrix C, symmetrised to remove round-off asymmetry."""
        if self.kind == "ggn":
            a = self.ggn_factor()
            m = a.T @ a
            m.diagonal().add_(self.weight_decay)
            return 0.5 * (m + m.T)
        p = self.size
        eye = torch.eye(p, dtype=self.fm.dtype, device=self.fm.device)
        cols = [self.matmat(eye[s : s + DENSE_BLOCK]) for s in range(0, p, DENSE_BLOCK)]
        m = torch.cat(cols, dim=0)
        return 0.5 * (m + m.T)
