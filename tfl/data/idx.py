"""Reading IDX files (the MNIST file format), plain or gzipped, with every header field checked."""

from __future__ import annotations

import gzip
import math
import struct
import zlib

import numpy as np

from tfl.data.errors import DataError

# IDX type byte -> element type (multi-byte types are big-endian on disk).
_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_FIX = "re-download it, or point --data-dir at a folder with intact copies"


def read_idx(path: str) -> np.ndarray:
    """The array stored in `path` (gzip detected from the content, not the name), in native byte order."""
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _DTYPES or data[3] == 0:
        raise DataError(
            f"{path} is not an IDX file: it starts with {data[:4].hex() or 'nothing'}, expected 0000 then a type "
            f"byte (08 for uint8) and a dimension count; {_FIX}"
        )
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path} ends inside its IDX header ({len(data)} bytes); {_FIX}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header_len + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: the IDX header promises shape {dims} of {dtype.name} ({expected} bytes) but the file holds "
            f"{len(data)} bytes, so it is truncated or corrupt; {_FIX}"
        )
    array = np.frombuffer(data, dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is a damaged gzip file ({error}); {_FIX}") from None
