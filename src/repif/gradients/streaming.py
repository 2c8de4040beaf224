"""Per-sample gradients with ``torch.func.vmap(grad(...))`` and streamed gradient sums.

Chunk sizes come from one :class:`~repif.memory.MemoryBudget` and what one point costs: its
activations (measured by a forward hook on one point) and, for per-sample gradients, its
p-dimensional gradient (docs/design.md, "Scale").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.func import grad

from repif import distributed
from repif.data import Batch, DataSource, batch_len, take, to_device
from repif.memory import MemoryBudget
from repif.task import FunctionalModel, vmap_points

#: Bytes of working memory one point's activations take in a forward+backward, per activation
#: element and per element byte: forward values, their gradients and the values autograd saves
#: (measured ≈ 2.5 on the reference CNN and ResNet; rounded up).
BACKWARD_OVERHEAD = 3

#: Copies of a p-dimensional gradient alive per point inside ``vmap(grad)``: the per-layer
#: gradients, their flattened concatenation and the output row.
GRAD_COPIES = 3


class PerSampleEngine(Protocol):
    """Computes per-sample gradients of a batch; :mod:`repif.gradients.hooks` provides one."""

    def gradients(self, inputs: Any, targets: Any, measure: str = "loss") -> Tensor: ...

    def scores(self, factors: Tensor, inputs: Any, targets: Any) -> Tensor: ...

    def row_bytes(self, materialise: bool) -> int: ...


class CostModel:
    """What one point costs in a model's passes, measured once (one forward on one point).

    ``engine`` is the per-sample gradient engine in use (None: ``torch.func``'s vmap).
    """

    def __init__(
        self, fm: FunctionalModel, inputs: Any, engine: PerSampleEngine | None = None
    ) -> None:
        self.fm = fm
        self.activation_numel = fm.activation_numel(inputs)
        self.itemsize = fm.theta.element_size()
        self.engine = engine

    @property
    def activation_bytes(self) -> int:
        """One point's activations, in bytes."""
        return self.activation_numel * self.itemsize

    def forward_row(self) -> int:
        """Bytes one point holds in a no-grad forward."""
        return 2 * self.activation_bytes

    def backward_row(self) -> int:
        """Bytes one point holds in an ordinary batched forward+backward."""
        return BACKWARD_OVERHEAD * self.activation_bytes

    def gradient_row(self, materialise: bool = True) -> int:
        """Bytes one point holds while its own gradient is computed: with the layer engine,
        its backward, the largest layer's temporaries and (``materialise``) its p-vector;
        with ``vmap(grad)``, its backward and GRAD_COPIES p-vectors."""
        if self.engine is not None:
            return 2 * self.backward_row() + self.engine.row_bytes(materialise)
        return self.backward_row() + GRAD_COPIES * self.fm.space.size * self.itemsize


def per_sample_gradients(
    fm: FunctionalModel,
    inputs: Any,
    targets: Any,
    *,
    theta: Tensor | None = None,
    chunk_size: int | None = None,
    measure: str = "loss",
) -> Tensor:
    """(n, p) gradients ∇_θ l(z_i; θ) of each sample's loss (or query, ``measure="query"``),
    for points already gathered into model inputs and targets; in the model's dtype and device.
    ``chunk_size`` points go through one vmapped call (default: all of them)."""
    theta = fm.theta if theta is None else theta
    g = vmap_points(grad(fm.sample_fn(measure)), (None, 0, 0))
    n = batch_len(targets)
    step = n if chunk_size is None else max(1, int(chunk_size))
    out = torch.empty(n, fm.space.size, dtype=fm.dtype, device=fm.device)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        out[rows] = g(theta, take(inputs, rows), take(targets, rows))
    return out


def split_batch(fm: FunctionalModel, batch: Batch) -> tuple[Any, Any]:
    """A collated batch on the model's device and dtype, split into (inputs, targets)."""
    return fm.task.split(to_device(batch, fm.device, fm.dtype))


def stream_gradients(
    fm: FunctionalModel,
    source: DataSource,
    indices: Tensor,
    budget: MemoryBudget,
    cost: CostModel,
    *,
    extra_row_bytes: int = 0,
    fixed_bytes: int = 0,
    measure: str = "loss",
) -> Iterator[tuple[int, Tensor]]:
    """(offset, (b, p) per-sample gradients) for consecutive chunks of ``indices``, each chunk
    as large as the budget allows beside ``fixed_bytes`` when every row also keeps
    ``extra_row_bytes`` (e.g. its scores)."""
    rows = budget.rows(cost.gradient_row() + extra_row_bytes, fixed=fixed_bytes)
    for offset, batch in source.batches(indices, rows):
        inputs, targets = split_batch(fm, batch)
        if cost.engine is not None:
            yield offset, cost.engine.gradients(inputs, targets, measure)
        else:
            yield offset, per_sample_gradients(fm, inputs, targets, measure=measure)


def stream_scores(
    fm: FunctionalModel,
    source: DataSource,
    indices: Tensor,
    budget: MemoryBudget,
    cost: CostModel,
    factors: Tensor,
) -> Iterator[tuple[int, Tensor]]:
    """(offset, (k, b) factors · ∇l(z_j)ᵀ) for consecutive chunks of training ``indices``.

    With the layer engine, per-sample gradients are formed one layer at a time and never as
    whole p-vectors, so chunks are larger; otherwise they come from ``vmap(grad)``.
    """
    k = factors.shape[0]
    fixed = factors.numel() * cost.itemsize
    if cost.engine is None:
        yield from (
            (offset, factors @ g.T)
            for offset, g in stream_gradients(fm, source, indices, budget, cost,
                                              extra_row_bytes=k * cost.itemsize,
                                              fixed_bytes=fixed)
        )
        return
    rows = budget.rows(cost.gradient_row(materialise=False) + k * cost.itemsize, fixed=fixed)
    for offset, batch in source.batches(indices, rows):
        inputs, targets = split_batch(fm, batch)
        yield offset, cost.engine.scores(factors, inputs, targets)


def sum_gradient(
    fm: FunctionalModel,
    source: DataSource,
    indices: Tensor,
    budget: MemoryBudget,
    cost: CostModel,
    *,
    theta: Tensor | None = None,
) -> Tensor:
    """(p,) Σ_{i ∈ indices} ∇l(z_i; θ): one ordinary batched backward per budget-sized chunk.
    Over several processes each rank sums its share of ``indices`` and the sums are added."""
    theta = (fm.theta if theta is None else theta).detach().requires_grad_(True)
    total = torch.zeros_like(theta)
    rows = budget.rows(cost.backward_row(), fixed=2 * theta.numel() * cost.itemsize)
    indices = distributed.shard(indices)  # all of them in one process
    for _, batch in source.batches(indices, rows):
        inputs, targets = split_batch(fm, batch)
        (g,) = torch.autograd.grad(fm.losses(theta, inputs, targets).sum(), theta)
        total += g
    return distributed.all_reduce_sum(total.detach())
