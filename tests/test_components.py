"""Components given as instances that carry their options (solver, sampler, curvature) against
the same components given by name with options: the same estimator, bit for bit; and every
registered component reads its options back."""

from __future__ import annotations

import pytest
import torch

import repif
from repif import datasets, models, samplers, solvers
from repif.curvature import kinds


@pytest.mark.parametrize("registry", [solvers.REGISTRY, samplers.REGISTRY, kinds.REGISTRY],
                         ids=["solvers", "samplers", "curvatures"])
def test_every_registered_component_reads_its_options_back(registry):
    for name in registry.names():
        made = registry.build(name, {})
        got, options = registry.options_of(made)
        again = registry.build(got, options)
        assert got == name
        assert {k: repr(v) for k, v in vars(again).items()} == \
            {k: repr(v) for k, v in vars(made).items()}, name


@pytest.fixture(scope="module")
def digits():
    ds = datasets.load("digits")
    model = models.build("mlp", ds).double().eval()
    return model, (ds.train[0][:150].double(), ds.train[1][:150]), (ds.test[0][:4].double(),
                                                                     ds.test[1][:4])


def test_instances_give_the_estimator_their_options(digits):
    model, train, test = digits
    by_name = repif.InfluenceEstimator(
        model, train, curvature="ekfac", kronecker_options={"fisher": "sampled"},
        solver="eigen",
        sampler="logit-importance", sampler_options={"proxy": "gini-feature"},
        sample_size=40, damping=0.05, seed=3)
    by_instance = repif.InfluenceEstimator(
        model, train, curvature=kinds.build("ekfac", {"fisher": "sampled"}),
        solver=solvers.build("eigen", {}),
        sampler=samplers.build("logit-importance", {"proxy": "gini-feature"}),
        sample_size=40, damping=0.05, seed=3)
    assert by_instance.solver_name == "eigen" and by_instance.sampler_name == "logit-importance"
    assert by_instance.curvature == "ekfac"
    assert torch.equal(by_name.subset.indices, by_instance.subset.indices)
    assert torch.equal(by_name.influence(test), by_instance.influence(test))  # same path


def test_options_beside_an_instance_are_refused_by_name(digits):
    model, train, _ = digits
    lissa = solvers.build("lissa", {"depth": 10, "batch_size": 16})
    with pytest.raises(TypeError, match="carries its own options"):
        repif.InfluenceEstimator(model, train, solver=lissa, depth=5)
    with pytest.raises(TypeError, match="carries its own options"):
        repif.InfluenceEstimator(model, train, sampler=samplers.build("random"),
                                 sampler_options={"x": 1})
    with pytest.raises(TypeError, match="not a registered sampler"):
        repif.InfluenceEstimator(model, train, sampler=object())
    est = repif.InfluenceEstimator(model, train, solver=lissa, damping=0.1)
    assert est.solver_options["batch_size"] == 16  # LiSSA's own mini-batch, not the chunk cap
