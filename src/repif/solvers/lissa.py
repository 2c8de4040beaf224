"""LiSSA: a truncated Neumann series for (C + λI)⁻¹ g with stochastic curvature batches."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from repif.errors import SolverDivergedError
from repif.solvers.base import Solver
from repif.solvers.spectral import top_eigenvalue

#: scale = margin × (λ_max(C) + λ). The Neumann series needs scale above every eigenvalue of
#: C + λI; power iteration underestimates λ_max slightly and a mini-batch's curvature can exceed
#: the subset's, so we leave 25% headroom.
AUTO_SCALE_MARGIN = 1.25

#: The iterate converges to scale · (C+λI)⁻¹ g, whose norm is at most scale/λ · ‖g‖; an iterate
#: this many times larger than that bound can only be divergence.
DIVERGENCE_FACTOR = 10.0


class LissaSolver(Solver):
    """v_{j+1} = g + (I − (C_B + λI)/scale) v_j, estimate v_depth / scale, averaged over repeats.

    ``batch_size=None`` uses the whole (weighted) subset each step, which is deterministic;
    otherwise each step draws ``batch_size`` subset points with probability ∝ their weights
    (an unbiased estimate of C). Stops early when ‖v_{j+1} − v_j‖ ≤ tol·‖v_{j+1}‖.
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
    ) -> None:
        if depth <= 0 or repeats <= 0:
            raise ValueError(f"depth and repeats must be positive, got {depth}, {repeats}")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")
        if scale != "auto" and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be 'auto' or a positive number, got {scale!r}")
        self.depth, self.repeats, self.batch_size = depth, repeats, batch_size
        self.scale_option, self.tol, self.power_iters, self.seed = scale, tol, power_iters, seed
        self.steps_taken: list[int] = []

    def _prepare(self) -> None:
        if self.scale_option == "auto":
            lam_max = top_eigenvalue(self.operator, iters=self.power_iters, seed=self.seed)
            self.scale = AUTO_SCALE_MARGIN * (lam_max + self.damping)
        else:
            self.scale = float(self.scale_option)
        if self.scale <= 0:
            raise ValueError("LiSSA scale came out 0 (no curvature, no damping); set damping > 0")

    def _batch_operator(self, gen: torch.Generator):
        op = self.operator
        if self.batch_size is None or self.batch_size >= op.n:
            return op
        local = torch.multinomial(op.weights.double().cpu(), self.batch_size, True, generator=gen)
        w = torch.full((self.batch_size,), 1.0 / self.batch_size)
        return op.restrict(local.to(op.x.device), w)

    def _diverged(self, j: int, norm: float, g_norm: float) -> SolverDivergedError:
        return SolverDivergedError(
            f"LiSSA diverged at step {j} (iterate norm {norm:.3e}, right-hand side {g_norm:.3e}) "
            f"with scale={self.scale:.4g} and damping={self.damping}; raise scale (e.g. "
            f"scale={2 * self.scale:.4g}) or the damping"
        )

    def _solve_one(self, g: Tensor, gen: torch.Generator) -> Tensor:
        g_norm = float(g.norm())
        if g_norm == 0.0:
            return torch.zeros_like(g)
        bound = DIVERGENCE_FACTOR * g_norm * self.scale / self.damping if self.damping else math.inf
        v = g.clone()
        for j in range(1, self.depth + 1):
            av = self._batch_operator(gen).matvec(v) + self.damping * v
            v_new = g + v - av / self.scale
            norm = float(v_new.norm())
            if not math.isfinite(norm) or norm > bound:
                raise self._diverged(j, norm, g_norm)
            change = float((v_new - v).norm())
            v = v_new
            if change <= self.tol * norm:
                break
        self.steps_taken.append(j)
        return v / self.scale

    def solve(self, g: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        out = torch.zeros_like(g)
        for _ in range(self.repeats):
            out += torch.stack([self._solve_one(row, gen) for row in g])
        return out / self.repeats
