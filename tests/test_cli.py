"""The ``repif`` command line (docs/design.md, "Protocol"): a real class-removal run, the
``python -m repif`` entry point, help text, and bad input that must fail with one clear line and
touch nothing."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repif import cli, samplers

#: The small run of the brief; the bad-input cases change one option of it.
ARGS = ["class-removal", "--dataset", "digits", "--model", "mlp", "--remove", "0",
        "--samplers", "random,logit-importance+shrink", "--sizes", "8,16", "--seeds", "2",
        "--epochs", "5", "--quiet"]


def argv(out: Path, **changes: str) -> list[str]:
    """``ARGS`` with ``--out out`` and each ``--name value`` of ``changes`` replaced or added."""
    args = list(ARGS)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args + ["--out", str(out)]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str, str]:
    """The brief's command, run once through ``cli.main``: (output directory, stdout, stderr)."""
    out = tmp_path_factory.mktemp("cli") / "study"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv(out))
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture()
def earlier(first_run) -> bytes:
    """The bytes of the first run's results.json."""
    return (first_run[0] / "results.json").read_bytes()


def test_class_removal_writes_results_and_report(first_run):
    out, stdout, stderr = first_run
    assert stdout == "" and stderr == ""  # --quiet: no progress bars, no table
    results = json.loads((out / "results.json").read_text())
    assert {"config", "references", "cells"} <= set(results)
    assert results["config"]["samplers"] == ["random", "logit-importance+shrink"]
    assert results["config"]["sizes"] == [8, 16]
    assert len(results["cells"]) == 2 * 2 * 2
    assert {c["sampler"] for c in results["cells"]} == {"random", "logit-importance+shrink"}
    assert {r["kind"] for r in results["references"]} == {"full", "retrain"}
    assert (out / "report.html").is_file()
    assert len(list(out.glob("*.png"))) == 6  # five metrics against m, F1 against time


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "repif", "class-removal", "--dataset", "digits", "--model",
           "mlp", "--remove", "3", "--samplers", "random", "--sizes", "8", "--seeds", "1",
           "--epochs", "5", "--limit-train", "300", "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [c["removed_class"] for c in results["cells"]] == [3]
    assert (out / "report.html").is_file()


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize("args", [["--help"], ["class-removal", "--help"], ["demo", "--help"]])
def test_help_exits_zero(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: repif" in text
    if "class-removal" in args:
        for flag in ("--dataset", "--data-dir", "--model", "--remove", "--samplers", "--sizes",
                     "--seeds", "--solver", "--curvature", "--out"):
            assert flag in text


def test_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [ep.value for ep in scripts if ep.name == "repif"] == ["repif.cli:main"]


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code != 0
    assert "usage" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input
def exit_code(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 1


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


BAD = {
    "class-out-of-range": ({"remove": "12"}, ["class 12", "0…9"]),
    "every-class": ({"remove": ",".join(map(str, range(10)))}, ["every class"]),
    "size-zero": ({"sizes": "0"}, ["sizes", "0"]),
    "seeds-zero": ({"seeds": "0"}, ["seeds", "0"]),
    "unknown-sampler": ({"samplers": "random,bogus"}, ["bogus", *samplers.names()]),
    "unknown-solver": ({"solver": "bogus"}, ["bogus", "cg"]),
    "unknown-curvature": ({"curvature": "bogus"}, ["bogus", "ggn"]),
    "size-over-pool": ({"sizes": "8,5000"}, ["5000", "remaining", "--sizes"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_fails_cleanly_and_keeps_results(earlier, tmp_path, capsys, case):
    changes, words = BAD[case]
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.json").write_bytes(earlier)
    capsys.readouterr()
    assert exit_code(argv(out, **changes)) != 0
    line = one_error_line(capsys)
    for word in words:
        assert word in line, (word, line)
    assert (out / "results.json").read_bytes() == earlier
    assert not list(out.glob("results.*.json"))


def test_missing_dataset_names_how_to_get_it(tmp_path, capsys):
    out = tmp_path / "study"
    code = exit_code(argv(out, dataset="mnist", data_dir="/nonexistent"))
    assert code != 0
    line = one_error_line(capsys)
    assert "mnist" in line and "/nonexistent" in line
    assert "--data-dir" in line and "IDX" in line  # says what to put where


def test_missing_dataset_keeps_earlier_results(earlier, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.json").write_bytes(earlier)
    assert exit_code(argv(out, dataset="mnist", data_dir="/nonexistent")) != 0
    assert (out / "results.json").exists()
    assert (out / "results.json").read_bytes() == earlier


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "results.json"
    target.write_bytes(b'{"kept": true}\n')
    assert exit_code(argv(target)) != 0
    line = one_error_line(capsys)
    assert str(target) in line and "is a file" in line
    assert target.read_bytes() == b'{"kept": true}\n'


@pytest.mark.parametrize("sub", [False, True], ids=["dir", "subdir"])
def test_out_not_writable(earlier, tmp_path, capsys, sub):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "results.json").write_bytes(earlier)
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user can write to a 0o500 directory (root)")
        out = locked / "study" if sub else locked
        assert exit_code(argv(out)) != 0
        line = one_error_line(capsys)
        assert str(out) in line and "not writable" in line
        assert (locked / "results.json").read_bytes() == earlier
        assert sorted(p.name for p in locked.iterdir()) == ["results.json"]
    finally:
        locked.chmod(0o700)


def test_command_line_defaults_are_the_configuration_defaults():
    """`repif class-removal` with no options runs StudyConfig()'s defaults: they live once."""
    from repif.studies.class_removal.config import StudyConfig

    args = cli._parser().parse_args(["class-removal"])
    assert cli._config(args) == StudyConfig()
