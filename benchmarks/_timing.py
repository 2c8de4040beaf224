"""Timing helpers shared by the benchmarks: best of a few runs (the machines are shared, so the
minimum is the figure least disturbed by other work)."""

from __future__ import annotations

import time
from typing import Any

#: Runs per timed figure.
REPEATS = 3


def once(fn: Any) -> float:
    """Seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best(fn: Any, repeats: int = REPEATS) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds."""
    return min(once(fn) for _ in range(repeats))
