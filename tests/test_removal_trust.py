"""A removal a user can trust: ``remove(..., scale="auto", validation=…)`` picks η on held-out
points with the study's own rule, and a removal that collapses the retained classes' accuracy
says so (RemovalWarning), checked against retraining on the digits."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import repif
from repif.metrics import predict, removal_scores
from repif.unlearning import SCALE_GRID, choose_scale

REMOVED = 3
WD = 1e-3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


@pytest.fixture(scope="module")
def problem(digits):
    x, y = (torch.from_numpy(a) for a in digits)
    perm = torch.from_numpy(np.random.default_rng(1).permutation(len(x)))
    tr, va, te = perm[:1000], perm[1000:1300], perm[1300:]
    train = (x[tr], y[tr])
    model = repif.train(_mlp(), train, epochs=40, weight_decay=WD, seed=0)
    rest = train[1] != REMOVED
    retrained = repif.train(_mlp(), (train[0][rest], train[1][rest]), epochs=40,
                            weight_decay=WD, seed=0)
    return model, retrained, train, (x[va], y[va]), (x[te], y[te])


def _estimator(model, train):
    return repif.InfluenceEstimator(model, train, solver="direct", damping=0.01,
                                    weight_decay=WD)


def _scores(model, original, test):
    return removal_scores(predict(model, test[0]), predict(original, test[0]), test[1],
                          REMOVED)


def test_auto_scale_forgets_like_retraining_and_keeps_the_rest(problem):
    model, retrained, train, val, test = problem
    est = _estimator(model, train)
    with warnings.catch_warnings():
        warnings.simplefilter("error", repif.RemovalWarning)  # a good removal is not reported
        removed = est.remove(train[1] == REMOVED, scale="auto", validation=val)
    auto, retrain = _scores(removed, model, test), _scores(retrained, model, test)
    assert retrain.forget > 0.95
    assert auto.forget > 0.8, auto
    assert auto.accuracy_remaining >= 0.9 * retrain.accuracy_remaining, (auto, retrain)
    assert est.last_removal["scale"] in SCALE_GRID
    assert est.last_removal["retained_accuracy_after"] >= 0.9 * est.last_removal[
        "retained_accuracy_before"]


def test_auto_scale_is_the_studys_choice(problem):
    """One implementation: the η remove() picks is choose_scale's on the same direction."""
    model, _, train, val, _ = problem
    est = _estimator(model, train)
    removed = est.remove(train[1] == REMOVED, scale="auto", validation=val)
    rest = torch.nonzero(train[1] != REMOVED).flatten()
    ref = _estimator(model, train).fit(rest)
    from repif.unlearning import removal_gradient
    v = ref.inverse_hvp(removal_gradient(ref.fitter, torch.nonzero(train[1] == REMOVED)
                                         .flatten()))

    def predictions(theta):
        m = copy.deepcopy(ref.model)
        ref.fm.space.set(m, theta)
        return predict(m, val[0])

    eta, _ = choose_scale(predictions, ref.fm.theta, v, val[1], predict(model, val[0]),
                          [REMOVED])
    assert est.last_removal["scale"] == eta
    theta = ref.fm.space.get(removed)
    torch.testing.assert_close(theta, ref.fm.theta + eta * v, rtol=1e-8, atol=1e-10)


def test_a_collapsing_removal_is_reported_with_the_drop_and_the_fix(problem):
    model, _, train, val, _ = problem
    est = _estimator(model, train)
    with pytest.warns(repif.RemovalWarning) as record:
        est.remove(train[1] == REMOVED, scale=1000.0, validation=val)
    msg = str(record[0].message)
    assert "retained classes' accuracy on the validation points" in msg
    assert "scale='auto'" in msg and "from 0.9" in msg
    # without validation points the check reads the curvature subset's training points
    with pytest.warns(repif.RemovalWarning, match="remaining training points"):
        est.remove(train[1] == REMOVED, scale=1000.0)


def test_auto_scale_needs_validation_and_whole_classes(problem):
    model, _, train, val, _ = problem
    est = _estimator(model, train)
    with pytest.raises(ValueError, match="validation="):
        est.remove(train[1] == REMOVED, scale="auto")
    with pytest.raises(ValueError, match="not all the training points of any class"):
        est.remove([0, 1, 2], scale="auto", validation=val)
    with pytest.raises(ValueError, match="'auto'"):
        est.remove([0, 1, 2], scale="big")
