"""Conjugate gradients on (C + λI) v = g, one right-hand side at a time."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from repif.errors import SolverDivergedError
from repif.solvers.base import Solver


class CGSolver(Solver):
    """Stops when ‖r‖ ≤ tol · ‖g‖ or after ``max_iter`` products.

    Needs C + λI positive definite: a direction with pᵀ(C + λI)p ≤ 0 raises
    :class:`SolverDivergedError` (use ``curvature="ggn"`` or more damping).
    """

    name = "cg"

    def __init__(self, tol: float = 1e-8, max_iter: int = 1000) -> None:
        self.tol = tol
        self.max_iter = max_iter
        self.iterations: list[int] = []

    def _apply(self, v: Tensor) -> Tensor:
        return self.operator.matvec(v) + self.damping * v

    def _solve_one(self, g: Tensor) -> Tensor:
        x = torch.zeros_like(g)
        r = g.clone()
        d = r.clone()
        rr = r @ r
        g_norm = torch.sqrt(rr)
        if float(g_norm) == 0.0:
            self.iterations.append(0)
            return x
        for it in range(1, self.max_iter + 1):
            ad = self._apply(d)
            curv = d @ ad
            if float(curv) <= 0.0:
                raise SolverDivergedError(
                    f"CG met non-positive curvature dᵀ(C+λI)d = {float(curv):.3e} at iteration "
                    f"{it} with damping={self.damping}; the curvature is indefinite — use "
                    "curvature='ggn' (always PSD) or raise the damping"
                )
            alpha = rr / curv
            x = x + alpha * d
            r = r - alpha * ad
            rr_new = r @ r
            if float(torch.sqrt(rr_new)) <= self.tol * float(g_norm):
                self.iterations.append(it)
                return x
            d = r + (rr_new / rr) * d
            rr = rr_new
        self.iterations.append(self.max_iter)
        warnings.warn(
            f"CG stopped at max_iter={self.max_iter} with relative residual "
            f"{float(torch.sqrt(rr_new)) / float(g_norm):.2e} > tol={self.tol}; raise max_iter "
            "or the damping",
            RuntimeWarning,
            stacklevel=3,
        )
        return x

    def solve(self, g: Tensor) -> Tensor:
        return torch.stack([self._solve_one(row) for row in g])
