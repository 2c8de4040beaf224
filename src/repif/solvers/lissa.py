"""LiSSA: a truncated Neumann series for (C + λI)⁻¹ g with stochastic curvature batches."""

from __future__ import annotations

import torch
from torch import Tensor

from repif.errors import SolverDivergedError
from repif.solvers.base import RHS_BLOCK_SIZE, Solver
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
    (an unbiased estimate of C). Stops a row early when ‖v_{j+1} − v_j‖ ≤ tol·‖v_{j+1}‖.
    Up to ``block_size`` right-hand sides run together on the same batches (batched products).
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
    ) -> None:
        if depth <= 0 or repeats <= 0:
            raise ValueError(f"depth and repeats must be positive, got {depth}, {repeats}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")
        if scale != "auto" and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be 'auto' or a positive number, got {scale!r}")
        self.depth, self.repeats, self.batch_size = depth, repeats, batch_size
        self.scale_option, self.tol, self.power_iters, self.seed = scale, tol, power_iters, seed
        self.block_size = block_size
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
        return op.restrict(local.to(op.weights.device), w)

    def _diverged(self, j: int, norm: float, g_norm: float) -> SolverDivergedError:
        return SolverDivergedError(
            f"LiSSA diverged at step {j} (iterate norm {norm:.3e}, right-hand side {g_norm:.3e}) "
            f"with scale={self.scale:.4g} and damping={self.damping}; raise scale (e.g. "
            f"scale={2 * self.scale:.4g}) or the damping"
        )

    def _solve_block(self, g: Tensor, gen: torch.Generator) -> Tensor:
        """One Neumann recursion per row of g (k, p); every row sees the same batches, so the
        batch's curvature is pushed through all still-running rows at once."""
        g_norm = g.norm(dim=1)
        bound = DIVERGENCE_FACTOR * g_norm * self.scale / self.damping if self.damping else None
        v = g.clone()
        steps = torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
        active = torch.nonzero(g_norm > 0).squeeze(1)
        v[g_norm == 0] = 0.0
        for j in range(1, self.depth + 1):
            if active.numel() == 0:
                break
            op = self._batch_operator(gen)
            va = v[active]
            av = op.matmat(va)
            v_new = g[active] + va - (av + self.damping * va) / self.scale
            norm = v_new.norm(dim=1)
            bad = ~torch.isfinite(norm) if bound is None else ~(norm <= bound[active])
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise self._diverged(j, float(norm[i]), float(g_norm[active][i]))
            change = (v_new - va).norm(dim=1)
            v[active] = v_new
            steps[active] = j
            active = active[change > self.tol * norm]
        self.steps_taken.extend(steps[g_norm > 0].tolist())
        return v / self.scale

    def solve(self, g: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        out = torch.zeros_like(g)
        for _ in range(self.repeats):
            out += torch.cat([self._solve_block(g[s : s + self.block_size], gen)
                              for s in range(0, g.shape[0], self.block_size)])
        return out / self.repeats
