"""Input checks shared across the library; each raises ValueError naming the value and the fix."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_finite(t: Tensor, what: str) -> None:
    """Raise if ``t`` holds NaN or inf."""
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            raise ValueError(
                f"{what} contains {n_bad} non-finite value(s) (NaN or inf) out of {t.numel()}; "
                "clean or impute them before computing influence"
            )


def check_labels(y: Tensor, num_classes: int, what: str = "labels") -> None:
    """Raise unless ``y`` is an integer tensor with values in [0, num_classes)."""
    if y.is_floating_point():
        raise ValueError(f"{what} must be integer class indices, got dtype {y.dtype}; use y.long()")
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{what} contain {bad}, outside [0, {num_classes}) for a model with {num_classes} "
            "outputs; relabel the data or use a model with more outputs"
        )


def check_vector(vec: Tensor, size: int, what: str = "vector") -> Tensor:
    """Return ``vec`` as (k, size) (a 1-D input becomes k = 1); raise on a wrong length."""
    if not isinstance(vec, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(vec).__name__}")
    if vec.ndim not in (1, 2) or vec.shape[-1] != size:
        raise ValueError(
            f"{what} has shape {tuple(vec.shape)} but the model has {size} trainable parameters; "
            f"pass a tensor of shape ({size},) or (k, {size}) (flatten it with "
            "estimator.params.flatten)"
        )
    check_finite(vec, what)
    return vec.reshape(-1, size)


def check_indices(indices: Tensor, n: int, what: str = "indices") -> Tensor:
    """Return ``indices`` as a 1-D int64 tensor; raise if any is outside [0, n).

    A boolean mask of length n is accepted and turned into the indices where it is True; a
    boolean tensor of another length, or floating-point indices, are refused (never truncated).
    """
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        if idx.ndim != 1 or idx.numel() != n:
            raise ValueError(
                f"{what} is a boolean mask of shape {tuple(idx.shape)}, but a mask must have "
                f"one entry per training point ({n},); or pass integer indices"
            )
        return torch.nonzero(idx).flatten()
    if idx.is_floating_point() or idx.is_complex():
        raise ValueError(
            f"{what} must be integers, got dtype {idx.dtype}; pass integer indices (e.g. "
            "tensor.long() if the values are whole numbers) or a boolean mask"
        )
    idx = idx.reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise ValueError(f"{what} contain {bad}, outside the {n} training points [0, {n})")
    return idx

def check_finite_number(value: object, what: str) -> None:
    """Raise unless ``value`` is a real, finite number (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{what} must be finite, got {value!r}")
