"""Removing training points with influence (Newton) steps.

With S the removed points, R the rest, the first step is θ₁ = θ̂ + η (C_R + λI)⁻¹ g, where
g = (1/|R|) Σ_{z∈S} ∇l(z; θ̂) + wd·θ̂·|S|/|R|. At a minimum θ̂ of the full objective this g equals
−∇L_R(θ̂), the negative gradient of the remaining-data objective
L_R = (1/|R|) Σ_R l + (wd/2)‖θ‖², so with η = 1 the step is one Newton step on L_R (the classic
influence-function removal). Each later step (``steps`` > 1) re-linearises: it refits the
curvature on the same subset at the new parameters and takes θ_{k+1} = θ_k − η (C_R + λI)⁻¹
∇L_R(θ_k), computing ∇L_R on all of R (one ordinary pass).

η (``scale``) > 1 compensates for the curvature over-estimating how stiff a deep, non-convex
model is around θ̂; for a convex model trained to convergence use η = 1. :func:`choose_scale`
picks η on held-out points (the API's ``scale="auto"`` and the study's ``--scale auto`` both
use it), and :func:`check_retained` warns (:class:`~repif.errors.RemovalWarning`) when a
removal collapses the retained classes' accuracy.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from repif import distributed
from repif.data import DataSource
from repif.errors import RemovalWarning
from repif.fitting import CurvatureFitter, FittedCurvature
from repif.gradients.streaming import split_batch, sum_gradient
from repif.metrics import removal_scores
from repif.validation import check_finite_number, check_indices, check_vector

#: Grid for ``scale="auto"``: η is picked on held-out points, never on the test set.
#: η ≥ 1 compensates a curvature that overstates how stiff a deep network is (exact GGN/Hessian
#: on a small subset); η < 1 one that understates it (Kronecker factors with a sampled output
#: Hessian overshot ResNet-18's removal by ≈ 300×: best validation F1 at η ≈ 0.003). The values
#: ≥ 1 are tried first, so a value below 1 is taken only when strictly better (ties keep the
#: larger step).
SCALE_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
              0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)

#: A removal whose retained classes keep less than this share of their accuracy (on the
#: validation points, or else on the curvature subset's remaining training points) is reported
#: with a :class:`RemovalWarning`. The same share is the goal a removal is held to (others keep
#: ≥ 90% of their accuracy).
RETAINED_SHARE = 0.9

#: Training points of the curvature subset that the retained-accuracy check reads when no
#: validation points are passed (a forward over them before and after the update).
CHECK_POINTS = 1024


def choose_scale(
    predict: Callable[[Tensor], Tensor], theta: Tensor, direction: Tensor, labels: Tensor,
    original: Tensor, removed_classes: list[int], grid: tuple[float, ...] = SCALE_GRID,
) -> tuple[float, float]:
    """(η, its F1): the step along ``direction`` (v = (C_R + λI)⁻¹ g) that maximises the
    removal F1 (forget on ``removed_classes`` × consistency on the others, against the original
    predictions ``original``) of the held-out points whose ``labels`` are given;
    ``predict(θ)`` → their (n,) predicted classes at parameters θ. Ties keep the earlier
    grid value (see :data:`SCALE_GRID`)."""
    best, best_f1 = grid[0], -1.0
    for eta in grid:
        pred = predict(theta + eta * direction)
        f1 = removal_scores(pred, original, labels, removed_classes).f1
        if f1 > best_f1 + 1e-12:
            best, best_f1 = eta, f1
    return best, best_f1


def source_predictions(fitter: CurvatureFitter, source: DataSource, theta: Tensor,
                       indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(predicted classes, targets) of ``source``'s points ``indices`` (default all) at
    parameters ``theta``, streamed in budget-sized chunks (CPU tensors)."""
    idx = torch.arange(len(source)) if indices is None else indices
    fm = fitter.fm.at(theta)
    preds, targets = [], []
    with torch.no_grad():
        for _, batch in source.batches(idx, fitter.budget.rows(fitter.cost.forward_row())):
            inputs, y = split_batch(fm, batch)
            preds.append(fm.output(fm.theta, inputs).argmax(-1).cpu())
            targets.append(y.cpu())
    return torch.cat(preds), torch.cat(targets)


def training_targets(fitter: CurvatureFitter, indices: Tensor) -> Tensor:
    """Targets of training points ``indices`` (CPU), without a forward pass."""
    cheap = fitter.cheap_labels(indices)
    if cheap is not None:
        return cheap
    rows = fitter.budget.rows(fitter.cost.forward_row())
    return torch.cat([fitter.task.split(b)[1].cpu() for _, b in
                      fitter.source.batches(indices, rows)])


def removed_classes(fitter: CurvatureFitter, removed: Tensor) -> list[int]:
    """The classes all of whose training points are in ``removed``."""
    everyone = training_targets(fitter, torch.arange(fitter.n_train))
    gone = torch.zeros(fitter.n_train, dtype=torch.bool)
    gone[removed.cpu()] = True
    return [int(c) for c in torch.unique(everyone[gone]).tolist()
            if bool(gone[everyone == c].all())]


def check_retained(before: tuple[Tensor, Tensor], after: Tensor, classes: list[int],
                   where: str, scale: float) -> dict[str, float]:
    """Accuracy of the retained classes (labels not in ``classes``) before and after a removal,
    from ``before`` = (original predictions, labels) and the new predictions ``after``; warns
    with :class:`RemovalWarning` when less than :data:`RETAINED_SHARE` of it is kept."""
    pred0, labels = before
    keep = ~torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    if not bool(keep.any()):
        return {}
    acc0 = float((pred0[keep] == labels[keep]).double().mean())
    acc1 = float((after[keep] == labels[keep]).double().mean())
    if acc1 < RETAINED_SHARE * acc0:
        warnings.warn(RemovalWarning(
            f"the removal (scale={scale:g}) dropped the retained classes' accuracy on {where} "
            f"from {acc0:.3f} to {acc1:.3f} ({acc1 / max(acc0, 1e-12):.0%} kept, below "
            f"{RETAINED_SHARE:.0%}): the step overshoots. Pass scale='auto' with "
            "validation=(held-out points) to pick η there, or a smaller scale, or raise the "
            "damping"), stacklevel=3)
    return {"retained_accuracy_before": acc0, "retained_accuracy_after": acc1}


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
    return (total / n_s + fm.task.regularizer_gradient(fm.theta)) * (n_s / n_r)


def newton_removal(
    fitter: CurvatureFitter,
    fitted: FittedCurvature | None,
    indices: Tensor,
    *,
    scale: float | str = 1.0,
    steps: int = 1,
    gradient: Tensor | None = None,
    validation: DataSource | None = None,
    report: dict | None = None,
) -> nn.Module:
    """A copy of the fitter's model with ``indices`` removed (see module doc).

    ``fitted`` is reused when its subset holds no removed point; otherwise (or when None) a
    subset of the remaining points R is drawn with the fitter's sampler, size and seed.
    ``gradient`` (p,): g of :func:`removal_gradient` for these indices at the fitter's
    parameters, if already computed; None computes it (a pass over the removed points).
    ``scale="auto"`` picks η by :func:`choose_scale` on the ``validation`` points (needed; the
    removed points must be every training point of one or more classes) for the first step;
    later steps use the same η. The retained classes' accuracy is checked after the update
    (:func:`check_retained`) on ``validation``, or without it on up to :data:`CHECK_POINTS` of
    the curvature subset's (remaining) training points. ``report`` (a dict) receives the η used
    and the accuracies measured.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    auto = isinstance(scale, str)
    if auto and scale != "auto":
        raise ValueError(f"scale must be a positive number or 'auto', got {scale!r}")
    if auto and validation is None:
        raise ValueError(
            "scale='auto' picks η on held-out points: pass validation=(x, y), a Dataset or a "
            "DataLoader of points not used in training, with points of the removed class(es) "
            "and of the others; or pass a number (see the README: η > 1 for a deep model's "
            "exact curvature, η < 1 for Kronecker factors)")
    if not auto:
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
    fm = fitter.fm
    if gradient is None:
        gradient = removal_gradient(fitter, removed)
    else:
        rows = check_vector(gradient, fm.theta.numel(), "gradient")
        if gradient.ndim != 1:
            raise ValueError(f"gradient must be one ({fm.theta.numel()},) vector, the "
                             f"removal_gradient of these indices; got shape "
                             f"{tuple(gradient.shape)}")
        gradient = rows[0].to(fm.theta)
    direction = fitted.solve(gradient[None])[0]
    classes = removed_classes(fitter, removed) if validation is not None else []
    before = None
    if validation is not None:
        before = source_predictions(fitter, validation, fm.theta)
    if auto:
        assert before is not None
        if not classes:
            raise ValueError(
                "scale='auto' picks η by how well removed classes are forgotten, but the "
                "removed points are not all the training points of any class; pass a number")
        scale, f1 = choose_scale(lambda th: source_predictions(fitter, validation, th)[0],
                                 fm.theta, direction, before[1], before[0], classes)
        if report is not None:
            report["validation_f1"] = f1
    theta = fm.theta + scale * direction
    theta = distributed.broadcast(theta)  # rank 0's: the same model on every rank
    for _ in range(steps - 1):
        fm_k = fm.at(theta)
        grad_r = sum_gradient(fm_k, fitter.source, rest, fitter.budget, fitter.cost)
        g = -(grad_r / rest.numel() + fm.task.regularizer_gradient(theta))
        step = fitter.prepare(fitted.subset, fm_k, pool=fitted.pool)  # R's prior and basis
        theta = theta + scale * step.solve(g[None])[0]
        theta = distributed.broadcast(theta)
    if not bool(torch.isfinite(theta).all()):
        raise ArithmeticError(
            f"the removal update produced non-finite parameters (scale={scale}, steps={steps}); "
            "lower the scale or raise the damping"
        )
    if validation is not None:
        assert before is not None
        after = source_predictions(fitter, validation, theta)[0]
        checked = check_retained(before, after, classes, "the validation points", scale)
    else:  # the curvature subset's points are remaining training points
        points = fitted.subset.indices[:CHECK_POINTS].cpu()
        before = source_predictions(fitter, fitter.source, fm.theta, points)
        after = source_predictions(fitter, fitter.source, theta, points)[0]
        checked = check_retained(before, after, [],
                                 f"{points.numel()} remaining training points", scale)
    if report is not None:
        report.update(scale=float(scale), **checked)
    new_model = copy.deepcopy(fm.model)
    fm.space.set(new_model, theta)
    return new_model
