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


def test_remove_with_a_precomputed_gradient(linear, data):
    """gradient= reuses g (e.g. one pass for several estimators): the same model as computing
    it; a wrong shape or a non-finite g is refused by name."""
    est = _est(linear, data, damping=0.1)
    removed = torch.tensor([1, 5, 9])
    g = repif.unlearning.removal_gradient(est.fitter, removed)
    want = torch.cat([p.flatten() for p in est.remove(removed, steps=2).parameters()])
    got = torch.cat([p.flatten() for p in est.remove(removed, steps=2, gradient=g).parameters()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"gradient has shape \(14,\) but the model has 15 "):
        est.remove(removed, gradient=g[:-1])
    with pytest.raises(ValueError, match=r"gradient must be one \(15,\) vector.*\(2, 15\)"):
        est.remove(removed, gradient=torch.stack([g, g]))
    with pytest.raises(ValueError, match=r"gradient.*NaN"):
        est.remove(removed, gradient=torch.full_like(g, float("nan")))


def test_remove_leaves_too_few_points_for_the_sample(linear, data):
    est = _est(linear, data, sample_size=50)
    with pytest.raises(ValueError, match=r"sample_size=50 exceeds the 40 remaining"):
        est.remove(torch.arange(20))


# --------------------------------------------------------------------------- data forms
def test_numpy_arrays_are_accepted_everywhere(linear, data):
    """(x, y) as numpy arrays, for training and test data, and numpy indices: the same scores
    as with tensors."""
    x, y = data
    ref = _est(linear, data)
    est = _est(linear, (x.numpy(), y.numpy()))
    got = est.influence((x[:3].numpy(), y[:3].numpy()), train_indices=torch.arange(10).numpy())
    torch.testing.assert_close(got, ref.influence((x[:3], y[:3]), train_indices=torch.arange(10)))
    mask = (y == 1).numpy()
    torch.testing.assert_close(est.self_influence(mask), ref.self_influence(y == 1))
    assert repif.InfluenceEstimator(linear, {"x": x.numpy(), "labels": y.numpy()},
                                    task=_KeywordTask()).n_train == N


class _KeywordTask(repif.ClassificationTask):
    """Calls model(x) for a dict batch {"x": …, "labels": …}."""

    def forward(self, call, inputs):
        return call(inputs["x"])


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda x, y: (x.tolist(), y.tolist()), ["element 0 is a list", "torch.tensor"]),
        (lambda x, y: x.tolist(), ["element 0 is a list of float", "torch.tensor"]),
        (lambda x, y: (x, y.tolist()), ["element 1 is a list", "torch.tensor"]),
        (lambda x, y: {"x": x.tolist(), "labels": y}, ["entry 'x' is a list", "tensor"]),
    ],
    ids=["tuple-of-lists", "list-of-rows", "mixed-tuple", "dict-of-lists"],
)
def test_plain_lists_are_refused_naming_the_forms(linear, data, make, words):
    with pytest.raises(TypeError) as info:
        _est(linear, make(*data))
    for word in words + ["tuple (x, y)", "Dataset", "DataLoader"]:
        assert word in str(info.value), (word, str(info.value))


def test_three_tuple_names_how_batches_call_the_model(linear, data):
    x, y = data
    with pytest.raises(ValueError) as info:
        _est(linear, (x, y, y))
    msg = str(info.value)
    assert "model((1, 4) float64, (1,) int64)" in msg  # the call that failed, by shapes
    assert "(x1, …, xk, y) calls model(x1, …, xk)" in msg and "repif.Task" in msg


def test_dict_with_keys_the_model_does_not_take(linear, data):
    x, y = data
    with pytest.raises(ValueError, match=r"model\(x=\(1, 4\) float64\).*unexpected keyword"):
        _est(linear, {"x": x, "labels": y})


@pytest.mark.parametrize("side", ["train", "test"])
def test_wrong_input_shape_for_the_model(linear, data, side):
    x, y = data
    wrong = torch.randn(N, D + 1, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        if side == "train":
            _est(linear, (wrong, y))
        else:
            _est(linear, data).influence((wrong[:2], y[:2]))
    msg = str(info.value)
    assert "model((1, 5) float64)" in msg and "mat1 and mat2" in msg  # shapes and torch's reason
    assert "pass data of the shape and layout the model takes" in msg


def test_model_returning_no_logits(data):
    """A tuple with the logits first is taken (tests/test_model_outputs.py); a dict without
    "logits" names its type and the fix."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C).double()

        def forward(self, x):
            return {"scores": self.lin(x), "x": x}

    with pytest.raises(ValueError, match=r"returned a dict, not a tensor.*override forward"):
        _est(TwoHeads(), data)


def test_three_dimensional_output_is_not_called_one_output(data):
    """An (N, 10, 1) output used to be read as "a model with 1 outputs"."""
    model = nn.Sequential(nn.Linear(D, 10), nn.Unflatten(1, (10, 1))).double()
    with pytest.raises(ValueError) as info:
        _est(model, data)
    msg = str(info.value)
    assert "(1, 10, 1)" in msg and "(n, C) logits" in msg and "nn.Flatten()" in msg
    assert "1 outputs" not in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(data, dtype):
    x, y = data
    with pytest.raises(ValueError) as info:
        _est(nn.Linear(D, C).to(dtype), (x.to(dtype), y))
    msg = str(info.value)
    assert str(dtype) in msg and "'weight'" in msg and "model.float()" in msg


def test_meta_device_model_and_data(linear, data):
    x, y = data
    with pytest.raises(ValueError, match=r"parameter 'weight' is on the meta device.*to_empty"):
        _est(nn.Linear(D, C, device="meta"), data)
    with pytest.raises(ValueError, match=r"element 0 \(inputs\) is on the meta device"):
        _est(linear, (x.to("meta"), y))
    with pytest.raises(ValueError, match=r"element 1 \(targets\) is on the meta device"):
        _est(linear, (x, y.to("meta")))
    with pytest.raises(ValueError, match=r"element 0 \(inputs\) is on the meta device"):
        _est(linear, data).influence((x[:2].to("meta"), y[:2]))


def test_integer_inputs_stay_integer(data):
    """Token ids for an nn.Embedding model are not cast to the model's float dtype."""
    _, y = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, C)).double()
    tokens = torch.randint(0, 20, (N, 3), generator=torch.Generator().manual_seed(1))
    est = _est(model, (tokens, y), solver="cg")
    scores = est.influence((tokens[:2], y[:2]))
    assert scores.shape == (2, N) and torch.isfinite(scores).all()
    assert est.top_k((tokens[0], y[0]), k=3).proponents.numel() == 3


@pytest.mark.parametrize(
    ("k", "error", "shown"),
    [(0, ValueError, "0"), (-2, ValueError, "-2"), (2.5, TypeError, "2.5"),
     ("3", TypeError, "'3'"), (True, TypeError, "True")],
)
def test_top_k_bad_k(linear, data, k, error, shown):
    x, y = data
    with pytest.raises(error) as info:
        _est(linear, data).top_k((x[0], y[0]), k=k)
    assert f"k must be a positive integer, got {shown}" in str(info.value)
    assert "k=10" in str(info.value)


def test_vector_hint_names_an_existing_helper(linear, data):
    est = _est(linear, data)
    with pytest.raises(ValueError, match=r"est\.fm\.space\.flatten") as info:
        est.inverse_hvp(torch.zeros(14, dtype=torch.float64))
    assert "estimator.params" not in str(info.value)
    named = {n: p.detach() for n, p in est.model.named_parameters()}
    assert est.fm.space.flatten(named).shape == (15,)  # the helper it names works


# --------------------------------------------------------------------------- solver options
@pytest.mark.parametrize("solver", ["cg", "lissa"])
@pytest.mark.parametrize("tol", [-1e-8, float("nan"), float("inf")])
def test_bad_tolerance_refused(linear, data, solver, tol):
    with pytest.raises(ValueError, match=rf"tol must be a finite number ≥ 0.*got {tol}"):
        _est(linear, data, solver=solver, tol=tol)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -1.0])
def test_bad_lissa_scale_refused(linear, data, scale):
    with pytest.raises(ValueError, match=rf"scale must be a finite number > 0, got {scale}"):
        _est(linear, data, solver="lissa", scale=scale)


@pytest.mark.parametrize("damping", [float("inf"), float("nan")])
def test_non_finite_damping_refused(linear, data, damping):
    with pytest.raises(ValueError, match=rf"damping must be finite, got {damping}"):
        _est(linear, data, damping=damping)
    est = _est(linear, data)  # the solver refuses it too, for callers that bypass the estimator
    op = est.fitter.operator(est.subset)
    with pytest.raises(ValueError, match=rf"damping must be a finite number ≥ 0, got {damping}"):
        repif.solvers.build("cg", {}).fit(op, damping)


@pytest.mark.parametrize(("option", "value"), [("max_iter", 0), ("max_iter", 2.5),
                                               ("block_size", True), ("depth", -1)])
def test_bad_counts_refused(linear, data, option, value):
    solver = "lissa" if option == "depth" else "cg"
    with pytest.raises(ValueError, match=rf"{option} must be a positive integer, got {value}"):
        _est(linear, data, solver=solver, **{option: value})


# --------------------------------------------------------------------------- divergence
def _indefinite(data):
    """The exact Hessian of a tanh net at a random init: indefinite at damping 0."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)).double()
    return model, data


def test_lissa_detects_divergence_without_damping(data):
    """LiSSA at damping 0 on an indefinite Hessian used to return scores of order 1e11 (its
    divergence check was off without damping); the iterate's growth bound now catches it."""
    model, data = _indefinite(data)
    est = _est(model, data, curvature="hessian", damping=0.0, solver="lissa")  # depth 1000
    # (before: a norm of 2e98 came back here without a word; only at depth ≳ 1,600 did it
    # overflow to inf and trip the non-finite check)
    g = est.train_gradients(torch.arange(2))
    with pytest.raises(SolverDivergedError) as info:
        est.inverse_hvp(g)
    msg = str(info.value)
    assert "LiSSA diverged" in msg and "damping=0" in msg and "curvature='ggn'" in msg


def test_lissa_warns_when_it_stops_at_depth(linear, data):
    est = _est(linear, data, solver="lissa", depth=3, tol=1e-10)
    g = est.train_gradients(torch.arange(2))
    with pytest.warns(RuntimeWarning, match=r"LiSSA stopped at depth=3 before reaching "
                                            r"tol=1e-10 for 2 of 2.*raise depth"):
        est.inverse_hvp(g)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _est(linear, data, solver="lissa", depth=3, tol=0.0).inverse_hvp(g)  # on purpose


def test_cg_hint_on_a_singular_ggn_does_not_suggest_ggn(linear, data):
    """GGN on one point at damping 0 and no weight decay: rank 2 of 15, singular. The hint must
    say to raise the damping and must not offer the GGN it already uses."""
    est = _est(linear, data, solver="cg", damping=0.0).fit(pool=torch.tensor([0]))
    g = torch.randn(1, 15, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(SolverDivergedError) as info:
        est.inverse_hvp(g)
    msg = str(info.value)
    assert "raise the damping" in msg and "damping=0" in msg
    assert "curvature='ggn'" not in msg and "indefinite" not in msg


@pytest.mark.parametrize("solver", ["direct", "arnoldi"])
def test_exact_solvers_refuse_a_singular_system(linear, data, solver):
    est = _est(linear, data, solver=solver, damping=0.0, **({"rank": 15} if solver == "arnoldi"
                                                            else {}))
    with pytest.raises(SolverDivergedError, match=r"singular|zero to working precision") as info:
        est.fit(pool=torch.tensor([0]))
    assert "raise the damping (now 0)" in str(info.value)


@pytest.mark.parametrize("solver", ["direct", "cg", "lissa", "arnoldi", "woodbury", "identity"])
def test_every_solver_refuses_a_non_finite_result(linear, data, solver, monkeypatch):
    est = _est(linear, data, solver=solver, sample_size=20, **(
        {"rank": 5} if solver == "arnoldi" else {})).fit()
    cls = type(est.solver)
    monkeypatch.setattr(cls, "_solve", lambda self, g: torch.full_like(g, float("nan")))
    with pytest.raises(SolverDivergedError) as info:
        est.inverse_hvp(torch.ones(2, 15, dtype=torch.float64))
    msg = str(info.value)
    assert f"solver {solver!r} returned non-finite values" in msg and "2 of 2" in msg
    assert "raise the damping (now 0.01)" in msg


@pytest.mark.parametrize("solver", ["direct", "cg", "lissa", "arnoldi", "woodbury"])
def test_every_solver_refuses_an_exploding_ggn_solution(linear, data, solver, monkeypatch):
    """For the GGN (PSD) ‖(C + λI)⁻¹g‖ ≤ ‖g‖/λ: anything far longer is a breakdown."""
    est = _est(linear, data, solver=solver, sample_size=20, **(
        {"rank": 5} if solver == "arnoldi" else {})).fit()
    monkeypatch.setattr(type(est.solver), "_solve", lambda self, g: g * 1e11)
    with pytest.raises(SolverDivergedError, match=r"1e\+11 times as long.*raise the damping"):
        est.inverse_hvp(torch.ones(15, dtype=torch.float64))
