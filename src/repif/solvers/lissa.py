"""LiSSA: a truncated Neumann series for (C + λI)⁻¹ g with stochastic curvature batches."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from repif.errors import SolverDivergedError
from repif.solvers.base import RHS_BLOCK_SIZE, Solver, positive_int, positive_number, tolerance
from repif.solvers.preconditioning import check_preconditioner, resolve_preconditioner
from repif.solvers.spectral import top_eigenvalue

#: scale = margin × (λ_max(C) + λ). The Neumann series needs scale above every eigenvalue of
#: C + λI; power iteration underestimates λ_max slightly and a mini-batch's curvature can exceed
#: the subset's, so we leave 25% headroom.
AUTO_SCALE_MARGIN = 1.25

#: While the series converges, every factor I − (C_B + λI)/scale has eigenvalues in [−1, 1],
#: so the j-th iterate v_j = Σ_{i≤j} (…)ⁱ g has norm ≤ (j + 1)‖g‖, and with λ > 0 also
#: ≤ (scale/λ)‖g‖ (the limit's bound). An iterate this many times past that bound can only be
#: divergence (scale below an eigenvalue, or an indefinite curvature), whatever the damping; the
#: margin covers mini-batches whose curvature exceeds the subset's.
DIVERGENCE_FACTOR = 10.0


class LissaSolver(Solver):
    """v_{j+1} = g + (I − (C_B + λI)/scale) v_j, estimate v_depth / scale, averaged over repeats.

    ``batch_size=None`` uses the whole (weighted) subset each step, which is deterministic;
    otherwise each step draws ``batch_size`` subset points with probability ∝ their weights
    (an unbiased estimate of C). Stops a row early when ‖v_{j+1} − v_j‖ ≤ tol·‖v_{j+1}‖, and warns
    (RuntimeWarning) when rows reach ``depth`` first (``tol=0``: run to depth, no warning).
    Up to ``block_size`` right-hand sides run together on the same batches (batched products).
    An iterate growing past its bound (see DIVERGENCE_FACTOR) raises
    :class:`SolverDivergedError` naming the scale or curvature to use.

    ``preconditioner="ekfac"`` (or ``"kfac"``): a preconditioned Neumann series. With
    P = (K + λI)⁻¹ from the Kronecker-factored curvature K fitted on the same subset and weights,
    the series runs on the symmetric system P^½(C + λI)P^½ y = P^½ g, whose eigenvalues sit near
    1, and returns v = P^½ y — in the original coordinates v_{j+1} = P g + (I − P(C_B + λI)/s) v_j.
    ``scale="auto"`` is then 1.25 × its top eigenvalue (power iteration); ``depth`` and ``tol``
    count and test the preconditioned iterates. ``monitor(step, v)``, if given, is called after
    every step with the block's current (k, p) estimates of the solution (per repeat; it must
    not modify them); returning True stops the block there.
    """

    name = "lissa"

    def __init__(
        self,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int | None = None,
        scale: float | str = "auto",
        tol: float = 1e-7,
        power_iters: int = 30,
        seed: int = 0,
        block_size: int = RHS_BLOCK_SIZE,
        preconditioner: Any = None,
        monitor: Callable[[int, Tensor], Any] | None = None,
    ) -> None:
        self.depth = positive_int(depth, "depth")
        self.repeats = positive_int(repeats, "repeats")
        self.block_size = positive_int(block_size, "block_size")
        self.batch_size = None if batch_size is None else positive_int(batch_size, "batch_size")
        if scale != "auto":
            if isinstance(scale, str):
                raise ValueError(f"scale must be 'auto' or a positive number, got {scale!r}")
            scale = positive_number(scale, "scale")
        self.scale_option, self.tol = scale, tolerance(tol)
        self.power_iters, self.seed = positive_int(power_iters, "power_iters"), seed
        self.preconditioner = check_preconditioner(preconditioner)
        self.monitor = monitor
        self.steps_taken: list[int] = []

    def _prepare(self) -> None:
        self.precond = resolve_preconditioner(self.preconditioner, self.operator, self.damping)
        if self.scale_option == "auto":
            target = self.operator if self.precond is None else _Preconditioned(self)
            lam_max = top_eigenvalue(target, iters=self.power_iters, seed=self.seed)
            if not math.isfinite(lam_max):
                raise SolverDivergedError(
                    f"LiSSA's power iteration gave λ_max = {lam_max}; the curvature products "
                    f"are not finite; {self.fix()}"
                )
            # the preconditioned system's eigenvalues already include the damping
            shift = self.damping if self.precond is None else 0.0
            self.scale = AUTO_SCALE_MARGIN * (lam_max + shift)
        else:
            self.scale = float(self.scale_option)
        if self.scale <= 0:
            raise ValueError("LiSSA scale came out 0 (no curvature, no damping); set damping > 0")

    def _root(self, v: Tensor) -> Tensor:
        """P^½ v (the preconditioner's symmetric square root)."""
        return self.precond.inverse_sqrt(v, self.damping)

    def _apply(self, op, v: Tensor) -> Tensor:
        """(C_B + λI) V, or P^½(C_B + λI)P^½ V with a preconditioner, for (k, p) rows."""
        if self.precond is None:
            return op.matmat(v) + self.damping * v
        w = self._root(v)
        return self._root(op.matmat(w) + self.damping * w)

    def _batch_operator(self, gen: torch.Generator):
        op = self.operator
        if self.batch_size is None or self.batch_size >= op.n:
            return op
        local = torch.multinomial(op.weights.double().cpu(), self.batch_size, True, generator=gen)
        w = torch.full((self.batch_size,), 1.0 / self.batch_size)
        return op.restrict(local.to(op.weights.device), w)

    def _diverged(self, j: int, norm: float, g_norm: float) -> SolverDivergedError:
        if not self.operator.psd:
            fix = (f"raise scale (e.g. scale={2 * self.scale:.4g}); if that does not help the "
                   "Hessian is indefinite: use curvature='ggn' (always positive semi-definite) "
                   "or raise the damping")
        else:
            fix = f"raise scale (e.g. scale={2 * self.scale:.4g}) or the damping"
        return SolverDivergedError(
            f"LiSSA diverged at step {j} (iterate norm {norm:.3e}, right-hand side {g_norm:.3e}) "
            f"with scale={self.scale:.4g} and damping={self.damping:g}; {fix}"
        )

    def _solve_block(self, g: Tensor, gen: torch.Generator) -> tuple[Tensor, int, float]:
        """One Neumann recursion per row of g (k, p); every row sees the same batches, so the
        batch's curvature is pushed through all still-running rows at once. Returns the
        estimates, the number of rows that reached depth before tol and their largest last
        relative step."""
        g_norm = g.norm(dim=1)
        limit = self.scale / self.damping if self.damping else math.inf
        if self.precond is not None and self.damping:
            # P^½(C + λI)P^½ ≥ λP ≥ λ / (largest eigenvalue of K + λI)
            limit = self.scale * self.precond.spectrum(self.damping)[1] / self.damping
        v = g.clone()
        steps = torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
        active = torch.nonzero(g_norm > 0).squeeze(1)
        v[g_norm == 0] = 0.0
        last_step = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        for j in range(1, self.depth + 1):
            if active.numel() == 0:
                break
            op = self._batch_operator(gen)
            va = v[active]
            v_new = g[active] + va - self._apply(op, va) / self.scale
            norm = v_new.norm(dim=1)
            bound = DIVERGENCE_FACTOR * min(j + 1, limit) * g_norm[active]
            bad = ~(norm <= bound)  # NaN fails too
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise self._diverged(j, float(norm[i]), float(g_norm[active][i]))
            change = (v_new - va).norm(dim=1)
            v[active] = v_new
            steps[active] = j
            last_step[active] = change / norm.clamp_min(torch.finfo(g.dtype).tiny)
            active = active[change > self.tol * norm]
            if self.monitor is not None:
                estimate = v / self.scale
                if self.precond is not None:
                    estimate = self._root(estimate)
                if self.monitor(j, estimate) is True:
                    active = active[:0]
        self.steps_taken.extend(steps[g_norm > 0].tolist())
        unfinished = active.numel() if self.tol > 0 else 0
        worst = float(last_step[active].max()) if unfinished else 0.0
        return v / self.scale, unfinished, worst

    def _solve(self, g: Tensor) -> Tensor:
        if self.precond is not None:  # solve P^½(C + λI)P^½ y = P^½ g, then v = P^½ y
            return self._root(self._solve_rows(self._root(g)))
        return self._solve_rows(g)

    def _solve_rows(self, g: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        out = torch.zeros_like(g)
        unfinished, worst = 0, 0.0
        for _ in range(self.repeats):
            for s in range(0, g.shape[0], self.block_size):
                v, n, w = self._solve_block(g[s : s + self.block_size], gen)
                out[s : s + self.block_size] += v
                unfinished, worst = unfinished + n, max(worst, w)
        if unfinished:
            runs = g.shape[0] * self.repeats
            warnings.warn(
                f"LiSSA stopped at depth={self.depth} before reaching tol={self.tol:g} for "
                f"{unfinished} of {runs} right-hand-side runs (largest last relative step "
                f"{worst:.2e}); raise depth, or pass tol=0 to run to depth on purpose",
                RuntimeWarning,
                stacklevel=4,
            )
        return out / self.repeats


class _Preconditioned:
    """v ↦ P^½(C + λI)P^½ v for power iteration (the operator's size and model)."""

    def __init__(self, solver: LissaSolver) -> None:
        self.solver = solver
        self.size, self.fm = solver.operator.size, solver.operator.fm

    def matvec(self, v: Tensor) -> Tensor:
        return self.solver._apply(self.solver.operator, v[None])[0]
