"""Atomic, checked reads and writes of caches: JSON for metadata, safetensors for tensors.

Every writer serialises into a temporary file in the destination's folder, flushes and fsyncs
it, then ``os.replace``-s it over the destination, so a reader sees either the old file or the
complete new one, never a partial write. Readers raise :class:`ValueError` naming the path when a
file exists but cannot be parsed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

#: The safetensors metadata key under which :func:`save_tensors_atomic` stores its JSON metadata.
METADATA_KEY = "repif_metadata"

PathLike = str | os.PathLike


@contextlib.contextmanager
def _atomic_file(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a temporary file beside ``path``; on clean exit fsync it and move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Best effort: make the rename durable (not supported on every platform)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: PathLike, produce: Callable[[], bytes]) -> None:
    """Write the bytes returned by ``produce()`` to ``path`` atomically.

    ``produce`` runs before the temporary file is opened, so a failure while serialising leaves
    neither a partial destination nor a stray temporary file.
    """
    data = produce()
    with _atomic_file(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (UTF-8, keys kept in order) to ``path`` atomically."""
    write_bytes_atomic(
        path, lambda: (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode("utf-8")
    )


def read_json(path: PathLike) -> Any:
    """Read JSON at ``path``: a missing file raises FileNotFoundError, bad JSON ValueError."""
    path = Path(path)
    text = path.read_bytes()
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete the file to rebuild it") from e


def save_tensors_atomic(
    path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Save named tensors (as contiguous CPU copies) and JSON ``metadata`` to a safetensors file.

    The metadata is stored as one JSON string under the safetensors metadata key
    :data:`METADATA_KEY`; it must be JSON-serialisable.
    """
    from safetensors.torch import save

    def produce() -> bytes:
        flat = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        meta = {METADATA_KEY: json.dumps(metadata if metadata is not None else {})}
        return save(flat, metadata=meta)

    write_bytes_atomic(path, produce)


def load_tensors(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``(tensors, metadata)`` written by :func:`save_tensors_atomic` (tensors on CPU).

    A missing file raises FileNotFoundError; a corrupt or foreign file raises ValueError.
    """
    from safetensors.torch import load

    path = Path(path)
    data = path.read_bytes()
    try:
        tensors = load(data)
        meta_raw = _safetensors_metadata(data)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"{path}: not a readable safetensors file ({e}); delete it to rebuild it"
        ) from e
    if meta_raw is None or METADATA_KEY not in meta_raw:
        raise ValueError(f"{path}: safetensors file without repif metadata ({METADATA_KEY!r})")
    try:
        metadata = json.loads(meta_raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata is not valid JSON ({e})") from e
    return tensors, metadata


def _safetensors_metadata(data: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` table of a safetensors byte string (header: u64 length + JSON)."""
    if len(data) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length exceeds file size")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    return header.get("__metadata__")


def environment_metadata() -> dict[str, str]:
    """Versions that a cache depends on: repif, torch and Python."""
    try:
        from importlib.metadata import version

        repif_version = version("repif")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        repif_version = "unknown"
    return {
        "repif": repif_version,
        "torch": torch.__version__,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
    }
