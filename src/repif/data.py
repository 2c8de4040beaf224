"""Training data as batches: tensors, or a torch ``Dataset`` of any item structure.

A *batch* is whatever the collate function makes of some items — a tuple ``(x, y)``, a longer
tuple, a dict (``{"input_ids": …, "labels": …}``), nested structures — as long as every leaf is a
tensor whose first dimension indexes the points. repif never holds the whole training set as one
batch: :class:`DataSource` streams it in chunks sized by the memory budget, and only the sampled
curvature subset (m points) is ever collated whole (docs/design.md, "Scale").
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    default_collate,
)
from torch.utils.data import Subset as _TorchSubset
from torch.utils.data.distributed import DistributedSampler

from repif.validation import as_torch_data

Batch = Any
Collate = Callable[[list[Any]], Batch]

#: Tensors up to this size are hashed whole by :meth:`DataSource.fingerprint` (hashing runs at
#: roughly 1 GB/s, so at most a fraction of a second); larger ones by a spread of points.
FINGERPRINT_FULL_BYTES = 256 * 2**20

#: Points a fingerprint reads from a Dataset or a large tensor, spread evenly over the data.
FINGERPRINT_POINTS = 16


def batch_len(batch: Batch) -> int:
    """Number of points in a batch: the first dimension of its first tensor leaf."""
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"a batch must hold tensors, got {type(batch).__name__} without any")
    return int(leaves[0].shape[0]) if leaves[0].ndim else 1


def take(batch: Batch, rows: Tensor | slice) -> Batch:
    """Rows ``rows`` of every tensor leaf of ``batch``."""
    return tree_map(lambda t: t[rows] if isinstance(t, Tensor) else t, batch)


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
    """Move every tensor leaf to ``device``; floating-point leaves also become ``dtype``
    (the model's), integer leaves (labels, token ids) keep theirs."""

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return tree_map(move, batch)


def concat(batches: list[Batch]) -> Batch:
    """Concatenate batches of the same structure along the point dimension."""
    leaves0, spec = tree_flatten(batches[0])
    columns = [tree_flatten(b)[0] for b in batches]
    joined = [
        torch.cat([c[i] for c in columns]) if isinstance(leaves0[i], Tensor) else leaves0[i]
        for i in range(len(leaves0))
    ]
    return tree_unflatten(joined, spec)


class DataSource:
    """Indexable training (or test) data, gathered by index and streamed in chunks.

    ``data`` is a tuple of equal-length tensors (``(x, y)``: the fast path), one in-memory dict
    batch (``{"input_ids": …, "labels": …}``, every value a tensor), a torch ``Dataset``
    of items of any structure (collated by ``collate_fn``, default torch's ``default_collate``),
    or a ``DataLoader`` (its dataset and collate function are used; its batch size caps the
    chunk size; its sampler selects the points, see :func:`sampler_indices`). An
    ``IterableDataset`` is refused: points are gathered by index. ``batch_size`` caps how many
    points one chunk holds (the memory budget may make chunks smaller); ``num_workers`` loads
    items in background processes as a DataLoader does. ``what`` names the data in errors;
    ``allow_empty`` accepts data without points (test data: empty results).
    """

    def __init__(
        self,
        data: Any,
        *,
        collate_fn: Collate | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        what: str = "training data",
        allow_empty: bool = False,
    ) -> None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}; "
                             "e.g. batch_size=64")
        self.tensors: tuple[Tensor, ...] | None = None
        self.batch: Batch | None = None  # one in-memory dict batch
        self.dataset: Any = None
        #: The dataset index of each point 0…n−1 when a DataLoader's sampler selects a subset of
        #: its dataset (see :func:`sampler_indices`); None when point i is the dataset's item i.
        self.dataset_indices: Tensor | None = None
        self.validate: Callable[[Batch], None] | None = None  # checks each gathered batch
        if isinstance(data, DataLoader):
            collate_fn = collate_fn or data.collate_fn
            batch_size = batch_size or data.batch_size
            _refuse_iterable(data.dataset, what)
            self.dataset_indices = sampler_indices(data, what)
            data = data.dataset
            if self.dataset_indices is not None:
                data = _TorchSubset(data, self.dataset_indices.tolist())
        _refuse_iterable(data, what)
        data = as_torch_data(data)  # numpy arrays become tensors; plain lists are refused
        if isinstance(data, (tuple, list)) and len(data) >= 2 and all(
            isinstance(t, Tensor) for t in data
        ):
            rows = [int(t.shape[0]) if t.ndim else -1 for t in data]
            if len(set(rows)) != 1 or -1 in rows:
                raise ValueError(
                    f"x has {rows[0]} rows but y has {rows[-1]}; they must match (one row per "
                    "point in every tensor)"
                )
            self.tensors = tuple(data)
        elif isinstance(data, Mapping) and data and all(
            isinstance(t, Tensor) and t.ndim for t in tree_flatten(data)[0]
        ):
            self.batch = data
        elif isinstance(data, Dataset) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__")
        ):
            self.dataset = data
        else:
            raise TypeError(
                "data must be a tuple (x, y) of tensors, a torch Dataset or a DataLoader, got "
                f"{type(data).__name__}"
            )
        if len(self) == 0 and not allow_empty:
            raise ValueError(f"the {what} are empty; pass at least one point")
        self.collate_fn: Collate = collate_fn or default_collate
        self.batch_size = None if batch_size is None else int(batch_size)
        self.num_workers = int(num_workers)

    def __len__(self) -> int:
        if self.tensors is not None:
            return int(self.tensors[0].shape[0])
        if self.batch is not None:
            return batch_len(self.batch)
        return len(self.dataset)

    def gather(self, indices: Tensor) -> Batch:
        """One collated batch of points ``indices`` (1-D int64, on the CPU), in that order."""
        idx = indices.cpu()
        if self.tensors is not None:
            return tuple(t[idx.to(t.device)] for t in self.tensors)
        if self.batch is not None:
            return take(self.batch, idx)
        items = [self.dataset[int(i)] for i in idx]
        if not items:
            raise ValueError("no points to gather; pass at least one index")
        batch = self.collate_fn(items)
        if self.validate is not None:
            self.validate(batch)
        return batch

    def chunk_rows(self, budget_rows: int) -> int:
        """Points per chunk: the budget's figure, capped by the user's ``batch_size``."""
        rows = max(1, int(budget_rows))
        return min(rows, self.batch_size) if self.batch_size else rows

    def batches(self, indices: Tensor, rows: int) -> Iterator[tuple[int, Batch]]:
        """(offset into ``indices``, batch) for consecutive chunks of at most ``rows`` points."""
        idx = indices.cpu()
        rows = self.chunk_rows(rows)
        if self.dataset is None or self.num_workers == 0:
            for s in range(0, idx.numel(), rows):
                yield s, self.gather(idx[s : s + rows])
            return
        loader = DataLoader(
            _TorchSubset(self.dataset, idx.tolist()), batch_size=rows, shuffle=False,
            collate_fn=self.collate_fn, num_workers=self.num_workers,
        )
        offset = 0
        for batch in loader:
            if self.validate is not None:
                self.validate(batch)
            yield offset, batch
            offset += batch_len(batch)

    def fingerprint(self) -> str:
        """A SHA-256 of the number of points and of their contents: tensors up to
        FINGERPRINT_FULL_BYTES whole, larger ones and Datasets by FINGERPRINT_POINTS points
        spread over the data (another order, other points or noise show either way). Used to
        check that several processes were given the same data."""
        h = hashlib.sha256(f"{len(self)}".encode())
        n = len(self)
        if n == 0:
            return h.hexdigest()
        spread = torch.linspace(0, n - 1, min(n, FINGERPRINT_POINTS)).round().long().unique()
        if self.dataset is not None:
            leaves = tree_flatten(self.gather(spread))[0]
        else:
            whole = list(self.tensors) if self.tensors is not None else tree_flatten(self.batch)[0]
            leaves = [t if t.numel() * t.element_size() <= FINGERPRINT_FULL_BYTES
                      else t[spread.to(t.device)] for t in whole]
        for t in leaves:
            if isinstance(t, Tensor):
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def first(self) -> Batch:
        """A batch holding the first point (to probe shapes and activation sizes)."""
        return self.gather(torch.zeros(1, dtype=torch.long))


def _refuse_iterable(data: Any, what: str) -> None:
    """TypeError naming the fix for an ``IterableDataset`` (it has no ``len`` and no indexing)."""
    if isinstance(data, IterableDataset):
        raise TypeError(
            f"the {what} are a torch IterableDataset ({type(data).__name__}), which can only be "
            "iterated; repif gathers points by index (to draw the curvature subset and to score "
            "each point): materialise it (e.g. x, y = (torch.stack(t) for t in zip(*data)), then "
            "pass (x, y)) or pass a map-style Dataset (with __getitem__ and __len__)"
        )


def sampler_indices(loader: DataLoader, what: str = "training data") -> Tensor | None:
    """The dataset indices a DataLoader's sampler selects, ascending, or None for every point.

    repif draws and streams points itself, by index, so a sampler's *order* never matters;
    which points it selects does. A sequential sampler, or a random permutation of the whole
    dataset (``shuffle=True``), selects every point: None. A ``SubsetRandomSampler`` (also inside
    a ``BatchSampler``) selects its indices: point i is then the dataset's item
    ``indices[i]``. Samplers that draw with replacement or by weight, a ``DistributedSampler``
    (repif shards across processes itself) and samplers whose points cannot be known without
    drawing from them are refused naming the fix.
    """
    sampler = loader.sampler
    batches = loader.batch_sampler
    passed = f"the DataLoader passed as {what}"
    if isinstance(batches, BatchSampler):
        sampler = batches.sampler
    elif batches is not None:
        raise ValueError(
            f"{passed} has a custom batch_sampler ({type(batches).__name__}), "
            "whose points repif cannot know without drawing from it; pass the dataset, or "
            "torch.utils.data.Subset(dataset, indices) to use only some points"
        )
    n = len(loader.dataset)
    fix = ("pass the dataset, a DataLoader without a sampler, or "
           "torch.utils.data.Subset(dataset, indices) to use only some points")
    if isinstance(sampler, SequentialSampler):
        return None
    if isinstance(sampler, RandomSampler):
        if not sampler.replacement and sampler.num_samples == n:
            return None  # a permutation of every point: the same points
        raise ValueError(
            f"{passed} samples {sampler.num_samples} of its {n} points "
            f"{'with' if sampler.replacement else 'without'} replacement (RandomSampler); "
            f"repif uses each point once, in dataset order: {fix}"
        )
    if isinstance(sampler, DistributedSampler):
        raise ValueError(
            f"{passed} has a DistributedSampler; repif shards the data across "
            "processes itself and every rank must be given all of it: pass the dataset or a "
            "DataLoader without the sampler"
        )
    if isinstance(sampler, SubsetRandomSampler):
        idx = torch.as_tensor(list(sampler.indices), dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(f"{passed} has a SubsetRandomSampler holding index {bad}, outside the "
                             f"dataset's {n} points [0, {n})")
        ordered = torch.sort(idx).values
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise ValueError(f"{passed} has a SubsetRandomSampler listing an index twice; "
                             "repif uses each point once: list each index once")
        return ordered
    raise ValueError(
        f"{passed} has a {type(sampler).__name__}, whose points repif cannot "
        f"know without drawing from it (and draws by weight or with repeats change what "
        f"influence means); {fix}"
    )


def as_tensors(data: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tuple/list of tensors or a torch ``Dataset`` of ``(x, y)`` pairs → (x, y).

    Holds everything in memory: fine for training the small reference models; the influence
    computations stream through :class:`DataSource` instead.
    """
    data = as_torch_data(data)
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
