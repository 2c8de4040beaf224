"""benchmarks/_process.py: the child-process wait the peers' benchmarks share."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _process():
    spec = importlib.util.spec_from_file_location("bench_process",
                                                  ROOT / "benchmarks" / "_process.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wait_child_gives_the_exit_code_and_kills_at_the_limit():
    p = _process()
    done = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    status, ru = p.wait_child(done, timeout=60, poll=0.01)
    assert status == 3 and ru.ru_maxrss > 0
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status, _ = p.wait_child(slow, timeout=0.2, poll=0.01)
    assert status == "timeout" and slow.poll() is not None
