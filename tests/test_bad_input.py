"""Bad input gives one clear error that names the value and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repif
from repif.errors import SolverDivergedError, TooLargeError

pytestmark = pytest.mark.usefixtures("single_thread")

N, D, C = 60, 4, 3


@pytest.fixture()
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    return x, y


@pytest.fixture()
def linear():
    torch.manual_seed(0)
    return nn.Linear(D, C).double()  # 15 parameters


def _est(model, data, **kw):
    return repif.InfluenceEstimator(model, data, **kw)


# --------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_training_inputs(linear, data, bad):
    x, y = data
    x = x.clone()
    x[7, 2] = bad
    with pytest.raises(ValueError, match=r"training inputs contains 1 non-finite value"):
        _est(linear, (x, y))


def test_non_finite_test_inputs(linear, data):
    x, y = data
    est = _est(linear, data)
    xt = x[:2].clone()
    xt[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"test inputs contains 1 non-finite"):
        est.influence((xt, y[:2]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_parameters(linear, data, bad):
    with torch.no_grad():
        linear.bias[1] = bad
    with pytest.raises(ValueError, match=r"model parameter 'bias' contains 1 non-finite"):
        _est(linear, data)


def test_non_finite_vector_to_inverse_hvp(linear, data):
    v = torch.zeros(15, dtype=torch.float64)
    v[3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite"):
        _est(linear, data).inverse_hvp(v)


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("label", [C, 7, -1])
def test_training_labels_out_of_range(linear, data, label):
    x, y = data
    y = y.clone()
    y[5] = label
    with pytest.raises(ValueError, match=rf"contain {label}, outside \[0, {C}\)"):
        _est(linear, (x, y))


def test_test_labels_out_of_range(linear, data):
    x, y = data
    est = _est(linear, data)
    with pytest.raises(ValueError, match=rf"outside \[0, {C}\)"):
        est.influence((x[:2], torch.tensor([0, C])))


def test_float_labels(linear, data):
    x, y = data
    with pytest.raises(ValueError, match=r"integer class indices.*y\.long\(\)"):
        _est(linear, (x, y.double()))


# --------------------------------------------------------------------------- shapes, indices
@pytest.mark.parametrize("shape", [(14,), (16,), (2, 14), (2, 3, 15)])
def test_wrong_length_vector_to_inverse_hvp(linear, data, shape):
    est = _est(linear, data)
    with pytest.raises(ValueError, match=r"15 trainable parameters; pass a tensor of shape"):
        est.inverse_hvp(torch.zeros(shape, dtype=torch.float64))


def test_train_indices_out_of_range(linear, data):
    x, y = data
    est = _est(linear, data)
    with pytest.raises(ValueError, match=rf"contain {N}, outside the {N} training points"):
        est.influence((x[:1], y[:1]), train_indices=torch.tensor([0, N]))
    with pytest.raises(ValueError, match=r"outside the"):
        est.self_influence(torch.tensor([-1]))


def test_x_y_length_mismatch(linear, data):
    x, y = data
    with pytest.raises(ValueError, match=r"x has 60 rows but y has 59"):
        _est(linear, (x, y[:-1]))


# --------------------------------------------------------------------------- sampling, pool
@pytest.mark.parametrize("size", [0, -3])
def test_sample_size_not_positive(linear, data, size):
    with pytest.raises(ValueError, match=r"sample_size must be a positive integer"):
        _est(linear, data, sample_size=size).fit()


def test_sample_size_larger_than_pool(linear, data):
    with pytest.raises(ValueError, match=rf"sample_size={N + 1} is larger than the pool"):
        _est(linear, data, sample_size=N + 1).fit()
    with pytest.raises(ValueError, match=r"sample_size=10 is larger than the pool \(5 points\)"):
        _est(linear, data, sample_size=10).fit(pool=torch.arange(5))


def test_empty_pool(linear, data):
    with pytest.raises(ValueError, match=r"pool is empty"):
        _est(linear, data).fit(pool=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"pool is empty"):
        _est(linear, data, sample_size=3).fit(pool=torch.tensor([], dtype=torch.long))


def test_pool_duplicates_and_out_of_range(linear, data):
    with pytest.raises(ValueError, match=r"duplicates"):
        _est(linear, data).fit(pool=torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match=rf"pool indices contain {N}"):
        _est(linear, data).fit(pool=torch.tensor([1, N]))


# --------------------------------------------------------------------------- names and options
@pytest.mark.parametrize(
    ("kw", "known"),
    [
        ({"solver": "newton"}, r"unknown solver 'newton'; known solvers: "),
        ({"sampler": "magic"}, r"unknown sampler 'magic'; known samplers: "),
        ({"curvature": "fisher"}, r"unknown curvature 'fisher'; known curvatures: "),
    ],
)
def test_unknown_names_list_the_known_ones(linear, data, kw, known):
    with pytest.raises(ValueError, match=known) as info:
        _est(linear, data, **kw)
    known_names = {
        "solver": repif.solvers.names(),
        "sampler": repif.samplers.names(),
        "curvature": ["ggn", "hessian"],
    }[next(iter(kw))]
    listed = str(info.value).split("known ")[-1]
    assert all(name in listed for name in known_names), (known_names, listed)


def test_unknown_solver_option_lists_accepted(linear, data):
    with pytest.raises(TypeError, match=r"does not take option\(s\) depth; it takes: max_params"):
        _est(linear, data, solver="direct", depth=10).fit()
    with pytest.raises(TypeError, match=r"it takes: .*depth.*scale"):
        _est(linear, data, solver="lissa", rank=3).fit()


def test_negative_damping(linear, data):
    with pytest.raises(ValueError, match=r"damping must be ≥ 0, got -0.1"):
        _est(linear, data, damping=-0.1)


def test_direct_too_large_names_cg(linear, data):
    model = nn.Sequential(nn.Linear(D, 30), nn.Tanh(), nn.Linear(30, C)).double()  # 243 params
    with pytest.raises(TooLargeError, match=r"243 trainable parameters.*max_params=100.*'cg'"):
        _est(model, data, solver="direct", max_params=100).fit()
    # the default limit accepts it
    _est(model, data, solver="direct").fit()


# --------------------------------------------------------------------------- solver failures
def test_lissa_divergence_names_scale(linear, data):
    est = _est(linear, data, solver="lissa", scale=1e-3, depth=200)
    g = est.train_gradients(torch.arange(2))
    with pytest.raises(SolverDivergedError, match=r"LiSSA diverged.*raise scale") as info:
        est.inverse_hvp(g)
    assert "scale=0.001" in str(info.value)


def test_cg_on_indefinite_hessian_names_ggn(data):
    """Exact Hessian of a tanh net at a random init with damping 0 is indefinite (the
    cross-layer blocks and the residual term); CG must refuse instead of returning garbage."""
    x, y = data
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)).double()
    est = _est(model, (x, y), curvature="hessian", damping=0.0, solver="cg", max_iter=500)
    g = est.train_gradients(torch.arange(3))
    with pytest.raises(SolverDivergedError, match=r"non-positive curvature.*curvature='ggn'"):
        est.inverse_hvp(g)
    # the same problem with GGN curvature (PSD) and a little damping solves fine
    ok = _est(model, (x, y), curvature="ggn", damping=1e-3, solver="cg").inverse_hvp(g)
    assert torch.isfinite(ok).all()


# --------------------------------------------------------------------------- removal
def test_remove_everything(linear, data):
    with pytest.raises(ValueError, match=r"cannot remove every training point"):
        _est(linear, data).remove(torch.arange(N))


def test_remove_bad_arguments(linear, data):
    est = _est(linear, data)
    with pytest.raises(ValueError, match=r"no indices to remove"):
        est.remove(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"steps must be a positive integer"):
        est.remove(torch.tensor([0]), steps=0)
    with pytest.raises(ValueError, match=r"scale must be positive"):
        est.remove(torch.tensor([0]), scale=0.0)
    with pytest.raises(ValueError, match=rf"removed indices contain {N}"):
        est.remove(torch.tensor([N]))


def test_remove_leaves_too_few_points_for_the_sample(linear, data):
    est = _est(linear, data, sample_size=50)
    with pytest.raises(ValueError, match=r"sample_size=50 exceeds the 40 remaining"):
        est.remove(torch.arange(20))
