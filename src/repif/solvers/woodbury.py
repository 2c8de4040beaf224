"""Exact GGN solve through the Woodbury identity, cheap when the subset is small.

With A (mC × p) the GGN factor (C_T = AᵀA) and μ = λ + wd:
(AᵀA + μI)⁻¹ g = (g − Aᵀ (AAᵀ + μI)⁻¹ A g) / μ. Cost O((mC)² p) time and O(mC·p) memory instead
of the dense solve's O(m C p²) and O(p²): this is the solver that makes small curvature subsets
pay off in time and memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repif.errors import TooLargeError
from repif.solvers.base import Solver

#: Largest inner system (m·C rows) accepted by default: 12,000² float64 is 1.2 GB.
WOODBURY_MAX_ROWS = 12_000


class WoodburySolver(Solver):
    name = "woodbury"

    def __init__(self, max_rows: int = WOODBURY_MAX_ROWS) -> None:
        self.max_rows = max_rows

    def _prepare(self) -> None:
        op = self.operator
        mu = self.damping + op.weight_decay
        if op.kind != "ggn":
            raise ValueError("solver 'woodbury' needs curvature='ggn'; use 'direct' or 'cg'")
        if mu <= 0:
            raise ValueError("solver 'woodbury' needs damping + weight_decay > 0; set damping")
        out_dim = op.fm.output(op.fm.theta, op.x[:1]).shape[-1]
        rows = op.n * out_dim
        if rows > self.max_rows:
            raise TooLargeError(
                f"solver 'woodbury' would form a {rows} × {rows} system ({op.n} subset points × "
                f"{out_dim} outputs, limit max_rows={self.max_rows}); use a smaller sample_size "
                "or solver='cg'"
            )
        # C + λI = D + A'ᵀA' with D = μ + ρ·diag(C_T) (a vector) and A' = √(1−ρ)·A, so
        # (D + A'ᵀA')⁻¹ g = D⁻¹g − D⁻¹A'ᵀ (I + A'D⁻¹A'ᵀ)⁻¹ A'D⁻¹g.
        self.factor = op.ggn_factor() * (1.0 - op.shrinkage) ** 0.5
        self.dinv = 1.0 / (mu + op.shrinkage * op.diagonal()) if op.shrinkage else None
        scaled = self.factor * self.dinv if self.dinv is not None else self.factor / mu
        inner = scaled @ self.factor.T
        inner.diagonal().add_(1.0)
        self._chol = torch.linalg.cholesky(inner)
        self.mu = mu

    def _dinv(self, v: Tensor) -> Tensor:
        return v * self.dinv if self.dinv is not None else v / self.mu

    def solve(self, g: Tensor) -> Tensor:
        dg = self._dinv(g)  # (k, p)
        inner = torch.cholesky_solve(self.factor @ dg.T, self._chol)  # (mC, k)
        return dg - self._dinv((self.factor.T @ inner).T)
