"""Samplers that match the pool's distribution of penultimate features."""

from __future__ import annotations

import numpy as np

from repif.samplers.base import Pool, Sampler, proportional_allocation
from repif.validation import check_choice, check_count

#: Default number of k-means clusters, capped by m: enough strata to separate the classes'
#: feature modes (≈ 3 per class for 10 classes) without spending k-means time on tiny clusters.
DEFAULT_CLUSTERS = 32

#: Random Fourier features approximating the RBF kernel in herding: 512 keeps the kernel error
#: around 1/√512 ≈ 4%, well under the gaps between herding scores that decide a pick.
HERDING_FEATURES = 512


class FeatureKMeansSampler(Sampler):
    """k-means strata on the pool's features; budget ∝ cluster size.

    ``pick="uniform"`` draws uniformly within each cluster with weight (N_k/N)/m_k — stratified
    sampling, so C stays unbiased while the subset covers every feature mode. ``pick="nearest"``
    takes the points nearest each centroid (deterministic per clustering, but prototypical,
    confident points carry little curvature: consistent yet biased). If m is smaller than the
    number of clusters, ``n_clusters`` is reduced to m.
    """

    name = "feature-kmeans"

    def __init__(self, n_clusters: int = DEFAULT_CLUSTERS, pick: str = "uniform") -> None:
        check_choice(pick, ("uniform", "nearest"), "pick")
        self.n_clusters, self.pick = check_count(n_clusters, "n_clusters"), pick

    def _select(self, pool: Pool, m: int, rng: np.random.Generator):
        feats = pool.features.double().numpy()
        k = min(self.n_clusters, m, len(pool))
        from sklearn.cluster import KMeans  # imported here: ~90 MB and seconds, rarely needed

        km = KMeans(n_clusters=k, n_init=1, random_state=int(rng.integers(2**31)))
        labels = km.fit_predict(feats)
        sizes = np.bincount(labels, minlength=k)
        alloc = proportional_allocation(sizes, m)
        n = len(pool)
        picked, weights = [], []
        for c in np.flatnonzero(alloc):
            members = np.flatnonzero(labels == c)
            if self.pick == "uniform":
                chosen = rng.choice(members, size=int(alloc[c]), replace=False)
            else:
                dist = np.linalg.norm(feats[members] - km.cluster_centers_[c], axis=1)
                chosen = members[np.argsort(dist, kind="stable")[: alloc[c]]]
            picked.append(chosen)
            weights.append(np.full(len(chosen), sizes[c] / n / alloc[c]))
        return np.concatenate(picked), np.concatenate(weights)


class FeatureHerdingSampler(Sampler):
    """Kernel herding on features: greedily picks points whose empirical feature distribution
    matches the pool's in maximum mean discrepancy (RBF kernel via random Fourier features,
    bandwidth = median pairwise distance on a sample). Equal weights 1/m. The seed draws the
    Fourier features and the first pick's tie-breaking, so different seeds give different sets.
    """

    name = "feature-herding"

    def __init__(self, n_features: int = HERDING_FEATURES) -> None:
        self.n_features = check_count(n_features, "n_features")

    def _select(self, pool: Pool, m: int, rng: np.random.Generator):
        x = pool.features.double().numpy()
        x = (x - x.mean(0)) / (x.std(0) + 1e-12)
        probe = x[rng.choice(len(x), size=min(len(x), 500), replace=False)]
        d = np.sqrt(((probe[:, None, :] - probe[None, :, :]) ** 2).sum(-1))
        bandwidth = np.median(d[d > 0]) if np.any(d > 0) else 1.0
        omega = rng.normal(scale=1.0 / bandwidth, size=(x.shape[1], self.n_features))
        phase = rng.uniform(0, 2 * np.pi, size=self.n_features)
        phi = np.sqrt(2.0 / self.n_features) * np.cos(x @ omega + phase)  # (N, D)
        target = phi.mean(0)
        running = np.zeros(len(x))  # Σ_{chosen} k(x, x_j)
        base = phi @ target  # k-mean embedding at each candidate
        jitter = rng.uniform(0, 1e-9, size=len(x))  # seeded tie-breaking
        taken = np.zeros(len(x), dtype=bool)
        chosen = []
        for t in range(m):
            score = base - running / (t + 1) + jitter
            score[taken] = -np.inf
            j = int(np.argmax(score))
            chosen.append(j)
            taken[j] = True
            running += phi @ phi[j]
        return np.asarray(chosen), np.ones(m)
