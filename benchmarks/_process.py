"""Waiting on a benchmark's child process with a time limit (no repif import here: the peers'
benchmarks use it too)."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any


def wait_child(proc: subprocess.Popen, timeout: float, poll: float,
               started: float | None = None) -> tuple[int | str, Any]:
    """Wait for ``proc`` (polling every ``poll`` seconds), killing it ``timeout`` seconds after
    ``started`` (a ``perf_counter`` reading; default now); returns (exit code or ``"timeout"``,
    its resource usage from ``wait4``: ``ru_maxrss`` is the child's peak resident memory in
    KiB)."""
    t0 = time.perf_counter() if started is None else started
    while True:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(st), ru
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            _, _, ru = os.wait4(proc.pid, 0)
            return "timeout", ru
        time.sleep(poll)
