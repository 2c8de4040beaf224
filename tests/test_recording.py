"""Pool statistics recorded during training: what they hold, when the estimator uses them, and
when it refuses them."""

from __future__ import annotations

import pytest
import torch

import repif
from repif import datasets, models
from repif.fitting import CurvatureFitter
from repif.recording import PoolStatistics, StatisticsRecorder, module_digest

N = 300


@pytest.fixture(scope="module")
def digits():
    ds = datasets.load("digits")
    x, y = ds.train
    return ds, (x[:N], y[:N])


def _trained(ds, train, **kw):
    return repif.train(models.build("mlp", ds), train, epochs=3, seed=0, **kw)


def test_a_recorder_with_still_weights_records_what_a_fresh_pass_computes(digits):
    """lr = 0: the weights do not move, so the recorded logits and features must be a fresh
    pass's, whatever the batch order (float32 round-off of other batch compositions)."""
    ds, (x, y) = digits
    model = models.build("mlp", ds).eval()
    rec = StatisticsRecorder(N, model)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for s in range(0, N, 64):
            idx = order[s : s + 64]
            rec.record(idx, model(x[idx]), y[idx])
    stats = rec.statistics(model)
    fresh = repif.InfluenceEstimator(model, (x, y)).pool_statistics()
    torch.testing.assert_close(stats.logits, fresh.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.features, fresh.features, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.targets, y)
    assert stats.model_digest == fresh.model_digest == module_digest(model)


def test_train_records_its_last_epoch_and_the_estimator_uses_it(digits, monkeypatch):
    ds, train = digits
    model = _trained(ds, train, record_statistics=True)
    stats = model.repif_statistics
    assert isinstance(stats, PoolStatistics) and stats.logits.shape == (N, 10)
    assert torch.equal(stats.targets, train[1])
    # stale by one epoch's steps, but the same model: predictions nearly all agree
    fresh = repif.InfluenceEstimator(model, train).pool_statistics()
    agree = (stats.logits.argmax(1) == fresh.logits.argmax(1)).double().mean()
    assert float(agree) >= 0.9
    passes = []
    monkeypatch.setattr(CurvatureFitter, "_pool_pass",
                        lambda self, *a: passes.append(1) or (_ for _ in ()).throw(
                            AssertionError("a pass although statistics were recorded")))
    kw = dict(sampler="logit-importance", sample_size=32, solver="cg", damping=0.1)
    auto = repif.InfluenceEstimator(model, train, **kw).fit()
    given = repif.InfluenceEstimator(model, train, pool_statistics=stats, **kw).fit()
    assert torch.equal(auto.subset.indices, given.subset.indices) and not passes
    # a model cast up after training keeps its statistics (the digest reads float64 values)
    assert repif.InfluenceEstimator(model.double(), train, **kw).fitter.statistics is not None


def test_statistics_of_another_model_or_other_data_are_refused(digits):
    ds, train = digits
    model = _trained(ds, train, record_statistics=True)
    stats = model.repif_statistics
    other = _trained(ds, train, lr=3e-2)
    with pytest.raises(ValueError, match="belong to another model"):
        repif.InfluenceEstimator(other, train, pool_statistics=stats)
    # left on a model trained further, they are not picked up: the estimator makes its pass
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    assert repif.InfluenceEstimator(model, train).fitter.statistics is None
    # other targets (same size): refused
    shuffled = PoolStatistics(stats.logits, stats.features, stats.targets.flip(0))
    with pytest.raises(ValueError, match="targets differ from the training targets"):
        repif.InfluenceEstimator(model, train, pool_statistics=shuffled)


def test_recorded_statistics_travel_with_a_cached_model(digits, tmp_path):
    ds, train = digits
    first = _trained(ds, train, record_statistics=True, cache_dir=tmp_path)
    again = _trained(ds, train, record_statistics=True, cache_dir=tmp_path)
    for field in ("logits", "features", "targets"):
        assert torch.equal(getattr(again.repif_statistics, field),
                           getattr(first.repif_statistics, field))
    assert again.repif_statistics.model_digest == module_digest(again)
    plain = _trained(ds, train, cache_dir=tmp_path)  # the same cache key: statistics too
    assert hasattr(plain, "repif_statistics")


def test_a_recorder_names_what_is_missing_or_mismatched(digits):
    ds, (x, y) = digits
    model = models.build("mlp", ds).eval()
    rec = StatisticsRecorder(N, model)
    with torch.no_grad():
        out = model(x[:10])
    with pytest.raises(ValueError, match="10 output rows"):
        rec.record(torch.arange(5), out[:5].repeat(2, 1), y[:10])
    with torch.no_grad():
        out = model(x[:10])
    rec.record(torch.arange(10), out, y[:10])
    with pytest.raises(ValueError, match="290 of 300 training points were never recorded"):
        rec.statistics(model)
    with pytest.raises(ValueError, match="n must be"):
        StatisticsRecorder(0, model)
