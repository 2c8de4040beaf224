"""No curvature: v = g (a TracIn-like gradient dot-product baseline)."""

from __future__ import annotations

from torch import Tensor

from repif.solvers.base import Solver


class IdentitySolver(Solver):
    name = "identity"
    uses_curvature = False

    def _solve(self, g: Tensor) -> Tensor:
        return g.clone()
