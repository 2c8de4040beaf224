"""Low-rank inverse from the top eigenpairs of C (Lanczos, the symmetric case of Arnoldi).

v = U diag(1/(μ + λ)) Uᵀ g over the top ``rank`` eigenpairs; the part of g outside that
subspace is dropped (as in Schioppa et al., 2022), so the solve is exact only when C has at most
``rank`` significant directions.
"""

from __future__ import annotations

from torch import Tensor

from repif.solvers.base import Solver
from repif.solvers.spectral import lanczos


class ArnoldiSolver(Solver):
    name = "arnoldi"

    def __init__(self, rank: int = 50, krylov_dim: int | None = None, seed: int = 0) -> None:
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.rank = rank
        self.krylov_dim = krylov_dim or 2 * rank + 20  # extra steps so the top Ritz pairs settle
        self.seed = seed

    def _prepare(self) -> None:
        vals, vecs = lanczos(self.operator, self.krylov_dim, seed=self.seed)
        self.eigenvalues = vals[: self.rank]
        self.eigenvectors = vecs[: self.rank]  # (rank, p)

    def solve(self, g: Tensor) -> Tensor:
        coeff = (g @ self.eigenvectors.T) / (self.eigenvalues + self.damping)
        return coeff @ self.eigenvectors
