"""The class-removal study (docs/design.md, "Protocol"): results.json schema, determinism, resume,
stale results, corrupt files and the report.

One tiny configuration (digits MLP trained for 5 epochs on 400 points, 2 samplers × sizes 8 and
64 × 2 seeds) is run once per module and copied where a test needs an earlier run.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from statistics import fmean

import pytest

import repif.studies.resources as resources
from repif import cli
from repif.metrics import f1_score
from repif.studies.class_removal.config import StudyConfig
from repif.studies.class_removal.study import MEASURED_FIELDS, Study, StudyError

SAMPLERS = ["random", "logit-importance"]
SIZES = [8, 64]
SEEDS = 2
BASE = dict(dataset="digits", model="mlp", remove=[0], samplers=SAMPLERS, sizes=SIZES,
            seeds=SEEDS, epochs=5, limit_train=400)

#: Fields that measure the machine, not the numbers; excluded from equality checks.
VOLATILE = MEASURED_FIELDS

REMOVAL_KEYS = ("f1", "forget", "consistency", "accuracy_remaining")
CELL_KEYS = ("removed_class", "sampler", "sample_size", "seed", *REMOVAL_KEYS, "ihvp_rel_error",
             "ihvp_cosine", "time_s", "peak_mem_bytes")


def config(**changes) -> StudyConfig:
    return StudyConfig(**{**copy.deepcopy(BASE), **changes})


def key(cell: dict) -> tuple:
    return cell["removed_class"], cell["sampler"], cell["sample_size"], cell["seed"]


def grid(cfg: StudyConfig) -> set[tuple]:
    return {(k, s, m, seed) for k in cfg.remove for s in cfg.samplers for m in cfg.sizes
            for seed in range(cfg.seeds)}


def stable(results: dict) -> dict:
    """``results`` without timing and memory fields, cells sorted by grid point."""
    out = copy.deepcopy(results)
    for row in out["references"] + out["cells"]:
        for k in VOLATILE:
            row.pop(k, None)
    out["cells"].sort(key=key)
    out["references"].sort(key=lambda r: (r["removed_class"], r["kind"]))
    return out


def read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def run(cfg: StudyConfig, out: Path) -> dict:
    return Study(cfg, out, progress=False).run()


@pytest.fixture(scope="module", autouse=True)
def _fast_measure():
    """Skip the full ``gc.collect`` + ``malloc_trim`` before each measured block (about 0.5 s
    each once torch._dynamo is imported); it changes only the memory readings, which no test
    here compares."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resources, "_trim_heap", lambda: None)
        yield


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("baseline")
    return out, run(config(), out)


@pytest.fixture()
def count_cells(monkeypatch) -> list[tuple]:
    """Record the grid point of every cell the study computes."""
    calls: list[tuple] = []
    original = Study._cell

    def counting(self, cls, spec, m, seed, *args, **kw):
        calls.append((cls, spec, m, seed))
        return original(self, cls, spec, m, seed, *args, **kw)

    monkeypatch.setattr(Study, "_cell", counting)
    return calls


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- schema
def test_results_schema(baseline):
    out, returned = baseline
    results = read(out)
    assert results == json.loads(json.dumps(returned))  # what run() returns is what it wrote
    assert {"config", "references", "cells"} <= set(results)
    assert results["config"] == json.loads(json.dumps(config().to_dict()))

    refs = results["references"]
    assert sorted((r["removed_class"], r["kind"]) for r in refs) == [(0, "full"), (0, "retrain")]
    for r in refs:
        for k in REMOVAL_KEYS:
            assert 0.0 <= r[k] <= 1.0, (r["kind"], k, r[k])
        assert r["f1"] == pytest.approx(f1_score(r["forget"], r["consistency"]))

    cells = results["cells"]
    assert len(cells) == len(grid(config())) == 8
    assert {key(c) for c in cells} == grid(config())
    for c in cells:
        assert set(CELL_KEYS) <= set(c), set(CELL_KEYS) - set(c)
        assert isinstance(c["removed_class"], int) and isinstance(c["seed"], int)
        assert isinstance(c["sample_size"], int) and isinstance(c["sampler"], str)
        for k in REMOVAL_KEYS:
            assert 0.0 <= c[k] <= 1.0, (key(c), k, c[k])
        assert c["f1"] == pytest.approx(f1_score(c["forget"], c["consistency"]))
        assert math.isfinite(c["ihvp_rel_error"]) and c["ihvp_rel_error"] >= 0
        assert -1.0 - 1e-9 <= c["ihvp_cosine"] <= 1.0 + 1e-9
        assert math.isfinite(c["time_s"]) and c["time_s"] > 0
        assert isinstance(c["peak_mem_bytes"], int) and c["peak_mem_bytes"] >= 0
    # Every finished cell keeps its estimate v_T for the seed spread.
    assert len(list((out / "vectors" / config().cell_hash()).glob("c*.safetensors"))) == len(
        cells)


def test_ihvp_error_falls_with_sample_size(baseline):
    cells = baseline[1]["cells"]

    def mean_err(sampler, m):
        return fmean(c["ihvp_rel_error"] for c in cells
                     if c["sampler"] == sampler and c["sample_size"] == m)

    small, large = min(SIZES), max(SIZES)
    for s in SAMPLERS:
        assert mean_err(s, large) < mean_err(s, small), s
    overall_small = fmean(mean_err(s, small) for s in SAMPLERS)
    overall_large = fmean(mean_err(s, large) for s in SAMPLERS)
    assert overall_large < 0.8 * overall_small


# --------------------------------------------------------------------------- determinism
def test_same_config_same_numbers(baseline, tmp_path):
    first = read(baseline[0])
    second = run(config(), tmp_path / "again")
    assert stable(second) == stable(first)


# --------------------------------------------------------------------------- resume
def test_interrupted_retrain_keeps_the_full_pool_reference(baseline, tmp_path, monkeypatch):
    """The full-pool solve is written before the retrain starts: an interrupt during the
    retrain costs only the retrain, and the resumed run ends with the uninterrupted numbers."""
    out = tmp_path / "retrain-interrupted"
    original = Study._retrain

    def interrupted(self, cls, rest):
        raise KeyboardInterrupt

    monkeypatch.setattr(Study, "_retrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(), out)
    partial = read(out)
    assert [(r["removed_class"], r["kind"]) for r in partial["references"]] == [
        (config().remove[0], "full")] and partial["cells"] == []
    references: list[str] = []

    def counting_reference(self, cls, *args):
        references.append(cls)
        return original_reference(self, cls, *args)

    original_reference = Study._reference
    monkeypatch.setattr(Study, "_retrain", original)
    monkeypatch.setattr(Study, "_reference", counting_reference)
    final = run(config(), out)
    assert config().remove[0] not in references  # resumed from the stored full-pool solve
    assert stable(final) == stable(read(baseline[0]))


def test_resume_after_interruption(baseline, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    calls: list[tuple] = []
    original = Study._cell
    stop_at = 4

    def flaky(self, cls, spec, m, seed, *args, **kw):
        calls.append((cls, spec, m, seed))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(self, cls, spec, m, seed, *args, **kw)

    monkeypatch.setattr(Study, "_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(config(), out)
    partial = read(out)
    done = {key(c) for c in partial["cells"]}
    assert done == set(calls[: stop_at - 1])  # every finished cell was saved, nothing else

    calls.clear()
    monkeypatch.setattr(Study, "_cell", original)
    resumed_calls: list[tuple] = []

    def counting(self, cls, spec, m, seed, *args, **kw):
        resumed_calls.append((cls, spec, m, seed))
        return original(self, cls, spec, m, seed, *args, **kw)

    monkeypatch.setattr(Study, "_cell", counting)
    final = run(config(), out)
    assert sorted(resumed_calls) == sorted(grid(config()) - done)
    assert len(resumed_calls) == len(set(resumed_calls))
    assert stable(read(out)) == stable(final)
    assert stable(final) == stable(read(baseline[0]))
    # Earlier cells are carried over untouched, timings included.
    by_key = {key(c): c for c in final["cells"]}
    for c in partial["cells"]:
        assert by_key[key(c)] == c
    assert not list(out.glob("results.*.json"))


# --------------------------------------------------------------------------- stale results
def test_changed_config_moves_old_results_aside(baseline, tmp_path, count_cells):
    out = copy_run(baseline[0], tmp_path / "run")
    old_bytes = (out / "results.json").read_bytes()
    old = json.loads(old_bytes)
    # A different damping with a one-cell grid: nothing of the old run may be reused.
    cfg = config(damping=0.05, samplers=["random"], sizes=[8], seeds=1)
    assert cfg.cell_hash() != config().cell_hash()
    new = run(cfg, out)

    backup = out / f"results.{old['config_hash']}.json"
    assert backup.read_bytes() == old_bytes
    assert count_cells == [(0, "random", 8, 0)]
    assert new["config"]["damping"] == 0.05
    assert new["config_hash"] == cfg.cell_hash()
    assert {key(c) for c in new["cells"]} == grid(cfg)
    old_cell = next(c for c in old["cells"] if key(c) == (0, "random", 8, 0))
    new_cell = new["cells"][0]
    assert new_cell["ihvp_rel_error"] != old_cell["ihvp_rel_error"]
    assert stable(read(out)) == stable(new)


def test_more_seeds_reuses_existing_cells(baseline, tmp_path, count_cells):
    out = copy_run(baseline[0], tmp_path / "run")
    old = read(out)
    cfg = config(seeds=SEEDS + 1)
    assert cfg.cell_hash() == config().cell_hash()
    new = run(cfg, out)

    assert sorted(count_cells) == sorted(grid(cfg) - grid(config()))
    assert {key(c) for c in new["cells"]} == grid(cfg)
    by_key = {key(c): c for c in new["cells"]}
    for c in old["cells"]:
        assert by_key[key(c)] == c  # reused as they were, timings included
    assert stable(new)["references"] == stable(old)["references"]
    assert not list(out.glob("results.*.json"))


def test_smaller_grid_reports_its_cells_and_keeps_the_others(baseline, tmp_path, count_cells):
    out = copy_run(baseline[0], tmp_path / "run")
    cfg = config(samplers=["logit-importance"], sizes=[8])
    new = run(cfg, out)
    assert count_cells == []
    assert {key(c) for c in new["cells"]} == grid(cfg)  # what is reported
    kept = read(out)  # finished cells are never deleted
    assert {key(c) for c in kept["cells"]} == grid(config())
    assert stable(kept)["cells"] == stable(read(baseline[0]))["cells"]


def test_repeated_class_gives_one_cell_per_grid_point(baseline, tmp_path, count_cells):
    out = copy_run(baseline[0], tmp_path / "run")
    cfg = config(remove=[0, 0], samplers=["random"], sizes=[8], seeds=SEEDS + 1)
    try:
        new = run(cfg, out)
    except (ValueError, StudyError):
        return  # refusing a repeated class is as good as ignoring the repeat
    assert len(count_cells) == len(set(count_cells))
    assert len(new["cells"]) == len(grid(cfg))


# --------------------------------------------------------------------------- corrupt file
@pytest.mark.parametrize(
    "content",
    [b'{"config": {"dataset": "digits"}, "cells": [{"removed_cl', b"", b"[1, 2, 3]\n",
     b'{"config": {}}\n'],
    ids=["truncated", "empty", "not-an-object", "no-hash"],
)
def test_corrupt_results_raise_and_are_left_alone(tmp_path, count_cells, content):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "results.json"
    path.write_bytes(content)
    with pytest.raises(StudyError) as err:
        run(config(), out)
    assert str(path) in str(err.value)
    assert path.read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert count_cells == []


def test_output_directory_that_is_a_file(tmp_path):
    path = tmp_path / "results"
    path.write_text("not a directory")
    with pytest.raises(StudyError, match="is a file"):
        Study(config(), path, progress=False)
    assert path.read_text() == "not a directory"


# --------------------------------------------------------------------------- report
def test_cli_writes_report_and_plots(baseline, tmp_path, count_cells, capsys):
    out = copy_run(baseline[0], tmp_path / "run")
    argv = ["class-removal", "--dataset", "digits", "--model", "mlp", "--remove", "0",
            "--samplers", ",".join(SAMPLERS), "--sizes", ",".join(map(str, SIZES)),
            "--seeds", str(SEEDS), "--epochs", "5", "--limit-train", "400",
            "--out", str(out)]
    assert cli.main(argv) == 0
    assert count_cells == []  # same configuration: every cell reused
    assert not list(out.glob("results.*.json"))
    report = out / "report.html"
    assert report.is_file()
    page = report.read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "</html>" in page
    pngs = sorted(out.glob("*.png"))
    # F1, literature F1, inverse-HVP error, time, memory against m; F1 against time
    assert {p.name for p in pngs} == {"f1_vs_size.png", "f1_literature_vs_size.png",
                                      "ihvp_error_vs_size.png", "time_vs_size.png",
                                      "memory_vs_size.png", "f1_vs_time.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 1000
        assert f'src="{png.name}"' in page
    for sampler in SAMPLERS:
        assert sampler in page
    # Without --quiet the summary table (mean ± std per sampler and size) is printed.
    printed = capsys.readouterr().out
    for sampler in SAMPLERS:
        assert any(line.startswith(sampler) and "±" in line for line in printed.splitlines())
    assert "reference: full pool" in printed and "reference: retrain" in printed
    assert str(out / "results.json") in printed and str(report) in printed


def test_a_negative_saving_reads_as_more():
    from repif.studies.class_removal.summary import _saving

    assert _saving(0.25, "time") == "25.0% less time"
    assert _saving(-0.261, "memory") == "26.1% more memory"
