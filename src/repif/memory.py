"""One memory budget that sizes every chunk repif streams (docs/design.md, "Scale").

Every pass — the pool's logits and features, per-sample gradients, curvature products, the
removal gradient and influence scores — asks :class:`MemoryBudget` how many rows (points, or
point × vector pairs) fit, given what one row costs in bytes. The dense solvers ask it whether
their matrices fit at all, and refuse with one clear error when they do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from repif.errors import TooLargeError

#: Share of the currently free memory a default budget may spend on working chunks. The rest is
#: left for the model, the data, the solver's vectors and allocator slack (measured: peak RSS
#: ≈ 1.5× the largest chunk on the CPU once fragmentation is counted).
DEFAULT_FRACTION = 0.25

#: Most a default budget spends on the CPU. Bigger chunks stopped paying there and then cost
#: time: one ResNet-18 class removal (benchmarks/results/removal-memory.md) took 56 s with
#: 256 MiB, 69 s with 1 GiB and 116 s with a 5.1 GiB default, the same result each time (larger
#: blocks fall out of the caches). On a GPU the fraction alone applies: large batches pay there.
CPU_DEFAULT_CAP = 2**30

#: Budget used when the free memory cannot be read (no /proc, no CUDA query).
FALLBACK_BYTES = 2 * 2**30

#: The smallest budget accepted: below this even one row of a tiny model would not fit.
MIN_BYTES = 2**16


def available_bytes(device: torch.device | str | None = None) -> int:
    """Free memory on ``device`` right now: CUDA's free memory, else the OS's MemAvailable."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_BYTES


@dataclass(frozen=True)
class MemoryBudget:
    """At most ``bytes`` of working memory for one chunk of a streamed computation."""

    bytes: int

    def __post_init__(self) -> None:
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int):
            raise TypeError(f"max_memory must be an integer number of bytes, got {self.bytes!r}")
        if self.bytes < MIN_BYTES:
            raise ValueError(
                f"max_memory={self.bytes} bytes is too small to hold one row of anything; "
                f"pass at least {MIN_BYTES} (e.g. max_memory=2**30 for 1 GiB) or None for the "
                "default"
            )

    @classmethod
    def resolve(
        cls, max_memory: int | float | MemoryBudget | None, device: torch.device | str | None
    ) -> MemoryBudget:
        """A budget from a byte count, an existing budget, or None (a share of free memory)."""
        if isinstance(max_memory, MemoryBudget):
            return max_memory
        if max_memory is None:
            share = int(DEFAULT_FRACTION * available_bytes(device))
            if torch.device(device if device is not None else "cpu").type == "cpu":
                share = min(share, CPU_DEFAULT_CAP)
            return cls(max(MIN_BYTES, share))
        if isinstance(max_memory, float):
            if not max_memory == max_memory or max_memory in (float("inf"), float("-inf")):
                raise ValueError(f"max_memory must be a finite number of bytes, got {max_memory}")
            max_memory = int(max_memory)
        return cls(max_memory)

    def rows(self, bytes_per_row: int, *, fixed: int = 0, limit: int | None = None) -> int:
        """How many rows of ``bytes_per_row`` fit beside ``fixed`` bytes (at least 1, at most
        ``limit``): one row always runs, so a tiny budget means many small chunks, not a
        failure."""
        free = self.bytes - fixed
        n = max(1, free // max(1, int(bytes_per_row)))
        return int(min(n, limit)) if limit is not None else int(n)

    def require(self, nbytes: int, what: str, alternative: str) -> None:
        """Raise :class:`TooLargeError` naming ``what``, the figure and ``alternative`` when
        ``nbytes`` exceeds the budget."""
        if nbytes > self.bytes:
            raise TooLargeError(
                f"{what} needs {format_bytes(nbytes)}, over the memory budget of "
                f"{format_bytes(self.bytes)} (max_memory); {alternative}"
            )


def format_bytes(n: int | float) -> str:
    """1536 → '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


#: Units ``parse_bytes`` reads (powers of 1024, as ``format_bytes`` writes them).
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40,
          "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512 MB', '1.5G' or a plain byte count → bytes (units are powers of 1024)."""
    raw = str(text).strip()
    number = raw.rstrip("BbIiKkMmGgTt ")
    unit = raw[len(number):].strip().upper()
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _UNITS or not value > 0 or value == float("inf"):
        raise ValueError(f"cannot read {text!r} as an amount of memory; write e.g. 2GiB, "
                         "512MB or a number of bytes")
    return int(value * _UNITS[unit])
