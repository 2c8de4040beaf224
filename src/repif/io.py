"""Atomic, checked reads and writes of caches: JSON for metadata, safetensors for tensors.

Every writer serialises into a temporary file in the destination's folder, flushes and fsyncs
it, then ``os.replace``-s it over the destination, so a reader sees either the old file or the
complete new one, never a partial write. A process killed mid-write leaves only a hidden
``.<name>.<random>.tmp`` beside the destination, which :func:`remove_temporaries` clears.
Every file gets the permissions of an ordinary new file (0o666 less the umask: 0o644 by
default). JSON is strict (NaN and infinities are written as ``null``); safetensors files carry a
SHA-256 of their tensors in the metadata, checked on load. Readers raise :class:`ValueError`
naming the path when a file exists but cannot be parsed or fails its checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from repif.errors import CorruptFileError

#: The safetensors metadata key under which :func:`save_tensors_atomic` stores its JSON metadata.
METADATA_KEY = "repif_metadata"

#: The safetensors metadata key holding the SHA-256 of the file's tensors (see
#: :func:`tensors_sha256`); files written before it existed have none and are not checked.
CHECKSUM_KEY = "repif_sha256"

#: Names of the temporary files :func:`_atomic_file` writes: ``.<destination name>.<random>.tmp``.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"

PathLike = str | os.PathLike


_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """Permissions of an ordinary new file under the current umask (0o644 for umask 0o022)."""
    try:  # Linux ≥ 4.7 reports the umask without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: read it by setting it (and put it back at once)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic_file(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a temporary file beside ``path``; on clean exit fsync it and move it into place.

    The file gets :func:`file_mode` permissions (``mkstemp`` alone would leave it 0o600). An
    ``OSError`` without a file name (a failed write or fsync: a full disk, a read-only file
    system) is raised again naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX,
                                   dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            with contextlib.suppress(AttributeError, NotImplementedError):  # not on Windows
                os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _naming(err, path) from err
        raise
    _fsync_dir(path.parent)


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` itself if it names a file, else the same error (same errno, hence the same
    subclass, e.g. PermissionError) naming ``path``."""
    if err.filename is not None or err.errno is None:
        return err
    return OSError(err.errno, err.strerror, str(path))


#: What :func:`_atomic_file`'s temporary files look like: ``.<name>.<8 random chars>.tmp``.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_temporaries(folder: PathLike, *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files that atomic writes killed midway left in ``folder`` (and its
    subfolders with ``recursive``); returns them. Only names of the form
    ``.<name>.<8 random chars>.tmp`` are touched. Call it only while no other process writes
    there (e.g. under the output directory's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}") if recursive else folder.glob(
        f"{TEMP_PREFIX}*{TEMP_SUFFIX}")
    removed = []
    for p in candidates:
        if _TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


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


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, so that it serialises
    as strict JSON (``null``); dicts, lists and tuples are copied, other values kept."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON (UTF-8, keys kept in order; NaN and infinities
    become ``null``) to ``path`` atomically."""
    write_bytes_atomic(
        path,
        lambda: (json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n").encode("utf-8"),
    )


def read_json(path: PathLike) -> Any:
    """Read JSON at ``path``: a missing file raises FileNotFoundError, bad JSON ValueError."""
    path = Path(path)
    text = path.read_bytes()
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from e


def save_tensors_atomic(
    path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None
) -> None:
    """Save named tensors (as contiguous CPU copies) and JSON ``metadata`` to a safetensors file.

    The metadata is stored as one JSON string under the safetensors metadata key
    :data:`METADATA_KEY`; it must be JSON-serialisable. The tensors' SHA-256
    (:func:`tensors_sha256`) goes under :data:`CHECKSUM_KEY`.
    """
    from safetensors.torch import save

    def produce() -> bytes:
        flat = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        meta = {METADATA_KEY: json.dumps(metadata if metadata is not None else {}),
                CHECKSUM_KEY: tensors_sha256(flat)}
        return save(flat, metadata=meta)

    write_bytes_atomic(path, produce)


def load_tensors(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``(tensors, metadata)`` written by :func:`save_tensors_atomic` (tensors on CPU).

    A missing file raises FileNotFoundError; a corrupt or foreign file, or one whose tensors do
    not match their stored checksum, raises :class:`~repif.errors.CorruptFileError` (a
    ValueError).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta_raw = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CorruptFileError(f"{path}: not a readable safetensors file ({e})") from e
    if meta_raw is None or METADATA_KEY not in meta_raw:
        raise CorruptFileError(
            f"{path}: safetensors file without repif metadata ({METADATA_KEY!r})")
    try:
        metadata = json.loads(meta_raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: metadata is not valid JSON ({e})") from e
    stored = meta_raw.get(CHECKSUM_KEY)
    if stored is not None and stored != tensors_sha256(tensors):
        raise CorruptFileError(
            f"{path}: its tensors do not match their stored SHA-256 checksum (the file was "
            "damaged or changed after it was written)"
        )
    return tensors, metadata


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
