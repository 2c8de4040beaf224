"""Fitted work is kept: a new damping reuses the Kronecker factors and their eigendecomposition,
a solver that refuses the damping after the fit leaves the factors on the estimator, and a
damping that cannot work is refused before the fit."""

from __future__ import annotations

import pytest
import torch

import repif
from repif.curvature import kfac, kronecker_cache
from repif.errors import SolverDivergedError

KW = dict(curvature="ekfac", solver="eigen", sampler="random", sample_size=64, seed=0)


@pytest.fixture
def fits(monkeypatch):
    """Counts Kronecker fits."""
    calls = []
    real = kfac.fit_kronecker

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kfac, "fit_kronecker", counted)
    return calls


def test_a_new_damping_reuses_the_factors_and_matches_a_fresh_fit(digits_mlp, fits):
    model, train, _ = digits_mlp
    est = repif.InfluenceEstimator(model, train, damping=0.01, **KW).fit()
    g = est.train_gradients([0, 1, 2])
    before = est.inverse_hvp(g)
    assert len(fits) == 1
    est.set_damping(0.1)
    after = est.inverse_hvp(g)
    assert len(fits) == 1  # no refit: the factors and eigenbases do not depend on λ
    assert est.damping == 0.1 and est.solver.damping == 0.1
    fresh = repif.InfluenceEstimator(model, train, damping=0.1, **KW).fit()
    # the same subset and the same deterministic factor passes: equal up to the round-off of
    # BLAS summation order, far below the change the damping makes
    torch.testing.assert_close(after, fresh.inverse_hvp(g), rtol=1e-10, atol=1e-12)
    assert float((after - before).norm()) > 1e-3 * float(before.norm())


def test_a_refused_damping_keeps_the_fit(digits_mlp, fits):
    model, train, _ = digits_mlp
    est = repif.InfluenceEstimator(model, train, damping=1e-300, **KW)
    with pytest.raises(SolverDivergedError, match="set_damping"):
        est.fit()
    assert len(fits) == 1 and est.fitter.kept is not None
    est.set_damping(0.05)  # finishes the fit on the kept factors
    g = est.train_gradients([3])
    v = est.inverse_hvp(g)
    est.fit()  # the same subset again: the kept factors, no refit either
    assert len(fits) == 1
    fresh = repif.InfluenceEstimator(model, train, damping=0.05, **KW)
    torch.testing.assert_close(v, fresh.inverse_hvp(g), rtol=1e-10, atol=1e-12)


def test_a_damping_that_cannot_work_is_refused_before_the_fit(digits_mlp, fits):
    model, train, _ = digits_mlp
    with pytest.raises(ValueError, match="damping \\+ weight_decay > 0"):
        repif.InfluenceEstimator(model, train, damping=0.0, **KW)
    assert not fits


def test_a_long_fit_is_kept_in_the_default_cache(digits_mlp, fits, monkeypatch, tmp_path):
    """With no cache_dir named, a fit that took at least LONG_FIT_S is stored in the default
    cache, so a second estimator (e.g. after an error) loads it instead of refitting; a short
    fit is not stored; cache_dir=False never reads or writes."""
    model, train, _ = digits_mlp
    monkeypatch.setenv(kronecker_cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(kronecker_cache, "LONG_FIT_S", 1e9)  # every fit "short": nothing stored
    first = repif.InfluenceEstimator(model, train, **KW).fit()
    assert not list(tmp_path.iterdir()) and len(fits) == 1
    monkeypatch.setattr(kronecker_cache, "LONG_FIT_S", 0.0)  # every fit "long": stored
    repif.InfluenceEstimator(model, train, **KW).fit()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and len(fits) == 2
    again = repif.InfluenceEstimator(model, train, **KW).fit()
    assert len(fits) == 2  # loaded from the default cache, not refitted
    g = first.train_gradients([0, 1])
    torch.testing.assert_close(again.inverse_hvp(g), first.inverse_hvp(g), rtol=1e-12, atol=0)
    never = repif.InfluenceEstimator(model, train, kronecker_options={"cache_dir": False},
                                     **KW).fit()
    assert len(fits) == 3 and never.subset.indices.equal(first.subset.indices)
    with pytest.raises(ValueError, match="cache_dir must be"):
        repif.InfluenceEstimator(model, train, kronecker_options={"cache_dir": 3}, **KW)
