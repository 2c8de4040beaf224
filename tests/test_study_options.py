"""Study options for large models: Kronecker curvatures, the memory budget, the literature's F1,
and pool statistics shared between estimators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repif
from repif.cli import _config, _parser
from repif.memory import parse_bytes
from repif.metrics import f1_score, removal_scores
from repif.studies.class_removal.config import StudyConfig, parse_sampler


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * 2**30), ("512 MB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("4096", 4096),
    ("64k", 64 * 2**10), ("1TB", 2**40),
])
def test_parse_bytes_reads_units_as_powers_of_1024(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1G", "0", "2XB", "inf", "nanG"])
def test_parse_bytes_refuses_what_is_not_memory(text):
    with pytest.raises(ValueError, match="2GiB"):
        parse_bytes(text)


def test_cli_passes_kronecker_options_and_memory_to_the_config():
    args = _parser().parse_args([
        "class-removal", "--curvature", "ekfac", "--solver", "eigen", "--fisher", "sampled",
        "--other-layers", "frozen", "--weight-sharing", "reduce", "--max-memory", "1GiB",
        "--batch-size", "128"])
    cfg = _config(args)
    cfg.validate()
    assert (cfg.curvature, cfg.solver, cfg.fisher, cfg.other_layers) == (
        "ekfac", "eigen", "sampled", "frozen")
    assert cfg.max_memory == 2**30 and cfg.batch_size == 128
    assert cfg.kronecker_options() == {"fisher": "sampled", "other_layers": "frozen",
                                       "weight_sharing": "reduce"}


def test_memory_budget_does_not_change_the_cell_hash():
    assert StudyConfig(max_memory=2**20).cell_hash() == StudyConfig().cell_hash()
    kfac = StudyConfig(curvature="kfac", solver="eigen")
    assert kfac.cell_hash() != StudyConfig().cell_hash()
    assert StudyConfig(curvature="kfac", solver="eigen", weight_sharing="reduce").cell_hash() \
        != kfac.cell_hash()


@pytest.mark.parametrize("kwargs, match", [
    ({"curvature": "kfac", "solver": "cg"}, "--solver eigen"),
    ({"curvature": "ggn", "solver": "eigen"}, "--solver eigen"),
    ({"curvature": "ggn", "fisher": "sampled"}, "--fisher, --other-layers, --weight-sharing"),
    ({"curvature": "ggn", "eigh_dtype": "float32"}, "--eigh-dtype and --basis-size configure"),
    ({"curvature": "kfac", "solver": "eigen", "eigh_dtype": "float16"}, "--eigh-dtype must"),
    ({"references": "none"}, "--references none needs a step scale: pass --scale"),
    ({"references": "some", "scale": 1.0}, "--references must be"),
    ({"curvature": "ggn", "weight_sharing": "reduce"}, "leave them out with --curvature ggn"),
    ({"curvature": "kfac", "solver": "eigen", "weight_sharing": "sum"}, "--weight-sharing must"),
    ({"curvature": "kfac", "solver": "eigen", "fisher": "guess"}, "--fisher must be"),
    ({"curvature": "ekfac", "solver": "eigen", "other_layers": "skip"}, "--other-layers must"),
    ({"curvature": "fisher"}, "unknown curvature 'fisher'"),
    ({"curvature": "kfac", "solver": "eigen", "basis_size": "pool"}, "use --curvature ekfac"),
    ({"curvature": "ekfac", "solver": "eigen", "basis_size": 0}, "--basis-size must be"),
    ({"curvature": "ggn", "basis_size": "pool"}, "--basis-size configure"),
    ({"max_memory": 100}, "too small"),
])
def test_bad_study_options_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs).validate()


def test_literature_f1_pairs_forget_with_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 1])
    original = torch.tensor([0, 0, 1, 2, 2, 2, 1, 1])
    new = torch.tensor([1, 0, 1, 1, 2, 1, 1, 1])
    s = removal_scores(new, original, labels, removed_class=0)
    forget = 0.5                        # one of the two class-0 points still predicted 0
    accuracy = 4 / 6                    # others: positions 2, 3, 4, 7 right
    consistency = 4 / 6                 # others: positions 2, 4, 6, 7 unchanged
    assert s.f1_literature == pytest.approx(2 * forget * accuracy / (forget + accuracy))
    assert s.f1 == pytest.approx(f1_score(forget, consistency))


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    y = (x[:, :3].argmax(1)).long()
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return net, x, y


@pytest.mark.parametrize("sampler", ["logit-importance", "feature-herding", "logit-stratified"])
def test_shared_pool_statistics_give_the_subset_and_solve_of_a_fresh_pass(problem, sampler):
    net, x, y = problem
    kw = dict(solver="cg", sampler=sampler, sample_size=40, seed=3, damping=0.1)
    fresh = repif.InfluenceEstimator(net, (x, y), **kw)
    stats = repif.InfluenceEstimator(net, (x, y)).pool_statistics()
    assert [t.shape[0] for t in stats] == [300, 300, 300]
    shared = repif.InfluenceEstimator(net, (x, y), pool_statistics=stats, **kw)
    pool = torch.arange(20, 300)  # a pool that is not every point: rows are picked by index
    fresh.fit(pool)
    shared.fit(pool)
    assert shared.fitter.statistics_used
    assert torch.equal(fresh.fitted.subset.indices, shared.fitted.subset.indices)
    # the weights come from logits of other chunk compositions (a pass over the pool against
    # one over every point): equal up to the last bits on some processors
    torch.testing.assert_close(shared.fitted.subset.weights, fresh.fitted.subset.weights,
                               rtol=1e-12, atol=0)
    g = torch.randn(2, fresh.fm.theta.numel(), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shared.inverse_hvp(g), fresh.inverse_hvp(g))


def test_random_sampler_reads_no_pool_statistics(problem):
    net, x, y = problem
    stats = repif.InfluenceEstimator(net, (x, y)).pool_statistics()
    est = repif.InfluenceEstimator(net, (x, y), solver="cg", sampler="random", sample_size=30,
                                   pool_statistics=stats).fit()
    assert not est.fitter.statistics_used
    assert not repif.samplers.REGISTRY.get("random").uses_statistics
    assert repif.samplers.REGISTRY.get("logit-importance").uses_statistics


def test_pool_statistics_of_another_shape_are_refused(problem):
    net, x, y = problem
    logits, feats, targets = repif.InfluenceEstimator(net, (x, y)).pool_statistics()
    with pytest.raises(ValueError, match="one row per training point"):
        repif.InfluenceEstimator(net, (x, y), pool_statistics=(logits[:10], feats, targets))
    with pytest.raises(ValueError, match="tuple of tensors"):
        repif.InfluenceEstimator(net, (x, y), pool_statistics=logits)


@pytest.mark.parametrize("spec, expected", [
    ("logit-importance", ("logit-importance", 0.0, None)),
    ("logit-importance+shrink", ("logit-importance", "auto", None)),
    ("logit-stratified+cand8", ("logit-stratified", 0.0, 8.0)),
    ("logit-importance+cand2.5+shrink", ("logit-importance", "auto", 2.5)),
])
def test_sampler_specs_read_shrinkage_and_candidates(spec, expected):
    assert parse_sampler(spec) == expected
    args = _parser().parse_args(["class-removal", "--samplers", f"random,{spec}"])
    _config(args).validate()  # the study accepts the spec


@pytest.mark.parametrize("spec", ["logit-importance+cand", "logit-importance+cand0.5",
                                  "logit-importance+candx", "logit-importance+fast"])
def test_a_bad_sampler_suffix_names_the_forms(spec):
    with pytest.raises(ValueError, match=r"\+shrink.*\+candN"):
        parse_sampler(spec)


def test_a_two_phase_study_cell_makes_its_own_pass_over_its_candidates(tmp_path):
    """+candN cells charge no shared whole-pool pass: their own pass over N·m candidates is
    inside the cell's time; the whole-pool sampler is charged the shared pass."""
    from repif.studies.class_removal.study import Study

    config = StudyConfig(dataset="digits", model="mlp", remove=[0],
                         samplers=["logit-importance", "logit-importance+cand4"], sizes=[16],
                         seeds=1, epochs=3, limit_train=400, limit_test=100)
    results = Study(config, tmp_path, progress=False).run()
    cells = {c["sampler"]: c for c in results["cells"]}
    assert cells["logit-importance"]["pool_pass_s"] > 0
    assert cells["logit-importance+cand4"]["pool_pass_s"] == 0
    for c in cells.values():
        parts = c["sample_time_s"] + c["fit_s"] + c["solve_step_s"] + c["gradient_s"]
        assert c["time_s"] == pytest.approx(parts, rel=1e-6, abs=1e-9)


def test_cli_passes_eigh_dtype_and_references_and_defaults_keep_the_hash():
    args = _parser().parse_args([
        "class-removal", "--curvature", "kfac", "--solver", "eigen", "--eigh-dtype", "float32",
        "--references", "none", "--scale", "2.5"])
    cfg = _config(args)
    cfg.validate()
    assert cfg.kronecker_options() == {"eigh_dtype": "float32"}
    assert (cfg.references, cfg.scale) == ("none", 2.5)
    # results written before the options existed resume: their defaults leave the hash alone
    base = StudyConfig(curvature="kfac", solver="eigen")
    assert StudyConfig(curvature="kfac", solver="eigen", references="all").cell_hash() \
        == base.cell_hash()
    assert StudyConfig(curvature="kfac", solver="eigen", eigh_dtype="float32").cell_hash() \
        != base.cell_hash()


def test_a_study_without_references_gives_the_cells_of_one_with_them(tmp_path):
    """--references none with the η a full run picked: the same cells (the same subsets, g and
    solve; F1 compared exactly, the update direction to float64 round-off), no reference rows,
    and a null inverse-HVP error where there is no v_R to measure it against."""
    from repif.studies.class_removal.study import Study

    common = dict(dataset="digits", model="mlp", remove=[0], samplers=["random"], sizes=[16],
                  seeds=2, epochs=3, limit_train=400, limit_test=100)
    full = Study(StudyConfig(**common), tmp_path / "all", progress=False).run()
    scale = next(r["scale"] for r in full["references"] if r["kind"] == "full")
    study = Study(StudyConfig(**common, references="none", scale=scale), tmp_path / "none",
                  progress=False)
    bare = study.run()
    assert bare["references"] == []
    key = lambda c: (c["sampler"], c["sample_size"], c["seed"])  # noqa: E731
    for a, b in zip(sorted(full["cells"], key=key), sorted(bare["cells"], key=key), strict=True):
        assert (a["f1"], a["forget"], a["consistency"]) == (b["f1"], b["forget"],
                                                             b["consistency"])
        assert a["ihvp_rel_error"] is not None and b["ihvp_rel_error"] is None
        assert b["ihvp_cosine"] is None and b["scale"] == scale
    with_refs = Study(StudyConfig(**common), tmp_path / "all", progress=False)
    for va, vb in zip(with_refs.vectors(0, "random", 16), study.vectors(0, "random", 16),
                      strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-10, atol=1e-12)


def test_cli_passes_basis_size_and_the_study_fits_the_basis_on_the_retained_points(
        tmp_path, basis_draws):
    """--basis-size reaches the estimator's kronecker_options and changes the cells' hash (the
    default leaves it alone); a study cell then draws the basis from the retained classes: the
    removed class's points are never among them."""
    from repif.studies.class_removal.study import Study

    for text, value in (("pool", "pool"), ("300", 300)):
        cfg = _config(_parser().parse_args([
            "class-removal", "--curvature", "ekfac", "--solver", "eigen",
            "--basis-size", text]))
        cfg.validate()
        assert cfg.kronecker_options() == {"basis_size": value}
    with pytest.raises(SystemExit):
        _parser().parse_args(["class-removal", "--basis-size", "all"])
    base = StudyConfig(curvature="ekfac", solver="eigen")
    assert StudyConfig(curvature="ekfac", solver="eigen", basis_size=None).cell_hash() \
        == base.cell_hash()
    assert StudyConfig(curvature="ekfac", solver="eigen", basis_size="pool").cell_hash() \
        != base.cell_hash()

    cfg = StudyConfig(dataset="digits", model="mlp", remove=[0], samplers=["random"],
                      sizes=[16], seeds=1, epochs=3, limit_train=300, limit_test=60,
                      curvature="ekfac", solver="eigen", basis_size=100)
    study = Study(cfg, tmp_path, progress=False)
    results = study.run()
    drawn = basis_draws
    assert drawn and all(idx.numel() == 100 for idx in drawn)
    labels = study.train_y
    for idx in drawn:
        assert not bool((labels[idx] == 0).any())  # the removed class is never in the basis
    assert all(0.0 <= c["f1"] <= 1.0 for c in results["cells"])
