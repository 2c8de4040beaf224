"""Wall time and peak memory of a block of work, measured the same way for every sampler.

CUDA: ``torch.cuda.max_memory_allocated`` growth over the block. CPU: the growth of the
process's resident set size (RSS) over its value at the start, sampled by a background thread
every ``SAMPLE_INTERVAL_S``; freed heap is returned to the OS (``malloc_trim``) before the block
so earlier work does not hide this block's allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from repif import distributed

#: 2 ms catches allocations that live for a few milliseconds (one solve) at negligible cost.
SAMPLE_INTERVAL_S = 0.002

_PAGE = 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the peak RSS (an upper bound on growth)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_heap() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


@dataclass
class Measurement:
    """Wall time and peak memory growth of a block. Over several processes both are the
    maximum over the ranks, and ``peak_mem_per_rank`` lists each rank's figure (rank order);
    in one process it holds the one figure."""

    time_s: float = 0.0
    peak_mem_bytes: int = 0
    method: str = ""
    peak_mem_per_rank: list[int] = field(default_factory=list)


def _combine_ranks(result: Measurement) -> None:
    """Per-rank peak memory, and the maximum time and memory over the ranks (a collective:
    reached only when the block succeeded on this rank)."""
    per_rank = distributed.gather_numbers(result.peak_mem_bytes)
    result.peak_mem_per_rank = [int(v) for v in per_rank]
    result.peak_mem_bytes = max(result.peak_mem_per_rank)
    result.time_s = float(distributed.agree(result.time_s, "max"))


@contextmanager
def measure(device: torch.device | str = "cpu") -> Iterator[Measurement]:
    """Measure the enclosed block: ``with measure(dev) as m: ...`` then read m.time_s etc."""
    dev = torch.device(device)
    result = Measurement()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        start = time.perf_counter()
        yield result
        torch.cuda.synchronize(dev)
        result.time_s = time.perf_counter() - start
        result.peak_mem_bytes = int(torch.cuda.max_memory_allocated(dev) - base)
        result.method = "cuda max_memory_allocated growth"
        _combine_ranks(result)
        return
    _trim_heap()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(SAMPLE_INTERVAL_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.time_s = time.perf_counter() - start
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result.peak_mem_bytes = int(peak[0] - base)
        result.method = f"CPU RSS growth, sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms"
    _combine_ranks(result)
