"""Read a `.safetensors` file into {key: ndarray}, checking the whole header before reading any tensor.

The format (github.com/huggingface/safetensors, README "Format"): 8 bytes little-endian header length N, N bytes
of UTF-8 JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
byte buffer; offsets are relative to the buffer. The spec also says duplicate keys are disallowed and "the byte
buffer needs to be entirely indexed, and cannot contain holes", so a file whose tensors overlap, leave a gap or
stop short of the end is refused too (that is what rules out polyglot files). Every number is checked with
Python ints before any allocation, so a forged header cannot make us read outside the file or allocate more
than the file holds. Keys are returned raw (`layer1.0.conv1.weight`); a family mapping renames them.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from tfl.checkpoints.errors import CheckpointError
from tfl.checkpoints.json_limits import JSONTooDeep, loads_bounded

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
# A valid header nests 3 levels (header -> entry -> shape/offsets); anything much deeper is not a header.
MAX_HEADER_DEPTH = 16
# safetensors dtype -> little-endian numpy storage type. BF16 is read as uint16 and widened to float32.
DTYPES = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "U16": "<u2",
    "I16": "<i2",
    "F16": "<f2",
    "BF16": "<u2",
    "U32": "<u4",
    "I32": "<i4",
    "F32": "<f4",
    "U64": "<u8",
    "I64": "<i8",
    "F64": "<f8",
    "C64": "<c8",
}
# Valid in the spec but with no numpy type: refused by name rather than as "unknown".
NO_NUMPY_DTYPES = ("F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4")


def looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """A header length that fits the file and a JSON object right after it: enough to pick this reader."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= min(MAX_HEADER_BYTES, file_size - 8) and head[8:9] == b"{"


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Malformed(f"key {key!r} appears twice in the header (the spec disallows duplicate keys)")
        seen[key] = value
    return seen


class _Malformed(Exception):
    pass


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, info, buffer_size: int) -> tuple[int, int, str, tuple]:
    """(begin, end, dtype, shape) of one header entry, every field checked."""
    if not isinstance(info, dict):
        raise _Malformed(f"entry {name!r} is a {type(info).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _Malformed(f"entry {name!r} has no {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype in NO_NUMPY_DTYPES:
        raise _Malformed(f"tensor {name!r} has dtype {dtype}, which numpy cannot hold")
    if dtype not in DTYPES:
        raise _Malformed(f"tensor {name!r} has unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Malformed(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _Malformed(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], non-negative integers")
    begin, end = offsets
    if begin > end or end > buffer_size:
        raise _Malformed(
            f"tensor {name!r} has data_offsets [{begin}, {end}] outside the data section of {buffer_size} bytes"
        )
    expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != expected:
        raise _Malformed(
            f"tensor {name!r} of {dtype} {shape} needs {expected} bytes but data_offsets [{begin}, {end}] "
            f"span {end - begin}"
        )
    return begin, end, dtype, tuple(shape)


def _check_tiling(entries: dict[str, tuple], buffer_size: int) -> None:
    """The ranges must cover the data section exactly once, in some order."""
    position, previous = 0, None
    for name, (begin, end, _, _) in sorted(entries.items(), key=lambda item: (item[1][0], item[1][1])):
        if begin < position:
            raise _Malformed(f"tensors {previous!r} and {name!r} overlap (bytes {begin}-{position} of the data)")
        if begin > position:
            raise _Malformed(f"bytes {position}-{begin} of the data belong to no tensor (a hole before {name!r})")
        position, previous = end, name
    if position != buffer_size:
        raise _Malformed(f"the data section has {buffer_size - position} bytes after the last tensor, used by none")


def _read_header(f, file_size: int) -> tuple[int, dict[str, tuple], dict[str, str]]:
    """(offset of the data section, {name: (begin, end, dtype, shape)}, __metadata__) after checking everything."""
    if file_size < 8:
        raise _Malformed(f"the file has {file_size} bytes, fewer than the 8-byte header length")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_HEADER_BYTES:
        raise _Malformed(f"the header length field says {length} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if length > file_size - 8:
        raise _Malformed(f"the header length field says {length} bytes but only {file_size - 8} follow it")
    raw = f.read(length)
    try:
        header = loads_bounded(raw.decode("utf-8"), MAX_HEADER_DEPTH, object_pairs_hook=_no_duplicate_keys)
    except JSONTooDeep as exc:
        raise _Malformed(f"the header is not a safetensors header: {exc}") from None
    except UnicodeDecodeError as exc:
        raise _Malformed(f"the header is not UTF-8 ({exc})") from None
    except json.JSONDecodeError as exc:
        raise _Malformed(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _Malformed(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Malformed("__metadata__ must map strings to strings")
    buffer_size = file_size - 8 - length
    entries = {name: _entry(name, info, buffer_size) for name, info in header.items()}
    _check_tiling(entries, buffer_size)
    return 8 + length, entries, metadata


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: array} of a safetensors file, in header order; BF16 becomes float32 (exactly)."""
    try:
        with open(path, "rb") as f:
            data_start, entries, _ = _read_header(f, os.fstat(f.fileno()).st_size)
            tensors = {}
            for name, (begin, end, dtype, shape) in entries.items():
                f.seek(data_start + begin)
                buffer = bytearray(end - begin)
                if f.readinto(buffer) != len(buffer):
                    raise _Malformed(f"the file ended while reading tensor {name!r}")
                array = np.frombuffer(buffer, dtype=DTYPES[dtype]).reshape(shape)
                if dtype == "BF16":
                    array = (array.astype(np.uint32) << 16).view(np.float32)
                tensors[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
            return tensors
    except _Malformed as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's __metadata__ ({} without one), after the same checks as read_safetensors."""
    try:
        with open(path, "rb") as f:
            return _read_header(f, os.fstat(f.fileno()).st_size)[2]
    except _Malformed as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None


_WRITE_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
                 np.dtype(np.int32): "I32"}


def encode_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """{name: array} as the bytes of a safetensors file (little-endian, in the given order)."""
    header, offset, chunks = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _WRITE_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; write float32, float16, int32 or int64")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _WRITE_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes, so the buffer is aligned
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)
