"""The sampler interface: pick the curvature subset T of a pool and its weights.

A sampler sees a :class:`Pool` (candidate training indices, their labels and, computed lazily in
one streaming pass, their logits and penultimate features) and returns a :class:`Subset` of
distinct pool members whose weights sum to 1. Same seed ⇒ same subset, bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from repif.registry import Registry
from repif.validation import check_finite

REGISTRY: Registry[type[Sampler]] = Registry("sampler")


@dataclass(frozen=True)
class Subset:
    """``indices`` (m,) int64 training indices and ``weights`` (m,) float64 summing to 1."""

    indices: Tensor
    weights: Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


class Pool:
    """Candidate training points for the curvature subset.

    ``indices`` (k,) are global training indices, ``labels`` (k,) their classes. ``logits``
    (k, C) and ``features`` (k, d) are computed on first access by ``stats`` (one streaming
    forward pass) and then kept. ``labels=None`` means they come from the same pass: ``stats``
    then returns ``(logits, features, labels)``.
    """

    def __init__(
        self,
        indices: Tensor,
        labels: Tensor | None,
        num_classes: int,
        stats: Callable[[], tuple[Tensor, ...]] | None = None,
    ) -> None:
        self.indices = indices
        self.num_classes = num_classes
        self.stats = stats
        self._cache: dict[str, Tensor] = {} if labels is None else {"labels": labels}

    def __len__(self) -> int:
        return int(self.indices.numel())

    def _load(self) -> None:
        if "logits" not in self._cache:
            if self.stats is None:
                raise ValueError("this pool has no model to compute logits and features from")
            logits, feats, *rest = self.stats()
            check_finite(logits, "pool logits")
            check_finite(feats, "pool features")
            self._cache["logits"], self._cache["features"] = logits, feats
            if rest and "labels" not in self._cache:
                self._cache["labels"] = rest[0]

    @property
    def labels(self) -> Tensor:
        if "labels" not in self._cache:
            self._load()
        if "labels" not in self._cache:
            raise ValueError("this pool has no labels: pass them, or a stats pass that gives them")
        return self._cache["labels"]

    @property
    def logits(self) -> Tensor:
        self._load()
        return self._cache["logits"]

    @property
    def features(self) -> Tensor:
        self._load()
        return self._cache["features"]

    @property
    def probabilities(self) -> Tensor:
        return torch.softmax(self.logits.double(), dim=-1)


class Sampler(ABC):
    """Chooses ``m`` pool members and weights; subclasses set ``name`` to register."""

    name: ClassVar[str | None] = None
    #: Whether ``select`` reads the pool's logits or features (one forward pass over the pool);
    #: False for samplers that need at most the labels.
    uses_statistics: ClassVar[bool] = True
    #: Whether the subset ignores the seed (``first``: the same points for every seed).
    deterministic: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY.add(cls.name, cls)

    @property
    def normalizes(self) -> bool:
        """Whether ``select`` divides the weights by their sum (the contract: Σw = 1)."""
        return True

    def select(self, pool: Pool, m: int, seed: int = 0) -> Subset:
        """Draw the subset; raises ValueError for an empty pool or m outside [1, len(pool)]."""
        if len(pool) == 0:
            raise ValueError("the pool is empty; pass at least one training index as the pool")
        if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m <= 0:
            raise ValueError(f"sample_size must be a positive integer, got {m!r}")
        if m > len(pool):
            raise ValueError(
                f"sample_size={m} is larger than the pool ({len(pool)} points); "
                f"use sample_size ≤ {len(pool)} or sample_size=None for the whole pool"
            )
        rng = np.random.default_rng(seed)
        local, weights = self._select(pool, int(m), rng)
        local = np.asarray(local, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float64)
        if self.normalizes:
            weights = weights / weights.sum()
        return Subset(pool.indices[torch.from_numpy(local)], torch.from_numpy(weights))

    @abstractmethod
    def _select(
        self, pool: Pool, m: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return local positions into the pool (m,) and unnormalised weights (m,)."""


def build(name: str, options: dict[str, Any] | None = None) -> Sampler:
    """Instantiate a registered sampler, rejecting options it does not take by name."""
    return REGISTRY.build(name, options)


def proportional_allocation(
    sizes: np.ndarray, m: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Split m draws across groups ∝ ``sizes`` (largest remainder), never above a group's size.

    When m is at least the number of non-empty groups, every non-empty group gets at least one
    draw (a group with none would drop out of the weighted estimate and bias it); otherwise
    some groups get 0 and the weights are renormalised over the groups drawn. Ties are broken
    by ``rng`` (seeded, so the same seed gives the same allocation), else by group order.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = m * sizes / sizes.sum()
    floor = ((sizes > 0) & (m >= np.count_nonzero(sizes))).astype(np.int64)
    alloc = np.clip(np.floor(quota).astype(np.int64), floor, sizes)
    order = rng.permutation(len(sizes)) if rng is not None else np.arange(len(sizes))
    while alloc.sum() > m:  # the floors pushed us over: take from the most over-served group
        over = np.where(alloc > floor, alloc - quota, -np.inf)
        alloc[np.lexsort((order, -over))[0]] -= 1
    while alloc.sum() < m:  # hand out the rest by largest remainder
        under = np.where(alloc < sizes, quota - alloc, -np.inf)
        alloc[np.lexsort((order, -under))[0]] += 1
    return alloc


def stratified_draw(
    strata: np.ndarray, m: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform draws within each stratum, allocated ∝ stratum size; weight_i = (N_s/N)/m_s."""
    labels, inverse = np.unique(strata, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(labels))
    alloc = proportional_allocation(sizes, m, rng)
    picked, weights = [], []
    n = len(strata)
    for s, k in enumerate(alloc):
        if k == 0:
            continue
        members = np.flatnonzero(inverse == s)
        chosen = rng.choice(members, size=int(k), replace=False)
        picked.append(chosen)
        weights.append(np.full(int(k), sizes[s] / n / k))
    return np.concatenate(picked), np.concatenate(weights)
