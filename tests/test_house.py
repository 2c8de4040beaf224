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


MOVED = [("repif.kfac", "repif.curvature.kfac"),
         ("repif.curvature_kinds", "repif.curvature.kinds"),
         ("repif.layer_gradients", "repif.gradients.hooks"),
         ("repif.runs", "repif.studies.runs"),
         ("repif.experiments.lock", "repif.studies.runs"),
         ("repif.experiments.resources", "repif.studies.resources"),
         *[(f"repif.experiments.{m}", f"repif.studies.class_removal.{m}")
           for m in ("config", "study", "report", "summary")],
         *[(f"repif.evaluation.{m}", f"repif.studies.evaluation.{m}")
           for m in ("runner", "ground_truth", "scores", "report", "cli")]]


def test_renamed_modules_still_import_and_warn():
    """The README's "Renamed modules": each old path gives the moved module, with a warning
    naming it (one process for all: each old path is imported there for the first time)."""
    code = f"""
import importlib, warnings
bad = []
for old, new in {MOVED!r}:
    warnings.simplefilter('ignore')
    importlib.import_module(old.rpartition('.')[0])  # a moved package warns for itself first
    warnings.simplefilter('error', DeprecationWarning)
    try:
        importlib.import_module(old)
    except DeprecationWarning as w:
        if new not in str(w):
            bad.append((old, str(w)))
    else:
        bad.append((old, 'no warning'))
    warnings.simplefilter('ignore')
    if importlib.import_module(old) is not importlib.import_module(new):
        bad.append((old, 'another module than ' + new))
assert not bad, bad
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_moved_package_keeps_its_names_and_its_modules_load_once():
    """``repif.evaluation`` warns and offers the moved package's public names (the same
    objects); its old modules are the moved ones, never second copies; what was pickled under
    the old paths loads."""
    code = """
import pickle, sys, warnings
warnings.simplefilter('error', DeprecationWarning)
try:
    import repif.evaluation
except DeprecationWarning as w:
    assert 'repif.studies.evaluation' in str(w), w
else:
    raise SystemExit('no warning')
warnings.simplefilter('ignore')
import repif.evaluation as old, repif.studies.evaluation as new
assert old.__all__ == new.__all__ and all(getattr(old, k) is getattr(new, k) for k in new.__all__)
import repif.evaluation.runner, repif.experiments.config
assert repif.evaluation.runner is sys.modules['repif.studies.evaluation.runner']
copies = [k for k, m in sys.modules.items() if k.startswith(('repif.evaluation.',
          'repif.experiments.')) and m.__name__ == k]
assert not copies, copies
from repif.studies.class_removal.config import StudyConfig
old_pickle = pickle.dumps(StudyConfig(), protocol=0).replace(b'repif.studies.class_removal.config',
                                                 b'repif.experiments.config')
assert pickle.loads(old_pickle) == StudyConfig()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
