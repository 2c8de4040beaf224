"""Low-rank inverse from the top eigenpairs of C (Lanczos, the symmetric case of Arnoldi).

v = U diag(1/(μ + λ)) Uᵀ g over the top ``rank`` eigenpairs; the part of g outside that
subspace is dropped (as in Schioppa et al., 2022), so the solve is exact only when C has at most
``rank`` significant directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repif.errors import SolverDivergedError
from repif.solvers.base import Solver, positive_int, singular_threshold
from repif.solvers.spectral import lanczos


class ArnoldiSolver(Solver):
    name = "arnoldi"

    def __init__(self, rank: int = 50, krylov_dim: int | None = None, seed: int = 0) -> None:
        self.rank = positive_int(rank, "rank")
        # extra steps so that the top Ritz pairs settle
        self.krylov_dim = (2 * rank + 20 if krylov_dim is None
                           else positive_int(krylov_dim, "krylov_dim"))
        self.seed = seed

    def _prepare(self) -> None:
        vals, vecs = lanczos(self.operator, self.krylov_dim, seed=self.seed)
        self.eigenvalues = vals[: self.rank]
        self.eigenvectors = vecs[: self.rank]  # (rank, p)
        shifted = (self.eigenvalues + self.damping).abs()
        if not bool(torch.isfinite(shifted).all()):
            raise SolverDivergedError(
                f"solver 'arnoldi': the Lanczos eigenvalues are not finite; {self.fix()}")
        if shifted.numel() and not float(shifted.min()) > singular_threshold(
            shifted.dtype
        ) * float(shifted.max()):
            raise SolverDivergedError(
                f"solver 'arnoldi': an eigenvalue of C + λI is zero to working precision "
                f"(|μ + λ| = {float(shifted.min()):.3e} against {float(shifted.max()):.3e}), so "
                f"dividing by it would explode; {self.fix()}"
            )

    def _solve(self, g: Tensor) -> Tensor:
        coeff = (g @ self.eigenvectors.T) / (self.eigenvalues + self.damping)
        return coeff @ self.eigenvectors
