"""benchmarks/gpu.py --dry-run: the GPU command end to end on the CPU with tiny sizes, so the
prepared command keeps working between the (rare) runs on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out",
         str(tmp_path), "--steps", "scores,class-removal,scale"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"scores": "ok", "class-removal": "ok", "scale": "skipped (no --data-dir)"}
    scores = json.loads((tmp_path / "gpu-scores.json").read_text())
    assert scores["device"] == "cpu" and scores["projected_pearson_mean"] > 0.9
    assert (tmp_path / "gpu-class-removal" / "results.json").exists()
    assert "| scores | ok |" in (tmp_path / "gpu.md").read_text()
