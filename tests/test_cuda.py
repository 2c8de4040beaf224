"""The CUDA path: the same results on a GPU as on the CPU (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

import repif
from repif import datasets, models
from repif.projection import ProjectedGradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).norm() / b.cpu().norm())


@pytest.fixture(scope="module")
def problem():
    ds = datasets.load("digits")
    model = repif.train(models.build("cnn", ds), ds.train, epochs=3, seed=0).double()
    return ds, model


@pytest.mark.parametrize("solver,extra", [("cg", {"tol": 1e-10}), ("woodbury", {}),
                                          ("lissa", {"depth": 50,
                                                     "solver_options": {"batch_size": 16}})])
def test_cuda_matches_cpu(problem, solver, extra):
    ds, model = problem
    kw = dict(damping=0.1, solver=solver, sampler="logit-importance", sample_size=32, seed=1,
              **extra)
    cpu = repif.InfluenceEstimator(model, ds.train, device="cpu", **kw)
    gpu = repif.InfluenceEstimator(model, ds.train, device="cuda", **kw)
    assert torch.equal(cpu.subset.indices, gpu.subset.indices)
    test = (ds.test[0][:5], ds.test[1][:5])
    assert _rel(gpu.influence(test), cpu.influence(test)) <= 1e-6
    assert _rel(gpu.self_influence(torch.arange(20)), cpu.self_influence(torch.arange(20))) <= 1e-6
    removed = torch.nonzero(ds.train[1] == 0).flatten()
    a = gpu.remove(removed, scale=2.0)
    b = cpu.remove(removed, scale=2.0)
    pa = torch.cat([p.detach().cpu().flatten() for p in a.parameters()])
    pb = torch.cat([p.detach().cpu().flatten() for p in b.parameters()])
    assert _rel(pa, pb) <= 1e-6
    assert next(a.parameters()).device.type == "cuda"


def test_cuda_dataset_input_and_budget(problem):
    ds, model = problem
    data = torch.utils.data.TensorDataset(*ds.train)
    est = repif.InfluenceEstimator(model, data, device="cuda", solver="cg", damping=0.1,
                                   sampler="random", sample_size=64, max_memory=2**22)
    ref = repif.InfluenceEstimator(model, ds.train, device="cpu", solver="cg", damping=0.1,
                                   sampler="random", sample_size=64)
    test = (ds.test[0][:3], ds.test[1][:3])
    assert _rel(est.influence(test), ref.influence(test)) <= 1e-6


@pytest.mark.parametrize("basis,dim", [("random", 4), ("eigen", 10**4)])
def test_cuda_projected_scores_match_cpu(problem, basis, dim, tmp_path):
    """Projected scores on the GPU: the same as on the CPU (random rows are drawn on the CPU,
    so the same P; the eigenbasis at full dimension, where the scores do not depend on it),
    and stored projections written on the GPU scored again."""
    ds, model = problem
    kw = dict(damping=0.1, sampler="random", sample_size=32, seed=1, scores="projected",
              projection_basis=basis, projection_dim=dim)
    train = (ds.train[0][:200], ds.train[1][:200])
    cpu = repif.InfluenceEstimator(model, train, device="cpu", **kw)
    gpu = repif.InfluenceEstimator(model, train, device="cuda", **kw)
    test = (ds.test[0][:5], ds.test[1][:5])
    scores = gpu.influence(test)
    assert _rel(scores, cpu.influence(test)) <= 1e-6
    stored = gpu.projected_gradients()
    stored.save(tmp_path / "p.safetensors")
    loaded = ProjectedGradients.load(tmp_path / "p.safetensors")
    assert _rel(gpu.influence(test, projected=loaded), scores) <= 1e-10
