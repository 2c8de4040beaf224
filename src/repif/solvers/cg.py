"""Conjugate gradients on (C + λI) V = G, all right-hand sides advanced together."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from repif.errors import SolverDivergedError, TooLargeError
from repif.solvers.base import (
    RHS_BLOCK_SIZE,
    Solver,
    positive_int,
    singular_threshold,
    tolerance,
)
from repif.solvers.preconditioning import check_preconditioner, resolve_preconditioner

#: Rows from which CG's quadratic form (self-influence) factorises the subset GGN (Woodbury)
#: instead of running block CG: building the factor costs about m·C backward passes, a CG solve
#: of k rows about (iterations × ⌈k/block_size⌉) passes of jvp+vjp over the m points, so a
#: block of a few dozen rows at tens of iterations already costs more than the factor.
QUADRATIC_FACTOR_ROWS = 16


class CGSolver(Solver):
    """Stops a right-hand side g when ‖r‖ ≤ tol · ‖g‖, or every one after ``max_iter`` steps
    (with a RuntimeWarning naming how far they got).

    Each column of a block runs its own CG recursion (its own step sizes), so the result equals
    one-at-a-time CG; only the curvature products are batched (``block_size`` rows per pass).
    Needs C + λI positive definite: a search direction d with dᵀ(C + λI)d ≤ 0, or so small
    against the largest dᵀ(C + λI)d/‖d‖² seen that the system is singular to working precision,
    raises :class:`SolverDivergedError` (indefinite Hessian: use ``curvature="ggn"`` or more
    damping; singular GGN: more damping).

    ``preconditioner="ekfac"`` (or ``"kfac"``) runs standard preconditioned CG with
    M = (K + λI)⁻¹, K the Kronecker-factored curvature fitted on the same subset and weights
    (docs/design.md, "Kronecker factors"): the same exact solve, in fewer iterations; the
    stopping test stays ‖r‖ ≤ tol·‖g‖ on the true residual. ``monitor(iteration, x)``, if
    given, is called after every iteration with the block's current (k, p) solutions (for
    convergence studies; it must not modify them); returning True stops the block there.
    """

    name = "cg"

    def __init__(self, tol: float = 1e-8, max_iter: int = 1000,
                 block_size: int = RHS_BLOCK_SIZE, preconditioner: Any = None,
                 monitor: Callable[[int, Tensor], Any] | None = None) -> None:
        self.tol = tolerance(tol)
        self.max_iter = positive_int(max_iter, "max_iter")
        self.block_size = positive_int(block_size, "block_size")
        self.preconditioner = check_preconditioner(preconditioner)
        self.monitor = monitor
        self.iterations: list[int] = []

    def _prepare(self) -> None:
        self.precond = resolve_preconditioner(self.preconditioner, self.operator, self.damping)
        self._woodbury: Any = None

    def quadratic(self, g: Tensor) -> Tensor:
        """(k,) g_iᵀ(C + λI)⁻¹g_i. For the exact GGN and a block of at least
        :data:`QUADRATIC_FACTOR_ROWS` rows, through the subset's Woodbury factorisation (the
        same (C_T + λI)⁻¹, exactly, where CG reaches it to ``tol``), built once and kept, when
        it fits the memory budget and ``max_rows``: each later row then costs one product with
        the (mC × p) factor instead of a CG recursion of curvature passes. Otherwise the block
        CG solve."""
        if self._woodbury is None and g.shape[0] >= QUADRATIC_FACTOR_ROWS:
            self._woodbury = self._factorised()
        if self._woodbury:
            return self._woodbury.quadratic(g)
        return super().quadratic(g)

    def _factorised(self) -> Any:
        """A Woodbury solver on the same operator and damping, or False where it does not fit
        (not the GGN, too many rows, over the memory budget)."""
        from repif.solvers.woodbury import WoodburySolver

        op = self.operator
        if not getattr(op, "gauss_newton", False) or \
                self.damping + op.weight_decay <= 0:
            return False
        solver = WoodburySolver()
        solver.operator, solver.damping = op, self.damping
        try:
            if op.n * op.output_dim > solver.max_rows:
                return False
            op.budget.require(solver.predicted_bytes(), "", "")
            solver._prepare()
        except (TooLargeError, RuntimeError):  # RuntimeError: Cholesky failed (round-off)
            return False
        return solver

    def _precondition(self, r: Tensor) -> Tensor:
        """M r: r itself without a preconditioner."""
        return r if self.precond is None else self.precond.inverse(r, self.damping)

    def _apply(self, d: Tensor) -> Tensor:
        """(C + λI) D for (k, p) rows."""
        return self.operator.matmat(d) + self.damping * d

    def _breakdown(self, it: int, rq: float, rq_max: float) -> SolverDivergedError:
        if rq <= 0 and not self.operator.psd:
            return SolverDivergedError(
                f"CG met non-positive curvature dᵀ(C+λI)d/‖d‖² = {rq:.3e} at iteration {it} "
                f"with damping={self.damping:g}: the Hessian is indefinite; use "
                "curvature='ggn' (always positive semi-definite) or raise the damping above "
                "the most negative eigenvalue's magnitude"
            )
        # the GGN is PSD, so only a (numerically) singular C + λI gets here
        return SolverDivergedError(
            f"CG broke down at iteration {it}: C + λI is singular to working precision "
            f"(dᵀ(C+λI)d/‖d‖² = {rq:.3e}, largest seen {rq_max:.3e}, damping={self.damping:g}); "
            "raise the damping"
        )

    def _solve_block(self, g: Tensor) -> Tensor:
        x = torch.zeros_like(g)
        r = g.clone()
        z = self._precondition(r)
        d = z.clone()
        rz = (r * z).sum(1)  # rᵀMr; without a preconditioner ‖r‖²
        rr = (r * r).sum(1) if self.precond is not None else rz
        g_norm = rr.sqrt()
        iters = torch.full((g.shape[0],), self.max_iter, device=g.device)
        active = torch.nonzero(g_norm > 0).squeeze(1)
        iters[g_norm == 0] = 0
        tiny = singular_threshold(g.dtype)
        rq_max = torch.zeros((), dtype=g.dtype, device=g.device)
        for it in range(1, self.max_iter + 1):
            if active.numel() == 0:
                break
            da = d[active]
            ad = self._apply(da)
            curv = (da * ad).sum(1)
            rq = curv / (da * da).sum(1)  # Rayleigh quotients, in [λ_min, λ_max] of C + λI
            rq_max = torch.maximum(rq_max, rq.max())
            low = rq <= tiny * rq_max
            if bool(low.any()):  # one device sync per iteration, as before
                raise self._breakdown(it, float(rq[low].min()), float(rq_max))
            alpha = (rz[active] / curv)[:, None]
            x[active] += alpha * da
            r_a = r[active] - alpha * ad
            r[active] = r_a
            rr_new = (r_a * r_a).sum(1)
            if self.precond is None:
                z_a, rz_new = r_a, rr_new
            else:
                z_a = self._precondition(r_a)
                rz_new = (r_a * z_a).sum(1)
                rr[active] = rr_new
            d[active] = z_a + (rz_new / rz[active])[:, None] * da
            rz[active] = rz_new
            done = rr_new.sqrt() <= self.tol * g_norm[active]
            iters[active[done]] = it
            active = active[~done]
            if self.monitor is not None and self.monitor(it, x) is True:
                iters[active] = it
                active = active[:0]
        self.iterations.extend(iters.tolist())
        if active.numel():
            worst = float((rr[active].sqrt() / g_norm[active]).max())
            warnings.warn(
                f"CG stopped at max_iter={self.max_iter} for {active.numel()} of {g.shape[0]} "
                f"right-hand sides, worst relative residual {worst:.2e} > tol={self.tol}; raise "
                "max_iter or the damping",
                RuntimeWarning,
                stacklevel=4,
            )
        return x

    def _solve(self, g: Tensor) -> Tensor:
        return torch.cat([self._solve_block(g[s : s + self.block_size])
                          for s in range(0, g.shape[0], self.block_size)])
