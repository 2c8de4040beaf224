"""The house rules the test command enforces: ruff is clean and imports run one way (the layers
contract in pyproject.toml, [tool.importlinter]; docs/design.md, "Parts")."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean():
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    done = _run(sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks")
    assert done.returncode == 0, done.stdout + done.stderr


def test_imports_follow_the_layers():
    exe = shutil.which("lint-imports")
    assert exe, "lint-imports not found: pip install -e '.[test]' installs import-linter"
    done = _run(exe)
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout + done.stderr
