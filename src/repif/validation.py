"""Input checks shared across the library; each raises ValueError naming the value and the fix."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map


def check_not_meta(t: Tensor, what: str) -> None:
    """Raise if ``t`` lives on the ``meta`` device (a shape without values)."""
    if t.is_meta:
        raise ValueError(
            f"{what} is on the meta device (a shape without values, e.g. from "
            "torch.device('meta') or init_empty_weights); materialise it first: load real "
            "weights (model.to_empty(device='cpu') then load_state_dict) or create the data on "
            "'cpu' or 'cuda'"
        )


def check_finite(t: Tensor, what: str) -> None:
    """Raise if ``t`` holds NaN or inf (or has no values: the meta device)."""
    check_not_meta(t, what)
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
    check_not_meta(y, what)
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
            f"pass a tensor of shape ({size},) or (k, {size}) (est.fm.space.flatten({{name: "
            "tensor, …}) joins per-parameter tensors, in est.fm.space.names order)"
        )
    check_finite(vec, what)
    return vec.reshape(-1, size)


def check_indices(indices: Tensor, n: int, what: str = "indices") -> Tensor:
    """Return ``indices`` as a 1-D int64 tensor; raise if any is outside [0, n).

    A boolean mask of length n is accepted and turned into the indices where it is True; a
    boolean tensor of another length, or floating-point indices, are refused (never truncated).
    """
    idx = torch.as_tensor(indices)
    if idx.numel() == 0 and idx.dtype != torch.bool:
        idx = idx.long()  # no values, nothing to truncate (``[]`` alone is a float tensor)
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

def dataclass_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """``cls(**d)`` for a dataclass ``cls``, refusing keys it does not have by name (a stored
    configuration with an unknown key was written by another version or edited by hand:
    guessing what it meant would run a different configuration under the same name)."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {unknown}; known keys: {sorted(known)}. "
                         "Remove them, or run with the repif version that wrote it")
    return cls(**d)


def check_choice(value: object, choices: tuple[str, ...], what: str) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``, naming them."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def check_finite_number(value: object, what: str) -> None:
    """Raise unless ``value`` is a real, finite number (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{what} must be finite, got {value!r}")


def check_count(value: Any, what: str) -> int:
    """``value`` as an int if it is a positive whole number (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer, got {value!r} "
                        f"({type(value).__name__}); e.g. {what}=10")
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}; e.g. {what}=10")
    return int(value)


def _array_like(v: Any) -> bool:
    return isinstance(v, (Tensor, np.ndarray))


def _to_tensor(v: Any, what: str) -> Any:
    if not isinstance(v, np.ndarray):
        return v
    try:
        return torch.from_numpy(np.ascontiguousarray(v))
    except TypeError as err:
        raise TypeError(f"{what} is a numpy array of dtype {v.dtype}, which torch cannot hold; "
                        "convert it to numbers (e.g. x.astype(np.float32))") from err


_FORMS = ("pass a tuple (x, y) of tensors or numpy arrays, a dict batch of tensors with the "
          "targets under 'labels', a torch Dataset of (x, y) items, or a DataLoader")


def as_torch_data(data: Any) -> Any:
    """``data`` with numpy arrays turned into tensors (``(x, y)`` tuples and dict batches);
    raises TypeError naming the accepted forms for plain Python lists or scalars, which torch
    would otherwise misread (a list of rows as a dataset of numbers, for one)."""
    if isinstance(data, np.ndarray):
        return _to_tensor(data, "data")
    if isinstance(data, dict):
        for k, v in data.items():
            leaves = tree_flatten(v)[0]
            if not leaves or not all(_array_like(t) for t in leaves):
                raise TypeError(f"dict batch entry {k!r} is a {type(v).__name__}, not a tensor "
                                f"or numpy array (one row per point); {_FORMS}")
        out = tree_map(lambda t: _to_tensor(t, "a dict batch entry"), data)
        for k, v in out.items():
            for t in tree_flatten(v)[0]:
                check_not_meta(t, f"dict batch entry {k!r}")
        return out
    if isinstance(data, (tuple, list)) and data:
        if all(_array_like(v) for v in data):
            last = len(data) - 1
            converted = [_to_tensor(v, f"element {i}") for i, v in enumerate(data)]
            for i, t in enumerate(converted):
                check_not_meta(t, f"data element {i} ({'targets' if i == last else 'inputs'})")
            return tuple(converted) if isinstance(data, tuple) else converted
        first = next(i for i, v in enumerate(data) if not _array_like(v))
        item = data[first]
        if isinstance(item, (tuple, list, dict)) and any(_array_like(v) for v in (
            item.values() if isinstance(item, dict) else item
        )):
            return data  # a list of items (x_i, y_i): a map-style dataset
        raise TypeError(
            f"data element {first} is a {type(item).__name__}"
            + (f" of {type(item[0]).__name__}" if isinstance(item, (list, tuple)) and item
               else "")
            + f", not a tensor; convert lists with torch.tensor(...), or {_FORMS}"
        )
    return data
