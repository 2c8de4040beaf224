"""The baselines every comparison is made against."""

from __future__ import annotations

import numpy as np

from repif.samplers.base import Pool, Sampler, stratified_draw


class RandomSampler(Sampler):
    """Uniform without replacement, equal weights: the usual (and the paper's) baseline."""

    name = "random"
    uses_statistics = False

    def _select(self, pool: Pool, m: int, rng: np.random.Generator):
        return rng.choice(len(pool), size=m, replace=False), np.ones(m)


class StratifiedSampler(Sampler):
    """Uniform within each class, proportional allocation; weight (N_c/N)/m_c keeps C unbiased.

    When m is smaller than the number of classes, the largest-remainder allocation leaves some
    classes out (weights are renormalised over the classes drawn).
    """

    name = "stratified"
    uses_statistics = False

    def _select(self, pool: Pool, m: int, rng: np.random.Generator):
        return stratified_draw(pool.labels.cpu().numpy(), m, rng)


class FirstSampler(Sampler):
    """The first m pool points in pool (training) order, equal weights: the convention of
    libraries that fit their curvature on the first examples of the dataset (kronfluence fits
    its factors on the first ones in order). Deterministic: every seed gives the same subset.
    A baseline to compare against, not a recommendation: a dataset stored by class gives it one
    class."""

    name = "first"
    uses_statistics = False
    deterministic = True

    def _select(self, pool: Pool, m: int, rng: np.random.Generator):
        return np.arange(m), np.ones(m)
