"""Inputs that used to end in a raw torch error, a misleading hint or a silent choice: each is
refused with one error naming the value and the fix, or handled as a user would expect (a
DataLoader's sampler selects the points; empty test data give empty results)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

import repif
import repif.studies.class_removal.rows as study_rows
import repif.studies.evaluation.rows as evaluation_rows
from repif import cli
from repif.studies import runs
from repif.studies.class_removal.config import StudyConfig
from repif.studies.evaluation import EvaluationConfig, EvaluationError, ModelStore

pytestmark = pytest.mark.usefixtures("single_thread")

N, D, C = 40, 5, 3


@pytest.fixture()
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    return x, y


@pytest.fixture()
def linear():
    torch.manual_seed(0)
    return nn.Linear(D, C).double()  # 18 parameters


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


# --------------------------------------------------------------------------- data forms
@pytest.mark.parametrize("wrap", [False, True], ids=["dataset", "dataloader"])
def test_iterable_dataset_names_the_fix(linear, data, wrap):
    stream = _Stream(*data)
    train = DataLoader(stream, batch_size=4) if wrap else stream
    with pytest.raises(TypeError, match=r"training data are a torch IterableDataset \(_Stream\)"
                                        r".*materialise it.*map-style Dataset"):
        repif.InfluenceEstimator(linear, train)
    est = repif.InfluenceEstimator(linear, data)
    with pytest.raises(TypeError, match=r"test data are a torch IterableDataset"):
        est.influence(stream)


@pytest.mark.parametrize("batched", [False, True], ids=["sampler", "batch_sampler"])
def test_subset_sampler_selects_its_points_in_dataset_order(linear, data, batched):
    """A DataLoader with a SubsetRandomSampler means "these points": the estimator works on
    them, numbered in ascending dataset index, exactly as on that subset of the tensors."""
    x, y = data
    chosen = [31, 4, 17, 9, 22, 0, 38, 13, 27, 6, 35, 19]
    sampler = SubsetRandomSampler(chosen, generator=torch.Generator().manual_seed(3))
    ds = TensorDataset(x, y)
    loader = (DataLoader(ds, batch_sampler=BatchSampler(sampler, 5, drop_last=False)) if batched
              else DataLoader(ds, batch_size=5, sampler=sampler))
    est = repif.InfluenceEstimator(linear, loader, damping=0.1)
    order = sorted(chosen)
    assert est.n_train == len(chosen)
    assert est.source.dataset_indices.tolist() == order
    plain = repif.InfluenceEstimator(linear, (x[order], y[order]), damping=0.1)
    torch.testing.assert_close(est.influence((x[:3], y[:3])), plain.influence((x[:3], y[:3])),
                               rtol=1e-10, atol=0)  # same maths, batched differently
    # as test data, the loader's points are the rows, in the same order
    full = repif.InfluenceEstimator(linear, data, damping=0.1)
    torch.testing.assert_close(full.influence(loader), full.influence((x[order], y[order])),
                               rtol=1e-10, atol=0)


def test_shuffling_loader_gives_every_point_in_dataset_order(linear, data):
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    est = repif.InfluenceEstimator(linear, loader)
    assert est.n_train == N and est.source.dataset_indices is None


@pytest.mark.parametrize("make, words", [
    (lambda ds: DataLoader(ds, sampler=WeightedRandomSampler(torch.ones(N), N)),
     "WeightedRandomSampler"),
    (lambda ds: DataLoader(ds, sampler=RandomSampler(ds, replacement=True)),
     "with replacement"),
    (lambda ds: DataLoader(ds, sampler=RandomSampler(ds, num_samples=10)),
     "samples 10 of its 40 points"),
    (lambda ds: DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=0)),
     "shards the data across processes itself"),
    (lambda ds: DataLoader(ds, sampler=SubsetRandomSampler([1, 5, 1])), "listing an index twice"),
    (lambda ds: DataLoader(ds, sampler=SubsetRandomSampler([1, 40])), "holding index 40, outside"),
    (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]), "custom batch_sampler"),
], ids=["weighted", "replacement", "fewer", "distributed", "duplicate", "range", "batches"])
def test_samplers_repif_cannot_honour_are_refused(linear, data, make, words):
    with pytest.raises(ValueError, match="the DataLoader passed as training data ") as err:
        repif.InfluenceEstimator(linear, make(TensorDataset(*data)))
    assert words in str(err.value)


@pytest.mark.parametrize("bad", [2.5, True, 0, -3, "8"])
def test_batch_size_must_be_a_positive_integer(linear, data, bad):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer or None, got "
                                         rf"{bad!r}".replace("(", r"\(")):
        repif.InfluenceEstimator(linear, data, batch_size=bad)


# --------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("empty", [[], torch.tensor([]), torch.tensor([], dtype=torch.long)],
                         ids=["list", "float-tensor", "long-tensor"])
def test_removing_nothing_says_the_set_is_empty(linear, data, empty):
    est = repif.InfluenceEstimator(linear, data)
    with pytest.raises(ValueError, match=r"no indices to remove"):
        est.remove(empty)


def test_empty_test_data_and_blocks_give_empty_results(linear, data, monkeypatch):
    x, y = data
    est = repif.InfluenceEstimator(linear, data, solver="cg")

    def no_solve(*args, **kwargs):
        raise AssertionError("an empty input must not reach the solver")

    monkeypatch.setattr(type(est), "_solve", no_solve)
    scores = est.influence((x[:0], y[:0]))
    assert scores.shape == (0, N) and scores.dtype == torch.float64
    assert est.influence(TensorDataset(x[:0], y[:0]), train_indices=[1, 2]).shape == (0, 2)
    block = est.inverse_hvp(torch.zeros(0, est.num_params, dtype=torch.float64))
    assert block.shape == (0, est.num_params)
    assert est.test_gradients((x[:0], y[:0])).shape == (0, est.num_params)
    assert est._fitted is None  # nothing was fitted for them either
    with pytest.raises(ValueError, match=r"the training data are empty"):
        repif.InfluenceEstimator(linear, (x[:0], y[:0]))


# --------------------------------------------------------------------------- repif evaluate
def _exit_code(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 1


@pytest.mark.parametrize("method, words", [
    ("kfac:cg", "curvature kfac is inverted in its eigenbasis, not by solver cg"),
    ("ggn:eigen", "solver eigen inverts only curvature kfac or curvature ekfac"),
    ("hessian:woodbury@random", "solver woodbury inverts only curvature ggn"),
])
def test_evaluate_refuses_a_curvature_its_solver_cannot_invert_before_training(
        tmp_path, capsys, monkeypatch, method, words):
    def no_training(*args, **kwargs):
        raise AssertionError("nothing may be retrained for an invalid method")

    monkeypatch.setattr(ModelStore, "run", no_training)
    out = tmp_path / "run"
    code = _exit_code(["evaluate", "--model", "linear", "--methods", f"grad-dot,{method}",
                       "--out", str(out), "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"repif: error: method {method!r}: ") and words in lines[0]
    assert not out.exists()


def test_the_same_pair_check_serves_the_estimator_and_the_study(linear, data):
    with pytest.raises(ValueError, match=r"solver='woodbury' inverts only curvature='ggn', not "
                                         r"curvature='hessian'.*solver='cg'"):
        repif.InfluenceEstimator(linear, data, curvature="hessian", solver="woodbury")
    with pytest.raises(ValueError, match=r"--solver woodbury inverts only --curvature ggn"):
        StudyConfig(curvature="hessian", solver="woodbury").validate()


@pytest.mark.parametrize("flag, value, words", [
    ("--lr", "-0.1", "argument --lr: expected a finite number > 0"),
    ("--lr", "0", "argument --lr: expected a finite number > 0"),
    ("--train-seed", "-1", "argument --train-seed: expected a seed, a whole number ≥ 0"),
    ("--subset-seed", "-2", "argument --subset-seed: expected a seed, a whole number ≥ 0"),
    ("--hidden", "0", "argument --width/--hidden: hidden widths must be positive integers"),
    ("--hidden", "64,-8", "argument --width/--hidden: hidden widths must be positive integers"),
])
def test_evaluate_flags_out_of_range_are_usage_errors(tmp_path, capsys, flag, value, words):
    out = tmp_path / "run"
    assert _exit_code(["evaluate", f"{flag}={value}", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("field, value, words", [
    ("loo_points", 2.5, "loo_points must be a count of training points"),
    ("loo_points", True, "loo_points must be a count of training points"),
    ("loo_points", [3, 4.0], "loo_points must be a count of training points"),
    ("test_points", 3.7, "test_points must be a list of test indices"),
    ("test_points", [0, 1.5], "test_points must be a list of test indices"),
    ("test_points", [False, 1], "test_points must be a list of test indices"),
    ("lr", -0.01, "--lr must be a finite number > 0"),
    ("hidden", 0, "--hidden must be positive widths"),
    ("train_seed", -1, "--train-seed must be a whole number ≥ 0"),
    ("subset_seed", 0.5, "--subset-seed must be a whole number ≥ 0"),
])
def test_evaluation_config_refuses_bad_fields_when_made(field, value, words):
    with pytest.raises(ValueError, match=r"got") as err:
        EvaluationConfig(metric="loo", **{field: value})
    assert words in str(err.value) and repr(value) in str(err.value)


def test_evaluation_config_keeps_good_fields():
    cfg = EvaluationConfig(metric="loo", loo_points=[3, 4], test_points=[0, 2], hidden=[8, 4],
                           lr=0.1, train_seed=3, subset_seed=0)
    assert (cfg.loo_points, cfg.test_points) == ([3, 4], [0, 2])
    assert EvaluationConfig(metric="loo", loo_points=5).loo_points == 5


# --------------------------------------------------------------------------- results files
def _study_results() -> dict:
    metrics = dict(f1=0.9, forget=0.95, consistency=0.85, accuracy_remaining=0.8,
                   time_s=0.1, peak_mem_bytes=1024)
    cell = dict(removed_class=0, sampler="random", sample_size=8, seed=0, ihvp_rel_error=0.3,
                ihvp_cosine=0.95, f1_literature=0.88, **metrics)
    refs = [dict(removed_class=0, kind="full", scale=1.0, **metrics),
            dict(removed_class=0, kind="retrain", **metrics)]
    return {"config": {}, "config_hash": "0123abcd", "references": refs, "cells": [cell]}


@pytest.mark.parametrize("part, field, value", [
    ("cells", "f1", 7.5), ("cells", "forget", -0.2), ("cells", "consistency", 1.5),
    ("cells", "accuracy_remaining", 2.0), ("cells", "f1_literature", 1.01),
    ("cells", "ihvp_cosine", -1.5), ("cells", "ihvp_rel_error", -1.0),
    ("cells", "f1", float("nan")), ("references", "f1", 7.5),
])
def test_study_results_outside_their_range_are_refused(tmp_path, part, field, value):
    path = tmp_path / "results.json"
    results = _study_results()
    assert study_rows.check_results(json.loads(json.dumps(results)), path)  # valid as made
    results[part][0][field] = value
    path.write_text(json.dumps(results))  # a bare NaN, as a hand edit may leave it
    with pytest.raises(study_rows.StudyError) as err:
        study_rows.read_results(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {part}[0] has {field}={value!r}, outside [")
    assert "edited or damaged" in msg


def test_cosines_a_rounding_error_past_one_are_kept(tmp_path):
    results = _study_results()
    results["cells"][0]["ihvp_cosine"] = 1.0000000000000002
    assert study_rows.check_results(results, tmp_path / "results.json") is results


def _evaluation_results() -> dict:
    cell = dict(method="ggn:direct", sample_size=0, seed=0, damping=0.01, score=0.4,
                score_se=0.05, time_s=0.2, peak_mem_bytes=10, per_test=[0.3, None, 0.5])
    return {"config": {}, "config_hash": "0123abcd", "cells": [cell]}


@pytest.mark.parametrize("field, value, shown", [
    ("score", 3.5, "score=3.5, outside [-1, 1]"),
    ("score", -1.2, "score=-1.2, outside [-1, 1]"),
    ("score_se", -0.1, "score_se=-0.1, outside [0, inf]"),
    ("damping", -0.01, "damping=-0.01, outside [0, inf]"),
    ("per_test", [0.3, 1.7], "per_test[1]: score=1.7, outside [-1, 1]"),
    ("per_test", [0.3, "x"], "per_test[1]='x', not a number or null"),
])
def test_evaluation_results_outside_their_range_are_refused(tmp_path, field, value, shown):
    path = tmp_path / "results.json"
    results = _evaluation_results()
    assert evaluation_rows.check_results(json.loads(json.dumps(results)), path)
    results["cells"][0][field] = value
    path.write_text(json.dumps(results))
    with pytest.raises(EvaluationError) as err:
        evaluation_rows.read_results(path)
    assert str(err.value).startswith(f"{path}: cells[0] has {shown}")


# --------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("command", [["class-removal"], ["evaluate"]], ids=["study", "evaluate"])
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "no-permission"])
def test_unwritable_out_is_an_environment_failure_exit_1(tmp_path, capsys, monkeypatch, command,
                                                         code):
    """The README's exit codes: 1 for the environment (a read-only file system, no write
    permission), 2 for bad input. Simulated, since root may write anywhere."""
    out = tmp_path / "run"

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runs.tempfile, "mkstemp", refuse)
    assert _exit_code([*command, "--out", str(out), "--quiet"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"output directory {out} is not writable ({os.strerror(code)})" in lines[0]
    assert "pass another --out" in lines[0]


@pytest.mark.parametrize("which", ["study", "evaluation"])
def test_stored_configuration_with_an_unknown_key_is_refused_by_name(which):
    """A results file's configuration with a key this version does not know (a typo, another
    version) is an error naming the key, not silently dropped."""
    from repif.studies.class_removal.config import StudyConfig
    from repif.studies.evaluation.runner import EvaluationConfig

    cls = StudyConfig if which == "study" else EvaluationConfig
    good = cls.from_dict(cls().to_dict()) if hasattr(cls(), "to_dict") else cls()
    d = dict(vars(good), dampnig=0.1)
    with pytest.raises(ValueError, match="dampnig"):
        cls.from_dict(d)
    assert cls.from_dict(dict(vars(good))) == good
