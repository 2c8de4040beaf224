"""Samplers driven by the pool's logits, which set the GGN weight Λ_i = diag(p_i) − p_i p_iᵀ."""

from __future__ import annotations

import numpy as np
import torch

from repif.samplers.base import Pool, Sampler, proportional_allocation, stratified_draw
from repif.validation import check_count

LOGIT_STATISTICS = ("confidence", "margin", "entropy")
PROXIES = ("gini", "gini-feature", "leverage")

#: The leverage proxy's default ridge, relative to the mean eigenvalue of the last layer's
#: Kronecker curvature E[Λ] ⊗ E[f̃f̃ᵀ] (docs/design.md, "Samplers"): small enough that rare
#: directions count, large enough that round-off directions of a rank-deficient E[f̃f̃ᵀ] do not.
LEVERAGE_RIDGE = 1e-3


def logit_statistic(pool: Pool, statistic: str) -> np.ndarray:
    """(k,) true-class probability, top-1 minus top-2 probability margin, or entropy."""
    p = pool.probabilities
    if statistic == "confidence":
        return p[torch.arange(len(pool)), pool.labels].numpy()
    if statistic == "margin":
        top2 = torch.topk(p, min(2, p.shape[1]), dim=1).values
        return (top2[:, 0] - top2[:, -1]).numpy()
    if statistic == "entropy":
        return -(p * torch.log(p.clamp_min(1e-300))).sum(1).numpy()
    raise ValueError(f"unknown statistic {statistic!r}; known: {', '.join(LOGIT_STATISTICS)}")


def curvature_proxy(pool: Pool, proxy: str, ridge: float | None = None) -> np.ndarray:
    """(k,) per-sample curvature proxy: 1 − Σp² (= tr Λ), optionally × (‖feature‖² + 1), or
    the point's ridge leverage (:func:`leverage_scores`).

    tr Λ_i is the GGN's output-space curvature; (‖f‖² + 1) is the last layer's Jacobian scale.
    """
    if proxy == "leverage":
        return leverage_scores(pool, ridge).numpy()
    p = pool.probabilities
    gini = (1.0 - (p * p).sum(1)).clamp_min(0.0)
    if proxy == "gini":
        return gini.numpy()
    if proxy == "gini-feature":
        return (gini * (pool.features.double().pow(2).sum(1) + 1.0)).numpy()
    raise ValueError(f"unknown proxy {proxy!r}; known: {', '.join(PROXIES)}")


def check_ridge(ridge: object) -> float:
    """``ridge`` as a float; ValueError unless it is a positive number (bools refused)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ValueError(f"ridge must be a positive number (or None for a relative one), "
                         f"got {ridge!r}")
    return float(ridge)


def leverage_scores(pool: Pool, ridge: float | None = None) -> torch.Tensor:
    """(k,) ridge leverage of each point in the last layer's curvature, from logits and features.

    The last layer's GGN block of point i is Λ_i ⊗ f̃_i f̃_iᵀ (f̃ = [f, 1]); its ridge leverage
    τ_i = tr(G_i (K + ρI)⁻¹) is taken against the pool's Kronecker curvature
    K = E[Λ] ⊗ E[f̃f̃ᵀ] = (Q_S s Q_Sᵀ) ⊗ (Q_A a Q_Aᵀ), so in K's eigenbasis
    τ_i = Σ_jk diag(Q_SᵀΛ_iQ_S)_j (Q_Aᵀf̃_i)_k² / (s_j a_k + ρ). Sampling ∝ τ is the classical
    recipe for approximating K + ρI spectrally from few points: a point counts by how much it
    adds in directions the rest of the pool covers thinly, not by its raw size (which
    ``gini-feature`` measures). ``ridge`` is ρ in the curvature's units (the estimator's
    damping is a natural choice); None: ``LEVERAGE_RIDGE`` × the mean eigenvalue of K.
    Cost O(k(C² + Cd + d²) + d³), no backward pass.
    """
    p = pool.probabilities  # (k, C) float64
    f = pool.features.double()
    f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)  # (k, d + 1)
    lam_mean = torch.diag(p.mean(0)) - p.T @ p / len(p)  # E[Λ] (C, C)
    s, q_s = torch.linalg.eigh(lam_mean)
    a, q_a = torch.linalg.eigh(f.T @ f / len(f))
    s, a = s.clamp_min(0.0), a.clamp_min(0.0)
    ridge = (LEVERAGE_RIDGE * float(s.mean() * a.mean()) if ridge is None
             else check_ridge(ridge))
    u = p @ q_s.square() - (p @ q_s).square()  # diag(Q_Sᵀ Λ_i Q_S), (k, C)
    v = (f @ q_a).square()  # (Q_Aᵀ f̃_i)², (k, d + 1)
    inv = 1.0 / (s[:, None] * a[None, :] + ridge)  # (C, d + 1)
    return ((u @ inv) * v).sum(1).clamp_min(0.0)


class LogitStratifiedSampler(Sampler):
    """Within each class, quantile strata of a logit statistic; proportional allocation.

    The subset keeps the pool's spread of confidence in every class. The budget is split across
    classes first (every class gets a draw when m ≥ number of classes), then across each class's
    bins; weight (N_s/N)/m_s keeps C unbiased. A class with fewer draws than bins spreads them
    over some of its bins, which then stand for the whole class (weights renormalised within it).
    """

    name = "logit-stratified"

    def __init__(self, statistic: str = "confidence", n_bins: int = 4) -> None:
        if statistic not in LOGIT_STATISTICS:
            known = ", ".join(LOGIT_STATISTICS)
            raise ValueError(f"unknown statistic {statistic!r}; known: {known}")
        self.statistic, self.n_bins = statistic, check_count(n_bins, "n_bins")

    def _select(self, pool: Pool, m: int, rng: np.random.Generator):
        # Two levels, so a small m still spreads over the classes: allocate across classes
        # first, then across each class's confidence bins.
        stat = logit_statistic(pool, self.statistic)
        _, cls = np.unique(pool.labels.numpy(), return_inverse=True)
        class_sizes = np.bincount(cls)
        picked, weights = [], []
        for c, k in enumerate(proportional_allocation(class_sizes, m, rng)):
            if k == 0:
                continue
            members = np.flatnonzero(cls == c)
            ranks = np.argsort(np.argsort(stat[members], kind="stable"), kind="stable")
            local, w = stratified_draw(ranks * self.n_bins // len(members), int(k), rng)
            picked.append(members[local])
            weights.append(w / w.sum() * class_sizes[c] / len(pool))
        return np.concatenate(picked), np.concatenate(weights)


def inclusion_probabilities(proxy: np.ndarray, m: int) -> np.ndarray:
    """π_i ∝ proxy with Σπ = m and every π_i ≤ 1 (points that would exceed 1 are capped at 1).

    A zero proxy gets a floor so that every point can be drawn (keeps the estimate unbiased).
    """
    q = np.asarray(proxy, dtype=np.float64)
    q = np.maximum(q, 1e-12 * max(q.max(), 1e-300))
    pi = np.zeros_like(q)
    capped = np.zeros(len(q), dtype=bool)
    for _ in range(len(q)):
        free = ~capped
        pi[free] = (m - capped.sum()) * q[free] / q[free].sum()
        pi[capped] = 1.0
        over = free & (pi > 1.0)
        if not over.any():
            break
        capped |= over
    return np.clip(pi, 0.0, 1.0)


class LogitImportanceSampler(Sampler):
    """Probability-proportional-to-curvature sampling with Horvitz–Thompson weights.

    Inclusion probabilities π_i ∝ proxy (``"gini"``: 1 − Σp², ``"gini-feature"``, or
    ``"leverage"``: ridge leverage in the last layer, :func:`leverage_scores`, with ``ridge``),
    capped at 1; systematic sampling over a seeded random order draws exactly m distinct points
    with those probabilities. Weight 1/(N π_i) makes Σ_T w_i G_i an unbiased estimate of the pool
    mean; the weights are then divided by their sum (``self_normalize=True``, the contract's
    Σw = 1: a ratio estimator with O(1/m) bias and lower variance). With
    ``self_normalize=False`` the raw, exactly unbiased weights are returned (their sum is 1 only
    in expectation).
    """

    name = "logit-importance"

    def __init__(self, proxy: str = "gini", self_normalize: bool = True,
                 ridge: float | None = None) -> None:
        if proxy not in PROXIES:
            raise ValueError(f"unknown proxy {proxy!r}; known: {', '.join(PROXIES)}")
        if not isinstance(self_normalize, bool):
            raise TypeError(f"self_normalize must be True or False, got {self_normalize!r}")
        if ridge is not None and proxy != "leverage":
            raise ValueError("ridge configures proxy='leverage'; pass it with that proxy")
        self.proxy, self.self_normalize = proxy, self_normalize
        self.ridge = None if ridge is None else check_ridge(ridge)

    def _select(self, pool: Pool, m: int, rng: np.random.Generator):
        n = len(pool)
        pi = inclusion_probabilities(curvature_proxy(pool, self.proxy, self.ridge), m)
        order = rng.permutation(n)
        cum = np.concatenate([[0.0], np.cumsum(pi[order])])
        cum *= m / cum[-1]  # remove round-off so exactly m points are hit
        ticks = rng.uniform(0.0, 1.0) + np.arange(m)
        pos = np.searchsorted(cum, ticks, side="right") - 1
        local = order[np.clip(pos, 0, n - 1)]
        return local, 1.0 / (n * pi[local])

    @property
    def normalizes(self) -> bool:
        return self.self_normalize
