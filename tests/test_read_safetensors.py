"""The safetensors reader against files written by the safetensors library, and against hand-made hostile ones.

Each malformed file is built byte by byte here so the test shows exactly what is wrong with it.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tfl.checkpoints import CheckpointError, read_checkpoint
from tfl.checkpoints.safetensors_file import read_safetensors


def _write(path, header, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "layer1.0.conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "bn.running_var": rng.random(4).astype(np.float64),
        "half": rng.standard_normal(5).astype(np.float16),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "safetensors"
    assert checkpoint.extra == {}
    assert set(checkpoint.tensors) == set(tensors)
    reference = load_file(str(path))
    for name, expected in tensors.items():
        got = checkpoint.tensors[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, reference[name])
    assert checkpoint.tensors["layer1.0.conv1.weight"].flags.writeable


def test_bf16_becomes_exact_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0078125], dtype=np.float32)  # all exactly representable in bf16
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = _write(tmp_path / "w.safetensors", {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}, raw)
    got = read_checkpoint(path).tensors["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.reshape(2, 2))


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
EIGHT = b"\0" * 8

MALFORMED = [
    ("header_too_long", b"{}", b"", 200 * 1024 * 1024, "over the 104857600-byte limit"),
    ("header_past_eof", b'{"a": 1}', b"", 5000, "says 5000 bytes but only 8 follow it"),
    ("not_json", b"{not json", b"", None, "not valid JSON"),
    ("not_utf8", b'{"\xff": 1}', b"", None, "not UTF-8"),
    ("not_object", b"[1, 2]", b"", None, "JSON list, not an object"),
    ("duplicate_key", b'{"w": %s, "w": %s}' % (json.dumps(F32).encode(), json.dumps(F32).encode()), EIGHT, None,
     "key 'w' appears twice"),
    ("unknown_dtype", {"w": {**F32, "dtype": "F13"}}, EIGHT, None, "unknown dtype 'F13'"),
    ("float8", {"w": {**F32, "dtype": "F8_E4M3", "data_offsets": [0, 2]}}, b"\0\0", None,
     "dtype F8_E4M3, which numpy cannot hold"),
    ("negative_dim", {"w": {**F32, "shape": [-2]}}, EIGHT, None, "shape [-2]"),
    ("float_dim", {"w": {**F32, "shape": [2.0]}}, EIGHT, None, "shape [2.0]"),
    ("missing_field", {"w": {"dtype": "F32", "shape": [2]}}, EIGHT, None, "entry 'w' has no data_offsets"),
    ("offsets_past_data", {"w": {**F32, "data_offsets": [0, 1 << 40]}}, EIGHT, None,
     "data_offsets [0, 1099511627776] outside the data section of 8 bytes"),
    ("offsets_reversed", {"w": {**F32, "data_offsets": [8, 0]}}, EIGHT, None, "outside the data section"),
    ("size_mismatch", {"w": {**F32, "data_offsets": [0, 4]}}, b"\0" * 4, None,
     "needs 8 bytes but data_offsets [0, 4] span 4"),
    ("overlap", {"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12, None, "'a' and 'b' overlap"),
    ("hole", {"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, b"\0" * 20, None,
     "bytes 8-12 of the data belong to no tensor"),
    ("trailing_bytes", {"a": F32}, b"\0" * 12, None, "4 bytes after the last tensor"),
    ("metadata_not_strings", {"__metadata__": {"epoch": 3}, "a": F32}, EIGHT, None, "__metadata__ must map strings"),
]


@pytest.mark.parametrize("case,header,data,length,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_are_refused_with_the_reason(tmp_path, case, header, data, length, message):
    path = _write(tmp_path / f"{case}.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors") as err:
        read_checkpoint(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_too_short_for_a_header(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="2 bytes, fewer than the 8-byte header length"):
        read_safetensors(path)
