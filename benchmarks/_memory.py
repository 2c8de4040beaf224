"""Resident memory of this process, for benchmarks that also run in other libraries' virtual
environments (no repif import here; repif's own studies use ``repif.studies.resources``)."""

from __future__ import annotations

import ctypes
import os
import threading

#: How often the poller reads the resident set: 5 ms catches a solve's short-lived buffers.
POLL_INTERVAL_S = 0.005


def rss_bytes() -> int:
    """Resident memory of this process now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's whole-life peak resident memory (VmHWM; reset by exec, unlike the
    ``ru_maxrss`` of a forked child, which keeps the parent's peak at the fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident memory above the level at entry, polled on a thread every ``interval``
    seconds (torch releases the GIL in its kernels); ``mark()`` reads the growth so far and
    ``growth`` holds it at exit. Free heap is handed back to the system first (glibc
    ``malloc_trim``), so memory freed by earlier steps is not reused unseen."""

    def __init__(self, interval: float = POLL_INTERVAL_S) -> None:
        self.interval, self.base, self.peak, self.growth = interval, 0, 0, 0

    def __enter__(self) -> PeakRSS:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def mark(self) -> int:
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.base
        return self.growth

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mark()
