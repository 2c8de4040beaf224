"""Turning the ways a user may pass data into ``(x, y)`` tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def as_tensors(data: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tuple/list of tensors or a torch ``Dataset`` of ``(x, y)`` pairs → (x, y)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, Tensor) for t in data
    ):
        x, y = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError("the dataset is empty")
        pairs = [data[i] for i in range(len(data))]
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
    else:
        raise TypeError(
            f"data must be a tuple (x, y) of tensors or a Dataset of (x, y) pairs, got "
            f"{type(data).__name__}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}; they must match")
    return x, y
