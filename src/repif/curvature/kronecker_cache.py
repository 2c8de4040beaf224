"""Fitted Kronecker factors kept on disk, keyed by everything they depend on (model digest,
data fingerprint, subset, sampler, m, seed, kind, options), so an error raised after a long fit
loses nothing and a later estimator of the same problem skips the fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repif import distributed
from repif.curvature.kfac import KroneckerCurvature
from repif.errors import CorruptFileError
from repif.io import environment_metadata, load_tensors, save_tensors_atomic
from repif.memory import MemoryBudget
from repif.task import FunctionalModel

#: Version of the factor file layout; a file of another version is refitted.
CACHE_FORMAT = 1

def _digest(parts: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in parts:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(fm: FunctionalModel) -> str:
    """SHA-256 of the model's parameter names, shapes and values, its buffers and frozen
    parameters."""
    names = json.dumps([list(fm.space.names), [list(s) for s in fm.space.shapes],
                        sorted(fm.buffers), sorted(fm.frozen)]).encode()
    rest = [fm.buffers[k] for k in sorted(fm.buffers)] + [fm.frozen[k] for k in sorted(fm.frozen)]
    return hashlib.sha256(names + _digest([fm.theta, *rest]).encode()).hexdigest()


def data_fingerprint(x: Any, y: Any) -> str:
    """SHA-256 of the gathered subset's input and target tensors."""
    from torch.utils._pytree import tree_flatten

    leaves = [t for t in tree_flatten((x, y))[0] if isinstance(t, Tensor)]
    return _digest(leaves)


#: A Kronecker fit that takes at least this long (seconds) is kept in the default cache when the
#: user names none (``cache_dir=None``): long enough that short fits, the common case, never
#: touch the disk; short enough that a fit worth minutes survives an error raised after it.
LONG_FIT_S = 30.0

#: Environment variable naming the default cache directory of Kronecker factors.
CACHE_ENV = "REPIF_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$REPIF_CACHE_DIR`` if set, else ``~/.cache/repif/factors``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "repif" / "factors"


def load_or_fit(
    cache_dir: str | Path, metadata: dict[str, Any], fm: FunctionalModel,
    fit: Callable[[], KroneckerCurvature], budget: MemoryBudget | None = None,
    save_after_s: float | None = None,
) -> KroneckerCurvature:
    """The factors stored under ``cache_dir`` for exactly this ``metadata`` (model digest, data
    fingerprint, subset, sampler, m, seed, kind, …), else ``fit()`` and store them (only when
    the fit took at least ``save_after_s`` seconds, if given; a store that fails then warns
    instead of raising). A stored file that is damaged or records other metadata is refitted
    with a warning. Over several processes every rank must load (else all refit) and rank 0
    writes."""
    meta = {"format": CACHE_FORMAT, **metadata, **environment_metadata()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{metadata.get('kind', 'kfac')}-{key}.safetensors"
    loaded: KroneckerCurvature | None = None
    if path.exists():
        try:
            tensors, stored = load_tensors(path)
            if stored.get("cache") != meta:
                diff = sorted(k for k in set(meta) | set(stored.get("cache", {}))
                              if meta.get(k) != stored.get("cache", {}).get(k))
                raise CorruptFileError(f"{path}: it records other metadata ({', '.join(diff)})")
            loaded = KroneckerCurvature.from_state(fm, tensors, stored["curvature"], budget)
        except (CorruptFileError, KeyError, TypeError) as err:
            warnings.warn(f"refitting the Kronecker factors: {err}", RuntimeWarning,
                          stacklevel=3)
            loaded = None
    if distributed.agree(int(loaded is not None)) and loaded is not None:
        return loaded
    t0 = time.perf_counter()
    fitted = fit()
    took = time.perf_counter() - t0
    if save_after_s is not None and took < save_after_s:
        return fitted
    if distributed.is_main():
        tensors, curv_meta = fitted.state()
        try:
            save_tensors_atomic(path, tensors, {"cache": meta, "curvature": curv_meta})
        except OSError as err:
            if save_after_s is None:  # a directory the user named: its failure is theirs to see
                raise
            warnings.warn(f"could not keep the {took:.0f} s Kronecker fit in the default cache "
                          f"({err}); set {CACHE_ENV} or kronecker_options={{'cache_dir': ...}}",
                          RuntimeWarning, stacklevel=3)
    return fitted
