"""A reader for the IDX format of (Fashion-)MNIST, gzipped or not.

IDX: two zero bytes, one type byte, one byte with the number of dimensions ``d``, then ``d``
big-endian uint32 sizes, then the data, big-endian, in C order.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

_TYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_bytes_maybe_gzip(path: str | os.PathLike) -> bytes:
    """The file's bytes, decompressed when it starts with the gzip magic number."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    return raw


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a numpy array in native byte order; ``source`` names it in errors."""
    if len(data) < 4:
        raise ValueError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise ValueError(
            f"{source}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with a "
            f"type byte TT in {{{', '.join(f'{t:02x}' for t in _TYPES)}}})"
        )
    dtype = np.dtype(_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: IDX data {problem}: shape {shape} needs {expected} bytes, found {actual}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a numpy array; malformed files raise ValueError."""
    return parse_idx(read_bytes_maybe_gzip(path), source=str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as IDX (used by tests and to make small fixtures)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _TYPES.items()}
    arr = np.asarray(array)
    key = arr.dtype.newbyteorder("=")
    if key not in codes:
        raise ValueError(f"dtype {arr.dtype} has no IDX type code")
    code = codes[key]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    body = header + arr.astype(_TYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(body) if compress else body)
