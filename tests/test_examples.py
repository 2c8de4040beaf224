"""The examples run, at their tiny sizes, in a fresh interpreter (the ones whose libraries are
installed; torchvision's is run where torchvision imports)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEEDS = {"hf_text_classifier.py": "transformers", "torchvision_resnet.py": "torchvision"}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None and __import__(name) is not None
    except Exception:  # noqa: BLE001 - a library that fails to import counts as absent
        return False


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(NEEDS))
def test_example_runs(script):
    if not _importable(NEEDS[script]):
        pytest.skip(f"{NEEDS[script]} is not importable here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(EXAMPLES.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "influence" in done.stdout and "η picked" in done.stdout
