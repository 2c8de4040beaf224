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

import torch
from torch import Tensor, nn

from repif import distributed
from repif.fitting import CurvatureFitter, FittedCurvature
from repif.gradients.streaming import sum_gradient
from repif.validation import check_finite_number, check_indices, check_vector


def remaining_indices(n: int, removed: Tensor) -> Tensor:
    """Indices in [0, n) not in ``removed``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed.cpu()] = False
    return torch.nonzero(keep).flatten()


def removal_gradient(fitter: CurvatureFitter, removed: Tensor) -> Tensor:
    """(p,) g = (1/|R|) Σ_{z∈S} ∇l(z; θ̂) + wd·θ̂·|S|/|R| (= −∇L_R(θ̂) at a minimum θ̂),
    streamed over S in budget-sized chunks."""
    removed = torch.unique(check_indices(removed, fitter.n_train, "removed indices"))
    n_s = removed.numel()
    n_r = fitter.n_train - n_s
    if n_r == 0:
        raise ValueError("cannot remove every training point: nothing would remain to fit")
    fm = fitter.fm
    total = sum_gradient(fm, fitter.source, removed, fitter.budget, fitter.cost)
    if not bool(torch.isfinite(total).all()):
        raise ValueError(
            f"the loss gradient summed over the {n_s} removed points is not finite (NaN or "
            "inf): an input, target or loss among them is not finite. Clean or drop those "
            "points; a non-finite gradient would otherwise make the update meaningless"
        )
    return (total / n_s + fm.task.weight_decay * fm.theta) * (n_s / n_r)


def newton_removal(
    fitter: CurvatureFitter,
    fitted: FittedCurvature | None,
    indices: Tensor,
    *,
    scale: float = 1.0,
    steps: int = 1,
    gradient: Tensor | None = None,
) -> nn.Module:
    """A copy of the fitter's model with ``indices`` removed (see module doc).

    ``fitted`` is reused when its subset holds no removed point; otherwise (or when None) a
    subset of the remaining points R is drawn with the fitter's sampler, size and seed.
    ``gradient`` (p,): g of :func:`removal_gradient` for these indices at the fitter's
    parameters, if already computed; None computes it (a pass over the removed points).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_finite_number(scale, "scale")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    n = fitter.n_train
    removed = torch.unique(check_indices(indices, n, "removed indices"))
    if removed.numel() == 0:
        raise ValueError("no indices to remove; pass at least one training index")
    rest = remaining_indices(n, removed)
    if rest.numel() == 0:
        raise ValueError("cannot remove every training point: nothing would remain to fit")
    size = fitter.options.sample_size
    if size is not None and size > rest.numel():
        raise ValueError(
            f"sample_size={size} exceeds the {rest.numel()} remaining training points"
        )
    if fitted is None or bool(torch.isin(fitted.subset.indices, removed).any()):
        fitted = fitter.draw(rest)  # the curvature must not see the removed points
    fm, wd = fitter.fm, fitter.fm.task.weight_decay
    if gradient is None:
        gradient = removal_gradient(fitter, removed)
    else:
        rows = check_vector(gradient, fm.theta.numel(), "gradient")
        if gradient.ndim != 1:
            raise ValueError(f"gradient must be one ({fm.theta.numel()},) vector, the "
                             f"removal_gradient of these indices; got shape "
                             f"{tuple(gradient.shape)}")
        gradient = rows[0].to(fm.theta)
    theta = fm.theta + scale * fitted.solve(gradient[None])[0]
    theta = distributed.broadcast(theta)  # rank 0's: the same model on every rank
    for _ in range(steps - 1):
        fm_k = fm.at(theta)
        grad_r = sum_gradient(fm_k, fitter.source, rest, fitter.budget, fitter.cost)
        g = -(grad_r / rest.numel() + wd * theta)
        theta = theta + scale * fitter.prepare(fitted.subset, fm_k).solve(g[None])[0]
        theta = distributed.broadcast(theta)
    if not bool(torch.isfinite(theta).all()):
        raise ArithmeticError(
            f"the removal update produced non-finite parameters (scale={scale}, steps={steps}); "
            "lower the scale or raise the damping"
        )
    new_model = copy.deepcopy(fm.model)
    fm.space.set(new_model, theta)
    return new_model
