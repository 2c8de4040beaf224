"""The :class:`Dataset` record, its error type, normalisation and stratified subsets."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from repif.errors import RepifError


class DatasetNotFoundError(RepifError, FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory as tensors.

    ``train`` and ``test`` are ``(x, y)`` tuples: ``x`` float32 of shape ``(N, C, H, W)``,
    normalised as described in :func:`normalise`; ``y`` int64 in ``[0, num_classes)``.
    ``mean``/``std`` are the per-channel statistics (of pixels scaled to [0, 1]) that were used.
    """

    name: str
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train[1])}, test={len(self.test[1])}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


def normalise(
    x_train: np.ndarray, x_test: np.ndarray, max_value: float
) -> tuple[Tensor, Tensor, tuple[float, ...], tuple[float, ...]]:
    """Scale pixels to [0, 1] by ``max_value``, then standardise each channel with the mean and
    standard deviation of the *training* pixels. Inputs are ``(N, C, H, W)`` arrays."""
    xtr = torch.from_numpy(np.array(x_train, dtype=np.float32, order="C"))
    xte = torch.from_numpy(np.array(x_test, dtype=np.float32, order="C"))
    xtr.div_(float(max_value))
    xte.div_(float(max_value))
    channels = xtr.shape[1]
    flat = xtr.transpose(0, 1).reshape(channels, -1)
    var, mean = torch.var_mean(flat, dim=1)
    std = var.sqrt().clamp_min(1e-8)
    for x in (xtr, xte):
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return xtr, xte, tuple(mean.tolist()), tuple(std.tolist())


def stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified subset of ``size`` points, deterministic per seed.

    Each class gets a share proportional to its frequency (largest remainders break ties, every
    present class keeps at least one point when ``size`` allows); points within a class are drawn
    uniformly without replacement.
    """
    y = np.asarray(y)
    n = len(y)
    if size >= n:
        return np.arange(n)
    if size <= 0:
        raise ValueError(f"a subset size must be positive, got {size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * size / n
    alloc = np.floor(quota).astype(np.int64)
    if size >= len(classes):
        alloc = np.maximum(alloc, 1)
    while alloc.sum() > size:  # only possible after the at-least-one bump
        alloc[np.argmax(alloc - quota)] -= 1
    order = np.argsort(-(quota - alloc), kind="stable")
    for i in order[: size - int(alloc.sum())]:
        alloc[i] += 1
    picked = [
        rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, alloc, strict=True)
    ]
    return np.sort(np.concatenate(picked))
