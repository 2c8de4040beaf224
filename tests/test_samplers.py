"""Property tests for every registered curvature-subset sampler.

Pools are built directly from synthetic labels, logits and features, with global indices that
are not 0..k-1, so a sampler that confuses pool positions with training indices fails. The
unbiasedness checks average Σ_T w_i G_i over many seeds and compare it with the pool mean of the
per-point G_i; the tolerance is a number of Monte-Carlo standard errors (SE = std over seeds /
√seeds) per coordinate. All randomness is seeded, so every check is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from repif import samplers
from repif.curvature.operator import CurvatureOperator
from repif.estimator import InfluenceEstimator
from repif.fitting import candidate_pool
from repif.samplers import Pool
from repif.samplers.logits import inclusion_probabilities

ALL = samplers.names()
NUM_CLASSES = 6  # class 5 never occurs in the synthetic pool: samplers must cope with that
CLASS_SIZES = (30, 24, 24, 18, 24)  # classes 0..4; 120 points
N = sum(CLASS_SIZES)
#: Samplers whose weights are documented to make Σ_T w_i G_i unbiased for the pool mean
#: (stratified designs with every stratum drawn; for logit-importance see the HT tests).
UNBIASED = {
    "random": {},
    "stratified": {},
    "logit-stratified": {},
    "feature-kmeans": {"n_clusters": 4, "pick": "uniform"},
}
#: Monte-Carlo tolerance in standard errors per coordinate. With ≤ 8 coordinates per check a
#: 4.5-SE excursion of an unbiased estimator has probability < 1e-4.
N_SE = 4.5


def synthetic_stats(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(labels, logits, features) for N points: features in blobs per class, logits that make
    some points confident and some uncertain (so curvature proxies vary)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(CLASS_SIZES)])
    labels = labels[torch.randperm(N, generator=g)]
    centres = 3.0 * torch.randn(NUM_CLASSES, 8, generator=g, dtype=torch.float64)
    feats = centres[labels] + torch.randn(N, 8, generator=g, dtype=torch.float64)
    scale = torch.rand(N, 1, generator=g, dtype=torch.float64) * 6.0
    logits = torch.randn(N, NUM_CLASSES, generator=g, dtype=torch.float64)
    logits = logits + scale * nn.functional.one_hot(labels, NUM_CLASSES).double()
    return labels, logits, feats


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-12) -> None:
    """Same shape and dtype, equal to ``rtol`` relative error (float64 round-off)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=0.0), (actual, expected)


def make_pool(
    labels: Tensor | None = None,
    logits: Tensor | None = None,
    feats: Tensor | None = None,
    *,
    calls: list | None = None,
) -> Pool:
    """A pool over global indices 1, 4, 7, … (every 3rd training point)."""
    if labels is None:
        labels, logits, feats = synthetic_stats()
    indices = torch.arange(len(labels), dtype=torch.int64) * 3 + 1

    def stats():
        if calls is not None:
            calls.append(1)
        return logits.clone(), feats.clone()

    return Pool(indices, labels.clone(), NUM_CLASSES, stats=stats)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: thread fan-out only adds latency (a lot, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stats():
    return synthetic_stats()


def _pool(stats) -> Pool:
    return make_pool(*stats)


# ---------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("m", [1, 7, 30, N])
def test_subset_contract(name, m, stats):
    pool = _pool(stats)
    sub = samplers.build(name).select(pool, m, seed=3)
    assert len(sub) == m and sub.indices.shape == (m,) and sub.weights.shape == (m,)
    assert sub.indices.dtype == torch.int64 and sub.weights.dtype == torch.float64
    assert torch.isin(sub.indices, pool.indices).all(), "indices must be global pool indices"
    assert torch.unique(sub.indices).numel() == m, "indices must be distinct"
    assert torch.isfinite(sub.weights).all() and (sub.weights > 0).all()
    assert abs(float(sub.weights.sum()) - 1.0) <= 1e-12
    if m == N:  # the whole pool: every point once, every weight 1/N
        assert torch.equal(torch.sort(sub.indices).values, pool.indices)
        assert_close(sub.weights, torch.full((N,), 1.0 / N, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL)
def test_same_seed_is_bit_identical(name, stats):
    a = samplers.build(name).select(_pool(stats), 17, seed=11)
    b = samplers.build(name).select(_pool(stats), 17, seed=11)  # fresh sampler and pool
    sampler = samplers.build(name)
    pool = _pool(stats)
    c = sampler.select(pool, 17, seed=11)
    sampler.select(pool, 17, seed=12)  # an interleaved draw must not leak state
    d = sampler.select(pool, 17, seed=11)
    for other in (b, c, d):
        assert torch.equal(a.indices, other.indices)
        assert torch.equal(a.weights, other.weights)


def tiny_problem(n: int = 300, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """Linear(8, 3) in float64 and n random points with labels from a noisy linear rule."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    w_true = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = (x @ w_true + 0.8 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Linear(8, 3).double()
    return model, x, y


@pytest.mark.parametrize("name", ALL)
def test_estimator_subsets_are_bit_identical_per_seed(name):
    """Through the public API: the same (sampler, sample_size, seed) on the same pool gives the
    same subset, bit for bit; another seed gives another subset."""
    model, x, y = tiny_problem()
    pool = torch.arange(2, 300, 3)

    def subset(seed):
        est = InfluenceEstimator(model, (x, y), sampler=name, sample_size=9, seed=seed)
        return est.fit(pool).subset

    a, b, c = subset(4), subset(4), subset(5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert torch.isin(a.indices, pool).all()
    if samplers.REGISTRY.get(name).deterministic:  # first: the same points whatever the seed
        assert torch.equal(a.indices, c.indices)
        return
    assert set(a.indices.tolist()) != set(c.indices.tolist())


@pytest.mark.parametrize("name", ALL)
def test_different_seeds_give_different_subsets(name, stats):
    sampler, pool = samplers.build(name), _pool(stats)
    sets = [frozenset(sampler.select(pool, 12, seed=s).indices.tolist()) for s in range(4)]
    if sampler.deterministic:
        assert len(set(sets)) == 1
        return
    assert sets[0] != sets[1]
    assert len(set(sets)) >= 3


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("m", [0, -1, N + 1, 2.5, True])
def test_bad_sizes_raise(name, m, stats):
    with pytest.raises(ValueError):
        samplers.build(name).select(_pool(stats), m, seed=0)


@pytest.mark.parametrize("name", ALL)
def test_numpy_integer_size_is_accepted(name, stats):
    sub = samplers.build(name).select(_pool(stats), np.int64(5), seed=0)
    assert len(sub) == 5


@pytest.mark.parametrize("name", ALL)
def test_empty_pool_raises(name):
    empty = Pool(
        torch.empty(0, dtype=torch.int64),
        torch.empty(0, dtype=torch.int64),
        NUM_CLASSES,
        stats=lambda: (torch.empty(0, NUM_CLASSES), torch.empty(0, 8)),
    )
    with pytest.raises(ValueError, match="empty"):
        samplers.build(name).select(empty, 1, seed=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("where", ["logits", "features"])
def test_non_finite_stats_raise(name, where, stats):
    """A sampler that reads the pool's logits/features must refuse NaN in either of them.

    Samplers that never call ``stats`` (the baselines draw on labels alone, with no forward
    pass) never see the bad values and simply work.
    """
    calls: list = []
    samplers.build(name).select(make_pool(*stats, calls=calls), 5, seed=0)
    labels, logits, feats = (t.clone() for t in stats)
    (logits if where == "logits" else feats)[7, 1] = float("nan")
    pool = make_pool(labels, logits, feats)
    if not calls:
        samplers.build(name).select(pool, 5, seed=0)  # never looks at the bad statistics
        return
    with pytest.raises(ValueError, match="non-finite"):
        samplers.build(name).select(pool, 5, seed=0)


@pytest.mark.parametrize("name", ALL)
def test_absent_classes_are_ignored(name, stats):
    """Class 5 never occurs, and class 0 is removed (as in class removal): draws only from the
    rest, and a stratified sampler at m = number of present classes sees each of them once."""
    labels, logits, feats = stats
    keep = labels != 0
    pool = make_pool(labels[keep], logits[keep], feats[keep])
    sub = samplers.build(name).select(pool, 4, seed=5)
    drawn = pool.labels[torch.searchsorted(pool.indices, sub.indices)]
    assert set(drawn.tolist()) <= {1, 2, 3, 4}
    if name == "stratified":
        assert sorted(drawn.tolist()) == [1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["identical features", "saturated logits"])
def test_degenerate_statistics(name, case, stats):
    """All features equal (one k-means cluster, zero feature spread) or logits so confident
    that 1 − Σp² is exactly 0 everywhere: still m distinct pool points with weights summing
    to 1."""
    labels, logits, feats = stats
    if case == "identical features":
        feats = torch.zeros_like(feats)
    else:
        logits = 1e4 * nn.functional.one_hot(labels, NUM_CLASSES).double()
    for m in (1, 10, N):
        sub = samplers.build(name).select(make_pool(labels, logits, feats), m, seed=0)
        assert len(sub) == m and torch.unique(sub.indices).numel() == m
        assert torch.isin(sub.indices, make_pool(labels, logits, feats).indices).all()
        assert torch.isfinite(sub.weights).all() and (sub.weights > 0).all()
        assert abs(float(sub.weights.sum()) - 1.0) <= 1e-12


# ------------------------------------------------------------------- fewer draws than strata
def test_stratified_with_m_below_class_count(stats):
    """Documented: some classes are left out, each drawn class gets one point and the weights
    are (N_c/N) renormalised over the drawn classes."""
    pool = _pool(stats)
    sub = samplers.build("stratified").select(pool, 3, seed=0)
    drawn = pool.labels[torch.searchsorted(pool.indices, sub.indices)]
    assert len(set(drawn.tolist())) == 3
    sizes = torch.tensor(CLASS_SIZES, dtype=torch.float64)[drawn]
    assert_close(sub.weights, sizes / sizes.sum())


def test_logit_stratified_with_m_below_strata_count(stats):
    """5 classes × 4 bins = 20 strata; m = 6 → six distinct strata, one point each."""
    from repif.samplers.logits import logit_statistic

    pool = _pool(stats)
    sub = samplers.build("logit-stratified", {"n_bins": 4}).select(pool, 6, seed=0)
    local = torch.searchsorted(pool.indices, sub.indices).numpy()
    stat = logit_statistic(pool, "confidence")
    labels = pool.labels.numpy()
    strata = set()
    for i in local:
        members = np.flatnonzero(labels == labels[i])
        rank = int((stat[members] < stat[i]).sum())
        strata.add((int(labels[i]), rank * 4 // len(members)))
    assert len(strata) == 6
    assert abs(float(sub.weights.sum()) - 1.0) <= 1e-12


def test_logit_stratified_covers_every_class_when_m_allows(stats):
    """m = 8 ≥ 5 classes but < 20 (class, bin) strata: every class is drawn, for every seed,
    as the class docstring promises. Regression (fixed in 827c07f): largest-remainder allocation
    over all strata filled the lowest-numbered ones, so every seed drew only classes 0 and 1
    here (and on digits with class 0 removed, m = 16 never drew classes 7–9)."""
    pool = _pool(stats)
    sampler = samplers.build("logit-stratified", {"n_bins": 4})
    for seed in range(3):
        sub = sampler.select(pool, 8, seed=seed)
        drawn = pool.labels[torch.searchsorted(pool.indices, sub.indices)]
        assert set(drawn.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("pick", ["uniform", "nearest"])
def test_kmeans_with_m_below_cluster_count(pick, stats):
    """Documented: n_clusters is reduced to m, so m = 3 with 32 clusters still gives 3 points."""
    sub = samplers.build("feature-kmeans", {"n_clusters": 32, "pick": pick}).select(
        _pool(stats), 3, seed=0
    )
    assert len(sub) == 3 and torch.unique(sub.indices).numel() == 3
    assert abs(float(sub.weights.sum()) - 1.0) <= 1e-12


def test_kmeans_nearest_is_deterministic_in_the_clustering_seed():
    """pick="nearest" has no randomness beyond the clustering: the same seed gives the same
    subset, and on well-separated blobs (a unique clustering) every seed gives the same
    subset: the point nearest each blob's centre."""
    g = torch.Generator().manual_seed(1)
    k, per = 4, 25
    centres = 50.0 * torch.eye(k, 8, dtype=torch.float64)
    labels = torch.arange(k).repeat_interleave(per)
    feats = centres[labels] + torch.randn(k * per, 8, generator=g, dtype=torch.float64)
    logits = torch.randn(k * per, NUM_CLASSES, generator=g, dtype=torch.float64)
    sampler = samplers.build("feature-kmeans", {"n_clusters": k, "pick": "nearest"})
    subs = [sampler.select(make_pool(labels, logits, feats), k, seed=s) for s in range(5)]
    for s in subs[1:]:
        assert torch.equal(torch.sort(s.indices).values, torch.sort(subs[0].indices).values)
    again = sampler.select(make_pool(labels, logits, feats), k, seed=0)
    assert torch.equal(again.indices, subs[0].indices)
    assert torch.equal(again.weights, subs[0].weights)
    # the nearest point to each blob's mean, as global indices 3i + 1
    expected = []
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        d = (feats[members] - feats[members].mean(0)).norm(dim=1)
        expected.append(int(members[torch.argmin(d)]) * 3 + 1)
    assert sorted(subs[0].indices.tolist()) == sorted(expected)
    assert_close(subs[0].weights, torch.full((k,), 1.0 / k, dtype=torch.float64))


# ------------------------------------------------------------------------------ unbiasedness
def _weighted_sums(sampler, pool: Pool, per_point: Tensor, m: int, seeds: int) -> Tensor:
    """(seeds, d) Σ_T w_i G_i for seeds 0..seeds-1; ``per_point`` is (N, d) in pool order."""
    out = torch.empty(seeds, per_point.shape[1], dtype=torch.float64)
    pos = {int(g): i for i, g in enumerate(pool.indices)}
    for s in range(seeds):
        sub = sampler.select(pool, m, seed=s)
        local = torch.tensor([pos[int(i)] for i in sub.indices])
        out[s] = sub.weights @ per_point[local]
    return out


def _assert_unbiased(estimates: Tensor, truth: Tensor, n_se: float = N_SE) -> None:
    mean = estimates.mean(0)
    se = estimates.std(0) / estimates.shape[0] ** 0.5
    z = (mean - truth).abs() / se
    assert bool((z <= n_se).all()), f"bias of {z.max():.2f} standard errors (limit {n_se})"


def _per_point_vectors(n: int, d: int = 6, seed: int = 2) -> Tensor:
    """Random G_i whose size varies a lot across points (so weighting errors show)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(2.0 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    return scale * (1.0 + torch.randn(n, d, generator=g, dtype=torch.float64))


def test_logit_importance_horvitz_thompson_is_unbiased(stats):
    """self_normalize=False: the raw weights 1/(N π_i) make Σ_T w_i G_i exactly unbiased for
    (1/N) Σ_i G_i. 2,000 seeds, |mean − truth| ≤ 4.5 SE per coordinate."""
    pool = _pool(stats)
    sampler = samplers.build("logit-importance", {"self_normalize": False})
    per_point = _per_point_vectors(N)
    est = _weighted_sums(sampler, pool, per_point, m=10, seeds=2000)
    _assert_unbiased(est, per_point.mean(0))
    # and the raw weights are exactly 1/(N π_i): Σ w is 1 only in expectation
    sub = sampler.select(pool, 10, seed=0)
    from repif.samplers.logits import curvature_proxy

    pi = torch.from_numpy(inclusion_probabilities(curvature_proxy(pool, "gini"), 10))
    local = torch.searchsorted(pool.indices, sub.indices)
    assert_close(sub.weights, 1.0 / (N * pi[local]))


def test_logit_importance_self_normalised_weights_are_proportional(stats):
    """Default (self_normalize=True): the same draw with weights ∝ 1/π_i summing to 1."""
    pool = _pool(stats)
    raw = samplers.build("logit-importance", {"self_normalize": False}).select(pool, 10, seed=4)
    norm = samplers.build("logit-importance").select(pool, 10, seed=4)
    assert torch.equal(raw.indices, norm.indices)
    assert_close(norm.weights, raw.weights / raw.weights.sum())


@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_stratified_designs_are_unbiased(name, stats):
    """Uniform draws within strata with weight (N_s/N)/m_s: unbiased whenever every stratum gets
    a draw (m = 30 ≥ every stratum count here; class sizes 18–30). 300 seeds, 4.5 SE."""
    pool = _pool(stats)
    sampler = samplers.build(name, UNBIASED[name])
    per_point = _per_point_vectors(N, seed=3)
    seeds = 150 if name == "feature-kmeans" else 300  # k-means costs ~7 ms a draw
    est = _weighted_sums(sampler, pool, per_point, m=30, seeds=seeds)
    _assert_unbiased(est, per_point.mean(0))


def test_stratified_is_unbiased_with_a_small_class():
    """Classes of 2, 40, 40, 38 points and m = 4 ≥ 4 classes: plain largest-remainder
    allocation gives [0, 2, 1, 1], so class 0 would never be drawn and its share of the pool
    mean would be lost (a bug fixed in 59b5c1c); every class must get a draw."""
    sizes = (2, 40, 40, 38)
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(sizes)])
    n = len(labels)
    pool = make_pool(
        labels, torch.zeros(n, NUM_CLASSES, dtype=torch.float64), torch.zeros(n, 8)
    )
    g = torch.Generator().manual_seed(5)
    per_point = nn.functional.one_hot(labels, 4).double()  # G_i = e_(class of i) + noise
    per_point = per_point + 0.1 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    sub = samplers.build("stratified").select(pool, 4, seed=0)
    assert sorted(labels[(sub.indices - 1) // 3].tolist()) == [0, 1, 2, 3]
    est = _weighted_sums(samplers.build("stratified"), pool, per_point, m=4, seeds=300)
    _assert_unbiased(est, per_point.mean(0))


# ---------------------------------------------------------------- inclusion probabilities
def test_inclusion_probabilities_sum_to_m_and_are_capped():
    rng = np.random.default_rng(0)
    proxy = rng.exponential(size=200)
    proxy[:5] = 1e3  # would exceed 1: capped
    proxy[5:8] = 0.0  # gets a positive floor, so it can still be drawn
    for m in (1, 10, 50, 199, 200):
        pi = inclusion_probabilities(proxy, m)
        assert pi.shape == (200,)
        assert abs(pi.sum() - m) <= 1e-9 * m
        assert (pi <= 1.0).all() and (pi > 0).all()
    pi = inclusion_probabilities(proxy, 50)
    assert (pi[:5] == 1.0).all()
    free = np.flatnonzero((pi < 1.0) & (proxy > 0))  # the uncapped points: π ∝ proxy
    assert len(free) > 150
    ratio = pi[free] / proxy[free]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    np.testing.assert_array_equal(inclusion_probabilities(proxy, 200), np.ones(200))


def test_empirical_inclusion_frequency_matches(stats):
    """Over 1,200 seeds each point is drawn with frequency π_i: every |z| ≤ 5 (Bonferroni over
    120 points) and the mean z² is that of a χ²(1) average (1 ± 0.5)."""
    from repif.samplers.logits import curvature_proxy

    pool = _pool(stats)
    m, seeds = 12, 1200
    pi = inclusion_probabilities(curvature_proxy(pool, "gini"), m)
    assert pi.max() < 1.0 and pi.min() < 0.5 * pi.max()  # a non-trivial design
    sampler = samplers.build("logit-importance")
    counts = np.zeros(N)
    for s in range(seeds):
        counts[torch.searchsorted(pool.indices, sampler.select(pool, m, seed=s).indices)] += 1
    freq = counts / seeds
    z = (freq - pi) / np.sqrt(pi * (1 - pi) / seeds)
    assert np.abs(z).max() <= 5.0
    assert 0.5 <= float(np.mean(z**2)) <= 1.5


def test_logit_importance_includes_capped_points_always():
    """Points whose π is capped at 1 are in every subset."""
    labels, logits, feats = synthetic_stats()
    logits = logits.clone()
    logits[:] = 30.0 * nn.functional.one_hot(labels, NUM_CLASSES).double()  # all confident
    logits[:3] = 0.0  # three maximally uncertain points hold nearly all the curvature
    pool = make_pool(labels, logits, feats)
    sampler = samplers.build("logit-importance")
    for s in range(20):
        sub = sampler.select(pool, 8, seed=s)
        assert set(pool.indices[:3].tolist()) <= set(sub.indices.tolist())


def test_leverage_scores_match_a_dense_ridge_leverage():
    """proxy="leverage": τ_i = tr((Λ_i ⊗ f̃_i f̃_iᵀ)(E[Λ] ⊗ E[f̃f̃ᵀ] + ρI)⁻¹), formed densely
    here from the softmax and the features (an independent route: no eigenbasis); float64
    round-off bounds the difference."""
    from repif.samplers.logits import leverage_scores

    labels, logits, feats = synthetic_stats()
    pool = make_pool(labels, logits, feats)
    p = torch.softmax(logits.double(), 1)
    f = torch.cat([feats.double(), torch.ones(len(feats), 1, dtype=torch.float64)], 1)
    lams = [torch.diag(q) - torch.outer(q, q) for q in p]
    k = torch.kron(sum(lams) / len(lams), f.T @ f / len(f))
    inv = torch.linalg.inv(k + 0.05 * torch.eye(len(k), dtype=torch.float64))
    dense = torch.stack([torch.trace(torch.kron(lam, torch.outer(x, x)) @ inv)
                         for lam, x in zip(lams, f, strict=True)])
    torch.testing.assert_close(leverage_scores(pool, ridge=0.05), dense, rtol=1e-9, atol=1e-12)
    # the default ridge is LEVERAGE_RIDGE × the mean eigenvalue of the Kronecker curvature
    from repif.samplers.logits import LEVERAGE_RIDGE

    rel = LEVERAGE_RIDGE * float(torch.linalg.eigvalsh(k).mean())
    torch.testing.assert_close(leverage_scores(pool), leverage_scores(pool, ridge=rel),
                               rtol=1e-9, atol=1e-12)


def test_leverage_importance_is_unbiased(stats):
    """logit-importance with proxy="leverage" and raw weights: Σ_T w_i G_i unbiased for the
    pool mean, as for every proxy (2,000 seeds, 4.5 SE per coordinate)."""
    pool = _pool(stats)
    sampler = samplers.build("logit-importance",
                             {"proxy": "leverage", "self_normalize": False, "ridge": 0.1})
    per_point = _per_point_vectors(N, seed=4)
    est = _weighted_sums(sampler, pool, per_point, m=10, seeds=2000)
    _assert_unbiased(est, per_point.mean(0))


@pytest.mark.parametrize("options, match", [
    ({"proxy": "leverage", "ridge": 0.0}, "ridge must be a positive number"),
    ({"proxy": "leverage", "ridge": "big"}, "ridge must be a positive number"),
    ({"proxy": "gini", "ridge": 0.1}, "ridge configures proxy='leverage'"),
])
def test_leverage_ridge_is_checked(options, match):
    with pytest.raises(ValueError, match=match):
        samplers.build("logit-importance", options)


# ---------------------------------------------------------- unbiasedness with a real GGN
def test_logit_importance_curvature_product_is_unbiased():
    """Linear(8, 3) in float64 on random data, curvature GGN, pool = every 3rd training point.
    Averaged over 200 seeds, the HT-weighted subset product C_T v matches the full-pool C_R v
    within 4.5 SE per coordinate (27 coordinates), and in norm within 2 × the root of the summed
    squared SEs (the expected norm of the Monte-Carlo error is about 1 ×)."""
    n = 300
    model, x, y = tiny_problem(n)
    g = torch.Generator().manual_seed(1)
    est = InfluenceEstimator(
        model, (x, y), curvature="ggn", sampler="logit-importance",
        sampler_options={"self_normalize": False},
    )
    pool_idx = torch.arange(1, n, 3)
    pool = est.pool(pool_idx)
    v = torch.randn(est.num_params, generator=g, dtype=torch.float64)
    uniform = torch.full((len(pool_idx),), 1.0 / len(pool_idx), dtype=torch.float64)
    truth = CurvatureOperator(est.fm, x[pool_idx], y[pool_idx], uniform).matvec(v)
    m, seeds = 8, 200
    products = torch.empty(seeds, est.num_params, dtype=torch.float64)
    for s in range(seeds):
        sub = est.sampler.select(pool, m, seed=s)
        op = CurvatureOperator(est.fm, x[sub.indices], y[sub.indices], sub.weights)
        products[s] = op.matvec(v)
    _assert_unbiased(products, truth)
    se = products.std(0) / seeds**0.5
    assert float((products.mean(0) - truth).norm()) <= 2.0 * float(se.norm())


# ------------------------------------------------------------------------------ two-phase
@pytest.mark.parametrize("name,options", [("logit-importance", {"self_normalize": False}),
                                          ("logit-stratified", {})])
def test_two_phase_draws_stay_unbiased_for_the_whole_pool(digits_mlp, name, options):
    """candidates=c: the sampler picks m of c·m uniform candidates, reading only their
    statistics. Its weights estimate the candidates' mean, which estimates the pool's without
    bias, so Σ_T w_i G_i stays unbiased for the whole pool's mean. 2,000 seeds, 4.5 SE."""
    model, (x, y), _ = digits_mlp
    n, m = 300, 10
    est = InfluenceEstimator(model, (x[:n], y[:n]), sampler=name, sampler_options=options,
                                   sample_size=m, candidates=4)
    est.fitter.use_statistics(est.pool_statistics())  # 2,000 draws without 2,000 passes
    per_point = _per_point_vectors(n, seed=7)
    draws = [est.fitter.select(seed=s) for s in range(2000)]
    sums = torch.stack([d.weights @ per_point[d.indices] for d in draws])
    _assert_unbiased(sums, per_point.mean(0))
    # the draws really are two-phase: each seed's subset lies in its own 40 candidates
    cands = candidate_pool(torch.arange(n), m, 4, seed=3)
    assert cands.numel() == 40 and bool(torch.isin(draws[3].indices, cands).all())
    assert len({tuple(d.indices.tolist()) for d in draws[:50]}) == 50


def test_two_phase_reads_only_the_candidates_and_keeps_the_seed_contract(digits_mlp):
    model, train, _ = digits_mlp
    kw = dict(sampler="logit-importance", sample_size=16, candidates=8, seed=5)
    est = InfluenceEstimator(model, train, **kw)
    seen = []
    original = est.fitter.pool_statistics
    est.fitter.pool_statistics = lambda idx: (seen.append(idx.clone()), original(idx))[1]
    first = est.fitter.select()
    assert [s.numel() for s in seen] == [128]  # 8 × 16 candidates, not the 1,437 points
    again = InfluenceEstimator(model, train, **kw).fitter.select()
    assert torch.equal(first.indices, again.indices) and torch.equal(first.weights,
                                                                     again.weights)
    # the same subset whether the statistics come from a pass or were shared
    shared = InfluenceEstimator(model, train, pool_statistics=est.pool_statistics(), **kw)
    assert torch.equal(shared.fitter.select().indices, first.indices)
    # a pool no larger than c·m: the sampler sees the whole pool, as without candidates
    small = torch.arange(100)
    whole = InfluenceEstimator(model, train, **{**kw, "candidates": None})
    assert torch.equal(est.fitter.select(small).indices, whole.fitter.select(small).indices)
    for bad in (0.5, float("nan"), "8"):
        with pytest.raises((TypeError, ValueError), match="candidates"):
            InfluenceEstimator(model, train, **{**kw, "candidates": bad})
