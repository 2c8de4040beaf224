"""Dense exact solve: forms C, adds λI and factorises it once (Cholesky, else LU)."""

from __future__ import annotations

import torch
from torch import Tensor

from repif.errors import SolverDivergedError, TooLargeError
from repif.solvers.base import Solver, positive_int, singular_threshold

#: Largest parameter count a dense solve accepts by default: a 20,000² float64 matrix is 3.2 GB,
#: about what a 24 GB, 2-core machine can factorise in a minute.
DIRECT_MAX_PARAMS = 20_000


class DirectSolver(Solver):
    name = "direct"

    def __init__(self, max_params: int = DIRECT_MAX_PARAMS) -> None:
        self.max_params = positive_int(max_params, "max_params")

    def _prepare(self) -> None:
        p = self.operator.size
        if p > self.max_params:
            raise TooLargeError(
                f"solver 'direct' would form a {p} × {p} matrix ({p:,} trainable parameters, "
                f"limit max_params={self.max_params:,}); use solver='cg' (or 'lissa', 'arnoldi'), "
                "or raise max_params if you have the memory"
            )
        item = self.operator.fm.theta.element_size()
        self.operator.budget.require(
            2 * p * p * item,
            f"solver 'direct' on {p:,} parameters (a {p:,} × {p:,} matrix and its factor)",
            "use solver='cg' or 'lissa', 'woodbury' for a small GGN subset, or raise max_memory",
        )
        a = self.operator.dense()
        a.diagonal().add_(self.damping)
        self._dtype = a.dtype
        if not bool(torch.isfinite(a).all()):
            raise SolverDivergedError(
                f"solver 'direct': the curvature matrix holds non-finite values; {self.fix()}")
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            self._chol, self._lu = chol, None
            pivots = chol.diagonal().square()
        else:  # indefinite (exact Hessian of a non-convex model): LU still solves it exactly
            del chol
            lu, piv, _ = torch.linalg.lu_factor_ex(a)
            self._chol, self._lu = None, (lu, piv)
            pivots = lu.diagonal().abs()
        # only the factorisation is kept: C + λI itself would double the solver's memory
        smallest, largest = float(pivots.min()), float(pivots.max())
        if not smallest > singular_threshold(a.dtype) * largest:
            raise SolverDivergedError(
                f"solver 'direct': C + λI is singular to working precision (smallest pivot "
                f"{smallest:.3e} against largest {largest:.3e}), so its solve would be "
                f"round-off; {self.fix()}"
            )

    def _solve(self, g: Tensor) -> Tensor:
        rhs = g.T.to(self._dtype)
        if self._chol is not None:
            x = torch.cholesky_solve(rhs, self._chol)
        else:
            x = torch.linalg.lu_solve(*self._lu, rhs)
        return x.T.to(g.dtype)
