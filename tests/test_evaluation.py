"""Ground-truth evaluation (docs/design.md, "Protocol"): LDS and leave-one-out against retraining.

The known-answer case is an L2-regularised multinomial logistic regression trained to convergence
by full-batch L-BFGS in float64: there the exact-Hessian influence matches leave-one-out
retraining to first order, so the LOO correlation is ≈ 1, the predicted changes have the right
scale only under the retraining convention −(τ_j − τ̄)/(n − 1), and the LDS of exact influence is
high. `test_lds_and_loo_match_an_independent_computation` recomputes repif's LDS and LOO scores
without repif (influence written out by hand, scipy/numpy correlations), and a ridge regression,
retrained in closed form, checks both leave-one-out conventions. Retrains take milliseconds, so
each test runs in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from repif import ClassificationTask, InfluenceEstimator, cli
from repif.studies.class_removal.study import StudyEnvironmentError
from repif.studies.evaluation import (
    Evaluation,
    EvaluationConfig,
    Recipe,
    evaluate,
    format_table,
    lds,
    lds_subsets,
    loo_predicted,
    loo_scores,
    orient,
    parse_method,
    spearman_rows,
    table,
    write_report,
)

WD = 0.05
N_TRAIN, N_TEST, DIM, CLASSES = 60, 20, 4, 3


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, CLASSES, generator=g, dtype=torch.float64)
    x = torch.randn(N_TRAIN + N_TEST, DIM, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(1.5 * x @ w, 1), 1, generator=g).squeeze(1)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def _build(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(DIM, CLASSES).double()


def _fit(model: nn.Module, data, seed: int) -> nn.Module:
    """Mean cross-entropy + (WD/2)‖θ‖², minimised to convergence (gradient norm ~1e-12)."""
    x, y = data
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + WD / 2 * sum(
            (p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


RECIPE = Recipe.from_functions(_build, _fit, weight_decay=WD)


@pytest.fixture(scope="module")
def convex():
    return _data()


def _run(out: Path, convex, **config):
    train, test = convex
    config.setdefault("dampings", [0.0])
    return evaluate(out, train=train, test=test, recipe=RECIPE, progress=False, report=False,
                    **config)


def _cells(results) -> dict:
    return {c["method"]: c for c in results["cells"]}


# --------------------------------------------------------------------------- the metrics
def test_spearman_rows_is_scipys_spearmanr():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 30))
    b = np.round(a + rng.normal(size=(5, 30)), 1)  # ties, as scipy averages them
    ours = spearman_rows(a, b)
    for t in range(5):
        assert ours[t] == pytest.approx(spearmanr(a[t], b[t]).statistic, abs=1e-12)
    assert np.isnan(spearman_rows(a[:1], np.ones((1, 30))))[0]  # constant: undefined


def test_lds_of_the_exact_linear_datamodel_is_one():
    rng = np.random.default_rng(1)
    tau = rng.normal(size=(4, 40))
    masks = lds_subsets(40, 12, 0.5, seed=3)
    assert masks.shape == (12, 40) and (masks.sum(1) == 20).all()
    exact = masks.astype(float) @ tau.T  # (S, T): a model whose target is exactly additive
    np.testing.assert_allclose(lds(tau, masks, np.exp(exact).T), 1.0)  # any monotone map
    np.testing.assert_allclose(lds(-tau, masks, exact.T), -1.0)
    assert (lds_subsets(40, 15, 0.5, seed=3)[:12] == masks).all()  # more subsets keep these


def test_loo_conventions():
    tau = np.array([[1.0, 2.0, 3.0, 6.0]])
    np.testing.assert_allclose(loo_predicted(tau, np.array([0, 3]), "retrain"),
                               [[-(1 - 3) / 3, -(6 - 3) / 3]])
    np.testing.assert_allclose(loo_predicted(tau, np.array([0, 3]), "reweight"),
                               [[-1 / 4, -6 / 4]])
    res = loo_scores(np.array([[1.0, 2.0, 3.0]]), np.array([[2.0, 4.0, 6.0]]))
    assert res["per_test"][0] == pytest.approx(1.0) and res["slope"] == pytest.approx(2.0)


# --------------------------------------------------------------------------- known answers
def test_loo_of_exact_influence_on_a_converged_regularised_model(tmp_path, convex):
    res = _run(tmp_path, convex, metric="loo", loo_points=30,
               methods=["hessian:direct", "ggn:cg", "grad-dot"])
    gt = res["ground_truth"]
    assert gt["loo_points"] == 30 and gt["retrains"] == 1 + 2 * 31  # attributed + 2 seeds
    assert gt["reliability"]["mean"] > 0.999  # L-BFGS to convergence: no retraining noise
    exact = _cells(res)["hessian:direct"]
    assert exact["score"] > 0.99 and exact["n_test"] == N_TEST
    assert 0.85 < exact["slope"] < 1.2  # the retraining convention has the right scale
    # a typical point's change is mostly the −Ī/(n − 1) term the reweighting convention lacks
    assert exact["median_rel_error"] < 0.1 < 2 * exact["median_rel_error"] < \
        exact["median_rel_error_reweight"]
    assert _cells(res)["ggn:cg"]["score"] == pytest.approx(exact["score"], abs=1e-6)  # GGN = H
    assert _cells(res)["grad-dot"]["score"] < exact["score"]
    stored = json.loads((tmp_path / "results.json").read_text())
    stored["ground_truth"]["reliability"]["ceiling"] = None  # NaN, stored as null
    assert write_report(stored, tmp_path).is_file()
    assert "nan" in format_table(table(stored), stored)


def test_lds_of_exact_influence_on_a_converged_regularised_model(tmp_path, convex):
    res = _run(tmp_path, convex, subsets=12, methods=["hessian:direct", "grad-dot"],
               test_points=list(range(10)), gt_seeds=2)
    assert res["ground_truth"]["subset_size"] == N_TRAIN // 2
    assert res["ground_truth"]["retrains"] == 1 + 12 * 3  # attributed; 2 seeds + noise seed
    assert res["ground_truth"]["reliability"]["mean"] == pytest.approx(1.0)
    exact = _cells(res)["hessian:direct"]
    assert exact["score"] > 0.85 and len(exact["per_test"]) == 10
    margin = _run(tmp_path / "margin", convex, subsets=12, target="margin",
                  methods=["hessian:direct"], test_points=list(range(10)))
    assert _cells(margin)["hessian:direct"]["score"] > 0.85


# --------------------------------------------------------------------------- cache and resume
def test_a_second_run_retrains_and_rescores_nothing(tmp_path, convex):
    first = _run(tmp_path, convex, subsets=10, methods=["hessian:direct", "grad-dot",
                                                        "ggn:direct@random"],
                 sizes=[20], seeds=2, dampings=[0.0, 0.1])
    assert first["ground_truth"]["trained_now"] == 1 + 2 * 10
    assert len(first["cells"]) == 1 + 2 + 2 * 2
    again = _run(tmp_path, convex, subsets=10, methods=["hessian:direct", "grad-dot",
                                                        "ggn:direct@random"],
                 sizes=[20], seeds=2, dampings=[0.0, 0.1])
    assert again["ground_truth"]["trained_now"] == 0
    assert again["cells"] == first["cells"]  # the stored rows, not recomputed ones

    # interrupted mid-way: a lost model and a lost cell are redone, nothing else
    store = tmp_path / first["ground_truth"]["store"]
    victim = sorted(store.glob("subset-*.safetensors"))[3]
    victim.unlink()
    path = tmp_path / "results.json"
    stored = json.loads(path.read_text())
    lost = stored["cells"].pop()
    path.write_text(json.dumps(stored))
    resumed = _run(tmp_path, convex, subsets=10, methods=["hessian:direct", "grad-dot",
                                                          "ggn:direct@random"],
                   sizes=[20], seeds=2, dampings=[0.0, 0.1])
    assert resumed["ground_truth"]["trained_now"] == 1 and victim.is_file()
    redone = next(c for c in resumed["cells"] if c["method"] == lost["method"]
                  and c["seed"] == lost["seed"] and c["damping"] == lost["damping"])
    assert redone["score"] == pytest.approx(lost["score"], abs=1e-12)

    # another configuration is kept aside and resumed from when it comes back
    _run(tmp_path, convex, subsets=10, target="margin", methods=["grad-dot"])
    assert len(list(tmp_path.glob("results.*.json"))) == 1
    back = _run(tmp_path, convex, subsets=10, methods=["grad-dot"])
    assert back["ground_truth"]["trained_now"] == 0 and back["cells"] == [
        c for c in first["cells"] if c["method"] == "grad-dot"]


def test_cli_runs_resumes_and_reports(tmp_path, capsys):
    args = ["evaluate", "--dataset", "digits", "--model", "linear", "--limit-train", "200",
            "--limit-test", "20", "--epochs", "3", "--subsets", "10", "--methods",
            "ggn:direct,ggn:woodbury@logit-importance,grad-dot", "--sizes", "20", "--seeds", "1",
            "--out", str(tmp_path), "--quiet"]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {c["method"] for c in results["cells"]} == {
        "ggn:direct", "ggn:woodbury@logit-importance", "grad-dot"}
    assert all(-1 <= c["score"] <= 1 for c in results["cells"])
    assert (tmp_path / "report.html").is_file() and (tmp_path / "score_vs_size.png").is_file()
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "results.json").read_text())["ground_truth"][
        "trained_now"] == 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, words", [
    ({"fraction": 1.5}, ["fraction must be in (0, 1), got 1.5", "--fraction 0.5"]),
    ({"fraction": 0.0}, ["fraction must be in (0, 1), got 0.0"]),
    ({"fraction": -0.25}, ["fraction must be in (0, 1), got -0.25"]),
    ({"subsets": 3}, ["at least 10 subsets, got 3", "--subsets 50"]),
    ({"test_points": [0, 20]}, ["test index 20 is outside [0, 20)", "from 0 to 19"]),
    ({"test_points": [-1, 3]}, ["test index -1 is outside [0, 20)"]),
    ({"methods": ["ggn:bogus"]}, ["unknown solver 'bogus'", "direct", "grad-dot"]),
    ({"methods": ["ggn:cg@bogus"]}, ["unknown sampler 'bogus'", "logit-importance"]),
    ({"metric": "loo", "loo_points": [3, 99]}, ["training index 99 is outside [0, 60)"]),
])
def test_bad_input_is_one_clear_error(tmp_path, convex, change, words):
    with pytest.raises(ValueError) as err:
        _run(tmp_path, convex, **{"methods": ["grad-dot"], **change})
    for w in words:
        assert w in str(err.value)
    assert "\n" not in str(err.value)  # one line
    assert not (tmp_path / "results.json").exists()


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    code = cli.main(["evaluate", "--dataset", "digits", "--fraction", "1.5", "--out",
                     str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("repif: error:") and "got 1.5" in err[0]


def test_one_run_per_output_directory(tmp_path, convex):
    train, test = convex
    cfg = EvaluationConfig(subsets=10, methods=["grad-dot"])
    first = Evaluation(cfg, tmp_path, data=(train, test), recipe=RECIPE, progress=False)
    with first.locked():
        second = Evaluation(cfg, tmp_path, data=(train, test), recipe=RECIPE, progress=False)
        with pytest.raises(StudyEnvironmentError, match="in use by another repif run"):
            second.run()


def test_hand_edited_results_are_refused(tmp_path, convex):
    _run(tmp_path, convex, subsets=10, methods=["grad-dot"])
    path = tmp_path / "results.json"
    stored = json.loads(path.read_text())
    stored["cells"][0]["score"] = "high"
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"cells\[0\] has score='high'"):
        _run(tmp_path, convex, subsets=10, methods=["grad-dot"])


def test_method_names():
    m = parse_method("ggn:woodbury@logit-importance+shrink")
    assert (m.curvature, m.solver, m.sampler, m.shrinkage) == (
        "ggn", "woodbury", "logit-importance", "auto")
    assert parse_method("direct").curvature == "ggn" and not parse_method("direct").sampled
    assert parse_method("grad-dot").solver == "identity"
    m = parse_method("ggn:woodbury+prior=ekfac+prior_weight=0.3+prior_size=500@random")
    assert (m.solver, m.sampler) == ("woodbury", "random")
    assert dict(m.solver_options) == {"prior": "ekfac", "prior_weight": 0.3, "prior_size": 500}
    m = parse_method("ggn:woodbury@logit-importance+proxy=gini-feature+shrink")
    assert (m.sampler, m.shrinkage, dict(m.sampler_options)) == (
        "logit-importance", "auto", {"proxy": "gini-feature"})
    m = parse_method("ekfac+basis_size=pool+fisher=sampled:eigen@logit-importance")
    assert (m.curvature, m.solver, dict(m.curvature_options)) == (
        "ekfac", "eigen", {"basis_size": "pool", "fisher": "sampled"})
    m = parse_method("ekfac+basis_size=300:eigen")
    assert dict(m.curvature_options) == {"basis_size": 300} and not m.sampled
    for bad, msg in [("ggn:woodbury+prior@random", "key=value"),
                     ("ekfac+basis_size=0:eigen@random", "basis_size must be"),
                     ("kfac+basis_size=10:eigen", "use curvature='ekfac'"),
                     ("ggn+fisher=sampled:woodbury@random", "kronecker_options configure"),
                     ("ggn:woodbury@logit-importance+proxy=trace", "proxy"),
                     ("ggn:woodbury+prio=ekfac", "does not take"),
                     ("ggn:woodbury+prior=diag", "prior must be")]:
        with pytest.raises(ValueError, match=msg):
            parse_method(bad)


# --------------------------------------------------------------------------- independent checks
def _softmax_regression_influence(model: nn.Module, train, test) -> np.ndarray:
    """I(z_j, z_t) = −∇l_tᵀ H⁻¹ ∇l_j of a linear softmax model, written out by hand in numpy:
    θ = [W | b] per class, ∇l = (p − e_y) ⊗ x̃, H = mean_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ
    + WD·I (no damping)."""
    theta = np.hstack([model.weight.detach().numpy(), model.bias.detach().numpy()[:, None]])

    def parts(data):
        x = np.hstack([data[0].numpy(), np.ones((len(data[1]), 1))])
        z = x @ theta.T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = p - np.eye(CLASSES)[data[1].numpy()]
        return x, p, np.einsum("ic,ia->ica", r, x).reshape(len(x), -1)

    x, p, g_tr = parts(train)
    _, _, g_te = parts(test)
    h = sum(np.kron(np.diag(pi) - np.outer(pi, pi), np.outer(xi, xi))
            for xi, pi in zip(x, p, strict=True))
    h = h / len(x) + WD * np.eye(theta.size)
    return -g_te @ np.linalg.solve(h, g_tr.T)


def _test_loss(model: nn.Module, test) -> np.ndarray:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(test[0]), test[1], reduction="none").numpy()


def test_lds_and_loo_match_an_independent_computation(tmp_path, convex):
    """repif's LDS and LOO scores equal the same quantities computed here without repif: the
    influence written out by hand, the models retrained by the recipe's own functions, and
    scipy's / numpy's correlations."""
    train, test = convex
    n = N_TRAIN
    full = _fit(_build(0), train, 0)
    tau = -_softmax_regression_influence(full, train, test)  # positive helps (target −loss)

    res = _run(tmp_path / "lds", convex, subsets=10, methods=["hessian:direct"])
    masks = lds_subsets(n, 10, 0.5, seed=0)  # the documented subsets: seeds (0, k)
    f = np.stack([-_test_loss(_fit(_build(0), (train[0][m], train[1][m]), 0), test)
                  for m in torch.from_numpy(masks)], axis=1)  # (T, S) targets
    predicted = tau @ masks.T.astype(float)
    ours = [spearmanr(predicted[t], f[t]).statistic for t in range(N_TEST)]
    cell = _cells(res)["hessian:direct"]
    assert cell["score"] == pytest.approx(np.mean(ours), abs=1e-6)
    np.testing.assert_allclose(cell["per_test"], ours, atol=1e-5)

    points = [0, 7, 13, 21, 34, 40, 52, 59]
    res = _run(tmp_path / "loo", convex, metric="loo", loo_points=points,
               methods=["hessian:direct"])
    base = -_test_loss(full, test)
    actual = np.stack([-_test_loss(_fit(_build(0), (np.delete(train[0], j, 0),
                                                    np.delete(train[1], j, 0)), 0), test)
                       - base for j in points], axis=1)  # (T, k) change of −loss
    retrain = -(tau[:, points] - tau.mean(1, keepdims=True)) / (n - 1)
    reweight = -tau[:, points] / n
    cell = _cells(res)["hessian:direct"]
    ours = [np.corrcoef(retrain[t], actual[t])[0, 1] for t in range(N_TEST)]
    assert cell["score"] == pytest.approx(np.mean(ours), abs=1e-6)
    assert cell["slope"] == pytest.approx((retrain * actual).sum() / (retrain ** 2).sum(),
                                          rel=1e-6)
    assert cell["median_rel_error"] == pytest.approx(
        np.median(np.abs(retrain - actual) / np.abs(actual)), rel=1e-6)
    assert cell["median_rel_error_reweight"] == pytest.approx(
        np.median(np.abs(reweight - actual) / np.abs(actual)), rel=1e-6)


class _SquaredError(ClassificationTask):
    """Per-sample 0.5·(f(x) − y)² for a model with one output and float targets."""

    def loss_from_output(self, output, y):
        return 0.5 * (output.squeeze(-1) - y) ** 2

    def check_targets(self, y, output_dim):
        pass


@pytest.mark.parametrize("wd", [0.1, 0.5])
def test_loo_conventions_against_closed_form_ridge_retraining(wd):
    """Ridge regression, mean 0.5(x̃θ − y)² + (wd/2)‖θ‖², retrains in closed form. Leaving z_j
    out and retraining on the other n − 1 points changes the test loss by ≈ −(I_j − Ī)/(n − 1);
    −I_j/n describes instead the retrain that keeps the 1/n weights (z_j's set to 0)."""
    rng = np.random.default_rng(0)
    n, d, n_test = 100, 3, 10
    x = rng.normal(size=(n + n_test, d))
    y = x @ rng.normal(size=d) + 1.0 + 0.5 * rng.normal(size=n + n_test)
    xa = np.hstack([x, np.ones((n + n_test, 1))])
    xtr, ytr, xte, yte = xa[:n], y[:n], xa[n:], y[n:]

    def solve(weights):  # argmin Σ w_i 0.5(x̃_iθ − y_i)² + (wd/2)‖θ‖²
        return np.linalg.solve(xtr.T @ (weights[:, None] * xtr) + wd * np.eye(d + 1),
                               xtr.T @ (weights * ytr))

    def test_loss(theta):
        return 0.5 * (xte @ theta - yte) ** 2

    theta = solve(np.full(n, 1 / n))
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[None, :d]))
        model.bias.copy_(torch.from_numpy(theta[d:]))
    est = InfluenceEstimator(model, (torch.from_numpy(x[:n]), torch.from_numpy(ytr)),
                             curvature="hessian", solver="direct", damping=0.0,
                             weight_decay=wd, task=_SquaredError())
    infl = est.influence((torch.from_numpy(x[n:]), torch.from_numpy(yte))).numpy()

    base = test_loss(theta)
    retrained, reweighted = [], []
    for j in range(n):
        keep = np.ones(n, dtype=bool)
        keep[j] = False
        retrained.append(test_loss(solve(keep / (n - 1))) - base)
        reweighted.append(test_loss(solve(keep / n)) - base)
    retrained, reweighted = np.stack(retrained, 1), np.stack(reweighted, 1)

    everything = np.arange(n)
    tau = orient(infl, "loss")  # loo_predicted works on attributions of f = −loss
    pred_retrain = -loo_predicted(tau, everything, "retrain")
    pred_reweight = -loo_predicted(tau, everything, "reweight")
    np.testing.assert_allclose(pred_retrain, -(infl - infl.mean(1, keepdims=True)) / (n - 1))
    np.testing.assert_allclose(pred_reweight, -infl / n)

    def err(pred, actual):
        return np.median(np.abs(pred - actual) / np.abs(actual))

    # each convention predicts its own retraining to second order...
    assert err(pred_retrain, retrained) < 0.05 and err(pred_reweight, reweighted) < 0.05
    # ...and misses the other's by far more (the Ī/(n − 1) term)
    assert err(pred_reweight, retrained) > 5 * err(pred_retrain, retrained)
    assert err(pred_retrain, reweighted) > 5 * err(pred_reweight, reweighted)
    assert np.abs(infl.mean(1)).max() > 0  # weight decay: the mean data gradient is −wd·θ̂
    slope = (pred_retrain * retrained).sum() / (pred_retrain ** 2).sum()
    assert 0.95 < slope < 1.1


def test_where_the_data_lie_does_not_invalidate_stored_cells(tmp_path, convex, monkeypatch):
    """``data_dir`` says where the data lie; the data count by their digests (the ground-truth
    key), so another folder with the same data resumes the stored cells, and results written
    when the hash still counted ``data_dir`` are resumed too."""
    from repif.studies.evaluation import runner

    def cells_after(**config):
        return _cells(_run(tmp_path, convex, methods=["grad-dot"], subsets=10, **config))

    monkeypatch.setattr(runner, "_LOCATION_FIELDS", ())  # write as before: data_dir hashed
    first = cells_after(data_dir="/old/place")
    path = tmp_path / "results.json"
    stored = json.loads(path.read_text())
    stored["cells"][0]["score"] = 0.123456  # a sentinel that a recomputed cell would lose
    path.write_text(json.dumps(stored))
    monkeypatch.undo()
    again = cells_after(data_dir="/new/place")
    assert again["grad-dot"]["score"] == 0.123456 and set(again) == set(first)
    assert json.loads(path.read_text())["config"]["data_dir"] == "/new/place"
    other = cells_after(data_dir="/new/place", fraction=0.4)  # a real change still counts
    assert other["grad-dot"]["score"] != 0.123456
