"""Inverse of a Kronecker-factored curvature (K-FAC / EK-FAC) in its eigenbasis.

Per layer, (C + λI)⁻¹ g = (Q_G ⊗ Q_A) (Λ + wd + λ)⁻¹ (Q_G ⊗ Q_A)ᵀ g: two small matrix products
on each side of the layer's (out, d) block, no iteration and no pass over the data
(docs/design.md, "Kronecker factors"). Fitted on ``curvature="kfac"`` or ``"ekfac"``.
"""

from __future__ import annotations

from torch import Tensor

from repif.curvature.kfac import KroneckerCurvature
from repif.errors import SolverDivergedError
from repif.solvers.base import Solver, singular_threshold


class EigenSolver(Solver):
    name = "eigen"
    curvatures = ("kfac", "ekfac")

    def _prepare(self) -> None:
        op = self.operator
        if not isinstance(op, KroneckerCurvature):
            raise ValueError(
                f"solver 'eigen' inverts a Kronecker-factored curvature, not "
                f"curvature={getattr(op, 'kind', None)!r}: use curvature='kfac' or 'ekfac', or "
                "for the exact subset GGN solver='cg' with preconditioner='ekfac'"
            )
        low, high = op.spectrum(self.damping)
        dtype = op.fm.dtype
        if not low > singular_threshold(dtype) * max(high, 0.0) or not high > 0:
            raise SolverDivergedError(
                f"solver 'eigen': an eigenvalue of C + λI is zero to working precision "
                f"(smallest {low:.3e} against largest {high:.3e}); {self.fix()}: the "
                "factors stay fitted, so estimator.set_damping(λ) with λ ≳ "
                f"{max(high, 0.0) * singular_threshold(dtype) * 1e3:.1e} re-solves without "
                "refitting"
            )

    def _solve(self, g: Tensor) -> Tensor:
        return self.operator.inverse(g, self.damping)

    def quadratic(self, g: Tensor) -> Tensor:
        """Σ over layers of the rotated block squared over (Λ + wd + λ): one rotation per side
        instead of the solve's two."""
        return self.operator.quadratic(g, self.damping)
