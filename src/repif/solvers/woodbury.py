"""Exact GGN solve through the Woodbury identity, cheap when the subset is small.

With A (mC × p) the GGN factor (C_T = AᵀA), shrinkage ρ and μ = λ + wd, the damped curvature is
D + A'ᵀA' with D = μ + ρ·diag(C_T) (a vector) and A' = √(1−ρ)·A. With S = A'D^{-1/2}:
(D + A'ᵀA')⁻¹ g = D^{-1/2} (h − Sᵀ (I + SSᵀ)⁻¹ S h), h = D^{-1/2} g. Cost O((mC)² p) time and
O(mC·p) memory instead of the dense solve's O(m C p²) and O(p²): this is the solver that makes
small curvature subsets pay off. Only S is kept (the factor is scaled in place: one copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from repif.errors import TooLargeError
from repif.solvers.base import Solver, positive_int

#: Largest inner system (m·C rows) accepted by default: 12,000² float64 is 1.2 GB.
WOODBURY_MAX_ROWS = 12_000

#: Column blocks used to sum the factor's squared columns without a second copy of it.
ROW_BLOCK = 1024


class WoodburySolver(Solver):
    name = "woodbury"
    curvatures = ("ggn",)  # the GGN's factor JᵀΛ^½; the Hessian has none

    def __init__(self, max_rows: int = WOODBURY_MAX_ROWS) -> None:
        self.max_rows = positive_int(max_rows, "max_rows")

    def predicted_bytes(self) -> int:
        """Memory the fit keeps: the (mC, p) factor and two (mC, mC) matrices."""
        op = self.operator
        rows = op.n * op.output_dim
        item = op.fm.theta.element_size()
        return op.factor_bytes() + 2 * rows * rows * item

    def _prepare(self) -> None:
        op = self.operator
        mu = self.damping + op.weight_decay
        if op.kind != "ggn":
            raise ValueError("solver 'woodbury' needs curvature='ggn'; use 'direct' or 'cg'")
        if mu <= 0:
            raise ValueError("solver 'woodbury' needs damping + weight_decay > 0; set damping")
        rows = op.n * op.output_dim
        if rows > self.max_rows:
            raise TooLargeError(
                f"solver 'woodbury' would form a {rows} × {rows} system ({op.n} subset points × "
                f"{op.output_dim} outputs, limit max_rows={self.max_rows}); use a smaller "
                "sample_size or solver='cg'"
            )
        op.budget.require(
            self.predicted_bytes(),
            f"solver 'woodbury' on {op.n} points × {op.output_dim} outputs × {op.size:,} "
            f"parameters (a {rows} × {op.size:,} factor)",
            "use solver='cg' or 'lissa' (memory independent of the subset size), a smaller "
            "sample_size, or raise max_memory",
        )
        s = op.ggn_factor()
        if op.shrinkage:
            diag = torch.zeros(op.size, dtype=s.dtype, device=s.device)
            for block in s.split(ROW_BLOCK):
                diag += block.pow(2).sum(0)
            op._diag = diag  # the operator's own diagonal, computed here for free
            self.d_isqrt = (mu + op.shrinkage * diag).rsqrt()
            s.mul_(self.d_isqrt * (1.0 - op.shrinkage) ** 0.5)
        else:
            self.d_isqrt = None
            s.mul_(mu ** -0.5)
        self.mu = mu
        inner = s @ s.T
        inner.diagonal().add_(1.0)
        self.factor = s
        self._chol = torch.linalg.cholesky(inner)
        del inner
        self.kept_bytes = s.numel() * s.element_size() + self._chol.numel() * s.element_size()

    def _d_isqrt(self, v: Tensor) -> Tensor:
        return v * self.d_isqrt if self.d_isqrt is not None else v * self.mu ** -0.5

    def _solve(self, g: Tensor) -> Tensor:
        h = self._d_isqrt(g)  # (k, p)
        inner = torch.cholesky_solve(self.factor @ h.T, self._chol)  # (mC, k)
        return self._d_isqrt(h - (self.factor.T @ inner).T)


    def quadratic(self, g: Tensor) -> Tensor:
        """gᵀ(D + A'ᵀA')⁻¹g = ‖h‖² − ‖L⁻¹ S h‖² with h = D^{-1/2} g and L the Cholesky factor
        of I + SSᵀ: one product with the factor instead of the solve's two."""
        h = self._d_isqrt(g)
        z = torch.linalg.solve_triangular(self._chol, self.factor @ h.T, upper=False)
        return h.pow(2).sum(1) - z.pow(2).sum(0)
