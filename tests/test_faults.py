"""Faults in and around a study (docs/design.md, "Failure behaviour"): nothing finished is lost,
nothing damaged is silently used, and every expected failure of the command line is one line
with exit code 1 (environment) or 2 (bad input) while bugs keep their traceback.

One tiny study (digits MLP, 3 epochs on 300 points; random and logit-importance at m = 8, 3
seeds: 6 cells) is run once per module and copied where a test needs a finished run.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io as stdio
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import repif.studies.class_removal.cells as cells_module
import repif.studies.resources as resources
from repif import cli, io
from repif.errors import CorruptFileError
from repif.studies import runs as lock_module
from repif.studies.class_removal.config import StudyConfig
from repif.studies.class_removal.study import MEASURED_FIELDS, Study, StudyEnvironmentError
from repif.studies.runs import OutputLock, OutputLockedError

BASE = dict(dataset="digits", model="mlp", remove=[0], samplers=["random", "logit-importance"],
            sizes=[8], seeds=3, epochs=3, limit_train=300)
#: The same study on the command line (its other options are StudyConfig's defaults).
ARGS = ["class-removal", "--dataset", "digits", "--model", "mlp", "--remove", "0",
        "--samplers", "random,logit-importance", "--sizes", "8", "--seeds", "3",
        "--epochs", "3", "--limit-train", "300", "--quiet"]
VOLATILE = MEASURED_FIELDS


def config(**changes) -> StudyConfig:
    return StudyConfig(**{**copy.deepcopy(BASE), **changes})


def key(cell: dict) -> tuple:
    return cell["removed_class"], cell["sampler"], cell["sample_size"], cell["seed"]


def stable(results: dict) -> dict:
    """Cells and references without machine measurements, sorted."""
    rows = {"cells": [], "references": []}
    for part in rows:
        for r in results[part]:
            rows[part].append({k: v for k, v in r.items() if k not in VOLATILE})
    rows["cells"].sort(key=key)
    rows["references"].sort(key=lambda r: (r["removed_class"], r["kind"]))
    return rows


def read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def run(cfg: StudyConfig, out: Path) -> dict:
    return Study(cfg, out, progress=False).run()


def vector_dir(out: Path, cfg: StudyConfig | None = None) -> Path:
    return out / "vectors" / (cfg or config()).cell_hash()


def cell_vector(out: Path, k: tuple) -> Path:
    cls, spec, m, seed = k
    return vector_dir(out) / f"c{cls}_{spec}_m{m}_s{seed}.safetensors"


def damage(path: Path) -> None:
    """Overwrite a few bytes of a safetensors file's data behind its intact header."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start + 8, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def all_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def exit_code(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 1


def one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("repif: error: ")
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _fast_measure():
    """Skip the gc + malloc_trim before each measured block; only memory readings change."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resources, "_trim_heap", lambda: None)
        yield


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("faults") / "baseline"
    return out, run(config(), out)


@pytest.fixture()
def finished(baseline, tmp_path) -> Path:
    """A copy of the finished baseline run."""
    return Path(shutil.copytree(baseline[0], tmp_path / "run"))


@pytest.fixture()
def count_cells(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    original = Study._cell

    def counting(self, cls, spec, m, seed, *args, **kw):
        calls.append((cls, spec, m, seed))
        return original(self, cls, spec, m, seed, *args, **kw)

    monkeypatch.setattr(Study, "_cell", counting)
    return calls


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- io
def test_json_is_strict(tmp_path):
    path = tmp_path / "r.json"
    io.write_json_atomic(path, {"a": float("nan"), "b": [float("inf"), 1.5, -float("inf")],
                                "c": {"d": (float("nan"),)}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [None, 1.5, None],
                                                       "c": {"d": [None]}}


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_of_ordinary_new_files(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        io.write_json_atomic(tmp_path / "a.json", {"x": 1})
        io.save_tensors_atomic(tmp_path / "t.safetensors", {"v": torch.ones(2)})
        io.write_bytes_atomic(tmp_path / "b.bin", lambda: b"x")
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == mode, (p.name, oct(p.stat().st_mode))


def test_damaged_tensors_fail_their_checksum(tmp_path):
    path = tmp_path / "v.safetensors"
    io.save_tensors_atomic(path, {"v": torch.arange(10.0, dtype=torch.float64)}, {"k": 1})
    damage(path)
    with pytest.raises(CorruptFileError, match=r"v\.safetensors: its tensors do not match their "
                                               r"stored SHA-256 checksum"):
        io.load_tensors(path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_failed_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, code):
    path = tmp_path / "results.json"
    io.write_json_atomic(path, {"old": True})

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io.os, "fsync", fail)
    with pytest.raises(OSError) as info:
        io.write_json_atomic(path, {"new": True})
    assert info.value.errno == code and info.value.filename == str(path)
    monkeypatch.undo()
    assert io.read_json(path) == {"old": True}
    assert os.listdir(tmp_path) == ["results.json"]


def test_remove_temporaries_touches_only_interrupted_writes(tmp_path):
    ours = [tmp_path / ".results.json.ab_cd123.tmp",
            tmp_path / "sub" / ".v.safetensors.x1y2z3w4.tmp"]
    theirs = [tmp_path / "notes.tmp", tmp_path / ".editor.tmp", tmp_path / "results.json"]
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    assert io.remove_temporaries(tmp_path) == [ours[0]]
    assert sorted(io.remove_temporaries(tmp_path, recursive=True)) == [ours[1]]
    assert all(p.exists() for p in theirs)


# --------------------------------------------------------------------------- lock
def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with OutputLock(tmp_path):
        info = json.loads((tmp_path / lock_module.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(OutputLockedError) as err:
            OutputLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in msg
        assert "wait for it to finish or pass another --out" in msg
        assert "delete" not in msg  # with flock only a live process holds it: no such advice
    assert not (tmp_path / lock_module.LOCK_NAME).exists()  # a clean exit removes it


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "pid-only"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, monkeypatch, flock):
    if not flock:
        monkeypatch.setattr(lock_module, "fcntl", None)
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "started": time.time(),
            "command": "repif class-removal"}
    (tmp_path / lock_module.LOCK_NAME).write_text(json.dumps(dead))
    with caplog.at_level(logging.WARNING, logger="repif.study"), OutputLock(tmp_path):
        pass
    assert f"taking over the lock of {tmp_path}" in caplog.text
    assert f"PID {dead['pid']}" in caplog.text
    assert not (tmp_path / lock_module.LOCK_NAME).exists()


def test_pid_only_lock_refuses_a_live_process(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "fcntl", None)
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": time.time()}
    (tmp_path / lock_module.LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(OutputLockedError, match=rf"PID {os.getppid()} on host.*if no such "
                                                rf"process runs, delete"):
        OutputLock(tmp_path).acquire()
    assert json.loads((tmp_path / lock_module.LOCK_NAME).read_text()) == live


def test_second_run_on_the_same_output_is_refused(finished, capsys):
    before = {p: p.read_bytes() for p in all_files(finished)}
    with OutputLock(finished):  # a first run holds the directory
        capsys.readouterr()
        assert exit_code(ARGS + ["--out", str(finished)]) == 1
        line = one_line(capsys)
        assert "is in use by another repif run" in line and f"PID {os.getpid()}" in line
        assert "--out" in line
        after = {p: p.read_bytes() for p in all_files(finished)
                 if p.name != lock_module.LOCK_NAME}
        assert after == before  # nothing written by the refused run
    assert exit_code(ARGS + ["--out", str(finished)]) == 0  # free again


# --------------------------------------------------------------------------- nothing lost
def test_smaller_grid_keeps_the_finished_cells(baseline, finished, count_cells):
    small = config(samplers=["random"], seeds=1)
    reported = run(small, finished)
    assert count_cells == []
    assert [key(c) for c in reported["cells"]] == [(0, "random", 8, 0)]
    assert stable(read(finished))["cells"] == stable(baseline[1])["cells"]  # all 6 kept
    assert not list(finished.glob("results.*.json"))


def test_backups_merge_and_never_shrink(baseline, finished, count_cells, monkeypatch):
    """A → B → A (more seeds, interrupted) → B: the backup of A only grows, each
    configuration resumes from its own backup, and no cell is computed twice."""
    a_hash = config().cell_hash()
    other = config(damping=0.05, samplers=["random"], seeds=1)
    run(other, finished)  # A → B
    backup_a = finished / f"results.{a_hash}.json"
    assert stable(json.loads(backup_a.read_text()))["cells"] == stable(baseline[1])["cells"]
    assert count_cells == [(0, "random", 8, 0)]

    original = Study._cell  # B → A with a fourth seed, killed after one new cell

    def interrupted(self, *args, **kw):
        if len(count_cells) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kw)  # the counting wrapper records it

    monkeypatch.setattr(Study, "_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(seeds=4), finished)
    assert count_cells[1:] == [(0, "random", 8, 3)]  # the six finished cells came from the backup
    monkeypatch.setattr(Study, "_cell", original)

    again = run(other, finished)  # A (partial, 7 cells) → B: merged into A's complete backup
    assert count_cells[2:] == []  # B resumed from its own backup
    merged = json.loads(backup_a.read_text())
    assert {key(c) for c in merged["cells"]} == {key(c) for c in baseline[1]["cells"]} | {
        (0, "random", 8, 3)}
    assert [key(c) for c in again["cells"]] == [(0, "random", 8, 0)]
    assert sorted(p.name for p in finished.glob("results.*.json")) == sorted(
        [f"results.{a_hash}.json", f"results.{other.cell_hash()}.json"])


def test_unreadable_backup_is_kept_and_not_overwritten(finished, count_cells):
    a_hash = config().cell_hash()
    backup = finished / f"results.{a_hash}.json"
    backup.write_text("{damaged")
    run(config(damping=0.05, samplers=["random"], seeds=1), finished)
    assert backup.read_text() == "{damaged"
    assert len(json.loads((finished / f"results.{a_hash}.1.json").read_text())["cells"]) == 6


# --------------------------------------------------------------------------- damaged files
def test_damaged_or_missing_vectors_are_rebuilt(baseline, finished, count_cells, caplog):
    damaged, missing = (0, "random", 8, 1), (0, "logit-importance", 8, 2)
    damage(cell_vector(finished, damaged))
    cell_vector(finished, missing).unlink()
    with caplog.at_level(logging.WARNING, logger="repif.study"):
        results = run(config(), finished)
    assert sorted(count_cells) == sorted([damaged, missing])  # the advice is true: rebuilt
    assert "checksum" in caplog.text and "missing; recomputing the cell" in caplog.text
    assert stable(results) == stable(baseline[1])
    assert len(read(finished)["cells"]) == 6  # replaced in place, not appended
    study = Study(config(), finished, progress=False)
    assert len(study.vectors(0, "random", 8)) == 3


def test_the_seed_spread_is_never_taken_over_fewer_seeds(finished):
    cell_vector(finished, (0, "random", 8, 1)).unlink()
    with pytest.raises(StudyEnvironmentError) as info:
        Study(config(), finished, progress=False).vectors(0, "random", 8)
    msg = str(info.value)
    assert "c0_random_m8_s1.safetensors" in msg and "missing" in msg
    assert "re-run the command to rebuild it" in msg


def test_vector_of_another_configuration_is_not_used(finished, count_cells, caplog):
    """A vector that records another configuration (copied in by hand) is recomputed."""
    k = (0, "random", 8, 0)
    tensors, meta = io.load_tensors(cell_vector(finished, k))
    io.save_tensors_atomic(cell_vector(finished, k), tensors, {**meta, "config_hash": "0" * 16})
    with caplog.at_level(logging.WARNING, logger="repif.study"):
        run(config(), finished)
    assert count_cells == [k] and "written by another run" in caplog.text


def test_damaged_model_and_reference_are_recomputed(baseline, finished, count_cells, caplog):
    models = sorted((finished / "cache").glob("model-*.safetensors"))
    assert models
    for p in models:
        damage(p)
    damage(vector_dir(finished) / "full_c0.safetensors")
    with caplog.at_level(logging.WARNING, logger="repif.study"), pytest.warns(
        UserWarning, match=r"ignoring corrupt model cache.*checksum.*retraining"
    ):
        results = run(config(), finished)
    assert "full-pool solve of class 0 is damaged" in caplog.text
    assert count_cells == []  # the cells' own vectors are intact
    assert stable(results) == stable(baseline[1])
    for p in models:
        io.load_tensors(p)  # rewritten whole


def test_leftover_temporaries_are_removed(finished):
    leftovers = [finished / ".results.json.k2j4h5g6.tmp",
                 vector_dir(finished) / ".c0_random_m8_s0.safetensors.q1w2e3r4.tmp",
                 finished / "cache" / ".model-abc.safetensors.z9x8c7v6.tmp"]
    foreign = finished / "my-notes.tmp"
    for p in leftovers + [foreign]:
        p.write_bytes(b"partial")
    run(config(), finished)
    assert not any(p.exists() for p in leftovers)
    assert foreign.exists()


def test_results_json_is_strict_and_files_share_one_mode(finished, monkeypatch, umask_022):
    """A metric that comes out NaN is stored as null (and the report still renders)."""
    cell_vector(finished, (0, "random", 8, 0)).unlink()  # recomputed, with a NaN error
    monkeypatch.setattr(cells_module, "relative_error", lambda a, b: float("nan"))
    assert exit_code(ARGS + ["--out", str(finished)]) == 0

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    results = json.loads((finished / "results.json").read_text(), parse_constant=refuse)
    cell = next(c for c in results["cells"] if key(c) == (0, "random", 8, 0))
    assert cell["ihvp_rel_error"] is None
    modes = {p.relative_to(finished).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in all_files(finished)}
    assert set(modes.values()) == {"0o644"}, modes
    assert "report.html" in modes and "f1_vs_size.png" in modes


# --------------------------------------------------------------------------- command line
def _failing_fsync(code):
    """An fsync that fails with ``code`` for temporary files only (the lock still works)."""
    real = os.fsync

    def fsync(fd):
        target = ""
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
        if target.endswith(".tmp"):
            raise OSError(code, os.strerror(code))
        return real(fd)

    return fsync


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize(("code", "fix"), [(errno.ENOSPC, "free some disk space"),
                                           (errno.EROFS, "pass a writable --out")])
def test_full_disk_or_read_only_is_one_line_exit_1(finished, monkeypatch, capsys, code, fix):
    cell_vector(finished, (0, "random", 8, 2)).unlink()  # one cell to recompute and write
    before = (finished / "results.json").read_bytes()
    monkeypatch.setattr(io.os, "fsync", _failing_fsync(code))
    capsys.readouterr()
    assert exit_code(ARGS + ["--out", str(finished)]) == 1
    line = one_line(capsys)
    assert os.strerror(code) in line and fix in line and "re-run the same command" in line
    assert str(finished) in line  # names the file it could not write
    monkeypatch.undo()
    assert (finished / "results.json").read_bytes() == before
    assert not [p for p in all_files(finished) if p.name.endswith(".tmp")]
    assert not (finished / lock_module.LOCK_NAME).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line_exit_1(tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_code(ARGS + ["--device", "cuda", "--out", str(out)]) == 1
    line = one_line(capsys)
    assert "--device cuda" in line and "no CUDA GPU" in line and "--device cpu" in line
    assert not out.exists()


def test_unknown_device_is_bad_input(tmp_path, capsys):
    assert exit_code(ARGS + ["--device", "gpu", "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys)
    assert "'gpu'" in line and "--device cpu" in line


HAND_EDITS = {
    "cell-without-seed": (lambda r: r["cells"][0].pop("seed"), "cells[0] has seed=None"),
    "text-metric": (lambda r: r["cells"][2].update(f1="high"), "cells[2] has f1='high'"),
    "f1-out-of-range": (lambda r: r["cells"][1].update(f1=7.5),
                        "cells[1] has f1=7.5, outside [0, 1]"),
    "bad-scale": (lambda r: next(x for x in r["references"] if x["kind"] == "full").update(
        scale="auto"), "has scale='auto'"),
    "duplicate-cell": (lambda r: r["cells"].append(dict(r["cells"][0])), "repeats the grid"),
    "hash-as-path": (lambda r: r.update(config_hash="../../x"), "'config_hash' is '../../x'"),
}


@pytest.mark.parametrize("case", list(HAND_EDITS), ids=list(HAND_EDITS))
def test_hand_edited_results_are_bad_input(finished, capsys, case):
    edit, words = HAND_EDITS[case]
    results = read(finished)
    edit(results)
    (finished / "results.json").write_text(json.dumps(results))
    before = {p: p.read_bytes() for p in all_files(finished)}
    capsys.readouterr()
    assert exit_code(ARGS + ["--out", str(finished)]) == 2
    line = one_line(capsys)
    assert str(finished / "results.json") in line and words in line
    assert "move it away to start the study afresh" in line
    assert {p: p.read_bytes() for p in all_files(finished)} == before


BAD_FLAGS = {
    "no-samplers": (["--samplers", ""], ["--samplers names no sampler"]),
    "repeated-sampler": (["--samplers", "random,random"], ["sampler 'random' twice"]),
    "repeated-size": (["--sizes", "8,16,8"], ["--sizes lists size 8 twice"]),
    "nan-damping": (["--damping", "nan"], ["--damping", "nan"]),
    "inf-damping": (["--damping", "inf"], ["--damping", "inf"]),
    "negative-damping": (["--damping", "-1"], ["--damping", "-1"]),
    "inf-scale": (["--scale", "inf"], ["scale", "inf"]),
    "zero-lr": (["--lr", "0"], ["--lr", "0"]),
    "zero-limit": (["--limit-train", "0"], ["--limit-train", "0"]),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS), ids=list(BAD_FLAGS))
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, case):
    flags, words = BAD_FLAGS[case]
    out = tmp_path / "run"
    assert exit_code(ARGS + flags + ["--out", str(out)]) == 2
    line = one_line(capsys)
    for word in words:
        assert word in line, (word, line)
    assert not out.exists()


@pytest.mark.parametrize("error", [TypeError("boom"), KeyError("boom"), RuntimeError("boom")])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, error):
    def buggy(self):
        raise error

    monkeypatch.setattr(Study, "run", buggy)
    with pytest.raises(type(error), match="boom"):
        cli.main(ARGS + ["--out", str(tmp_path / "run")])


def test_a_value_error_from_another_library_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(Study, "run", lambda self: json.loads("{bad json"))
    with pytest.raises(json.JSONDecodeError):
        cli.main(ARGS + ["--out", str(tmp_path / "run")])


# --------------------------------------------------------------------------- kill and resume
def _cells_in(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["cells"])
    except (FileNotFoundError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_matches_an_uninterrupted_run(baseline, tmp_path,
                                                                            caplog):
    """`python -m repif class-removal` killed with SIGKILL (no cleanup at all) right after
    training, after 2 cells and after 4; the resumed run equals the uninterrupted baseline."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "repif", *ARGS, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    points = [
        ("trained", lambda: any((out / "cache").glob("model-*.safetensors"))),
        ("2 cells", lambda: _cells_in(out) >= 2),
        ("4 cells", lambda: _cells_in(out) >= 4),
    ]
    killed = []
    for name, reached in points:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not reached() and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append((name, _cells_in(out)))
        proc.wait()
    assert [name for name, _ in killed] == [name for name, _ in points], killed
    assert _cells_in(out) < 6

    assert (out / lock_module.LOCK_NAME).exists()  # SIGKILL left it behind
    with caplog.at_level(logging.WARNING, logger="repif.study"), contextlib.redirect_stderr(
        stdio.StringIO()
    ):
        assert cli.main(ARGS + ["--out", str(out)]) == 0
    assert "taking over the lock" in caplog.text
    resumed = read(out)
    assert stable(resumed) == stable(baseline[1])
    assert not [p for p in all_files(out) if p.name.endswith(".tmp")]
    assert not (out / lock_module.LOCK_NAME).exists()
    for c in resumed["cells"]:
        assert all(math.isfinite(c[k]) for k in ("f1", "ihvp_rel_error", "ihvp_cosine"))
