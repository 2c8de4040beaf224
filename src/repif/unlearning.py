"""Removing training points with influence (Newton) steps.

With S the removed points, R the rest, the first step is θ₁ = θ̂ + η (C_R + λI)⁻¹ g, where
g = (1/|R|) Σ_{z∈S} ∇l(z; θ̂) + wd·θ̂·|S|/|R|. At a minimum θ̂ of the full objective this g equals
−∇L_R(θ̂), the negative gradient of the remaining-data objective
L_R = (1/|R|) Σ_R l + (wd/2)‖θ‖², so with η = 1 the step is one Newton step on L_R (the classic
influence-function removal). Each later step (``steps`` > 1) re-linearises: it refits the
curvature on the same subset at the new parameters and takes θ_{k+1} = θ_k − η (C_R + λI)⁻¹
∇L_R(θ_k), computing ∇L_R on all of R (one ordinary pass).

η (``scale``) > 1 compensates for the curvature over-estimating how stiff a deep, non-convex
model is around θ̂; for a convex model trained to convergence use η = 1.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from repif.gradients import mean_gradient
from repif.task import FunctionalModel
from repif.validation import check_indices

if TYPE_CHECKING:
    from repif.estimator import InfluenceEstimator


def remaining_indices(n: int, removed: Tensor) -> Tensor:
    """Indices in [0, n) not in ``removed``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed.cpu()] = False
    return torch.nonzero(keep).flatten()


def removal_gradient(est: InfluenceEstimator, removed: Tensor) -> Tensor:
    """(p,) g = (1/|R|) Σ_{z∈S} ∇l(z; θ̂) + wd·θ̂·|S|/|R| (= −∇L_R(θ̂) at a minimum θ̂)."""
    removed = torch.unique(check_indices(removed, est.n_train, "removed indices"))
    n_s = removed.numel()
    n_r = est.n_train - n_s
    if n_r == 0:
        raise ValueError("cannot remove every training point: nothing would remain to fit")
    dev = est.x.device
    g = mean_gradient(est.fm, est.x[removed.to(dev)], est.y[removed.to(dev)])
    return (g + est.weight_decay * est.fm.theta) * (n_s / n_r)


def newton_removal(
    est: InfluenceEstimator, indices: Tensor, *, scale: float = 1.0, steps: int = 1
) -> nn.Module:
    """A copy of ``est``'s model with ``indices`` removed (see module doc); ``est`` is unchanged."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    removed = torch.unique(check_indices(indices, est.n_train, "removed indices"))
    if removed.numel() == 0:
        raise ValueError("no indices to remove; pass at least one training index")
    rest = remaining_indices(est.n_train, removed)
    if rest.numel() == 0:
        raise ValueError("cannot remove every training point: nothing would remain to fit")
    if est.sample_size is not None and est.sample_size > rest.numel():
        raise ValueError(
            f"sample_size={est.sample_size} exceeds the {rest.numel()} remaining training points"
        )
    if est._solver is not None and not bool(torch.isin(est.subset.indices, removed).any()):
        subset, solver = est.subset, est.solver
    else:  # the curvature must not see the removed points: draw from R for this call only
        subset, solver, _ = est.draw(rest)
    fm, wd, dev = est.fm, est.weight_decay, est.x.device
    theta = fm.theta + scale * solver.solve(removal_gradient(est, removed)[None])[0]
    xr, yr = est.x[rest.to(dev)], est.y[rest.to(dev)]
    for _ in range(steps - 1):
        model_k = copy.deepcopy(est.model)
        fm.space.set(model_k, theta)
        fm_k = FunctionalModel(model_k, est.task)
        g = -(mean_gradient(fm_k, xr, yr) + wd * theta)
        theta = theta + scale * est._prepare_solver(fm_k, subset).solve(g[None])[0]
    new_model = copy.deepcopy(est.model)
    fm.space.set(new_model, theta)
    return new_model
