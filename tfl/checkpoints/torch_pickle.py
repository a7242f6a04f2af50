"""Read PyTorch ``.pth``/``.pt`` state dicts into numpy arrays without importing torch.

A torch checkpoint is a pickle, and unpickling calls whatever globals the pickle names, so a plain
``pickle.load`` of a downloaded file can run anything. Here the unpickler resolves only an
allow-list of globals, each to an inert stand-in defined in this module, and tensors are rebuilt
from the raw storage bytes with numpy: nothing the file names is ever imported or called.

Both layouts ``torch.save`` writes are read:
- zip (the default since torch 1.6): ``<dir>/data.pkl``, one ``<dir>/data/<key>`` record of raw
  bytes per storage, and a ``<dir>/byteorder`` record in files from torch >= 1.12.
- legacy (``_use_new_zipfile_serialization=False``, and everything before 1.6): pickled magic
  number, protocol version, sys_info, the object, the list of storage keys; then per key an int64
  element count and the elements, both always little-endian.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from tfl.checkpoints.errors import CheckpointError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAGIC_PICKLE = pickle.dumps(_LEGACY_MAGIC, protocol=2)  # how torch.save writes it, byte for byte
# Training scripts often save {"epoch": ..., "state_dict": {...}, "optimizer": {...}}.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# DataParallel adds "module.", torch.compile adds "_orig_mod."; neither belongs to the weight names.
_NAME_PREFIXES = ("module.", "_orig_mod.")
# torch.save stores zip members uncompressed (ratio 1). DEFLATE tops out near 1000:1, so a member that claims
# 100x its compressed size and more than a megabyte is a zip bomb (the bound Keras uses for .keras archives,
# tfl/checkpoints/keras_files.py). data.pkl holds names and shapes, not weights: 100 MB is far beyond any model.
_MAX_ZIP_EXPANSION = 100
_ZIP_SMALL_MEMBER = 1024 * 1024
_MAX_PICKLE_BYTES = 100 * 1024 * 1024


class _Unreadable(Exception):
    """Raised where the file name is not known; read_torch_state_dict adds it."""

    verb = "cannot read"


class _Refused(_Unreadable):
    """The file asks for something a state dict never needs (code, a whole module)."""

    verb = "refusing to load"


class _Inert:
    """Base of what the unpickler hands out; BUILD on one would be the file editing our objects."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"the pickle tries to set the state of a {type(self).__name__}, which torch never writes")


class _DType(_Inert):
    """A torch element type; `numpy` is the little-endian storage dtype, None if numpy has none."""

    __slots__ = ("name", "numpy", "bfloat16")

    def __init__(self, name: str, numpy: str | None, bfloat16: bool = False):
        self.name, self.numpy, self.bfloat16 = name, numpy, bfloat16

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize if self.numpy else 1


class _StorageType(_Inert):
    """torch.FloatStorage and friends: in a persistent id they only say the element type."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: _DType):
        self.name, self.dtype = name, dtype


class _Storage(_Inert):
    """A run of `numel` elements of the storage with `key`, starting `start` elements in."""

    __slots__ = ("key", "dtype", "numel", "start")

    def __init__(self, key: str, dtype: _DType, numel: int, start: int = 0):
        self.key, self.dtype, self.numel, self.start = key, dtype, numel, start


class _Tensor(_Inert):
    """What _rebuild_tensor_* return: where the elements live; numpy copies them out later."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype", "conj", "neg")

    def __init__(self, storage, offset, size, stride, dtype=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise _Unreadable(f"a tensor is built from a {type(storage).__name__}, not a storage")
        if not _is_index(offset) or not _is_index_tuple(size) or not _is_index_tuple(stride):
            raise _Unreadable(f"a tensor has a malformed storage_offset/size/stride: {offset!r}, {size!r}, {stride!r}")
        if len(size) != len(stride):
            raise _Unreadable(f"a tensor has size {size} but stride {stride} of a different length")
        if dtype is not None and not isinstance(dtype, _DType):
            raise _Unreadable(f"a tensor's dtype is a {type(dtype).__name__}, not a torch dtype")
        if metadata is not None and not isinstance(metadata, dict):
            raise _Unreadable(f"a tensor's metadata is a {type(metadata).__name__}, not a dict")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
        self.dtype = dtype or storage.dtype
        # torch stores conj()/neg() views lazily: the bytes are un-conjugated, a flag says so.
        self.conj = bool((metadata or {}).get("conj", False))
        self.neg = bool((metadata or {}).get("neg", False))


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_index_tuple(value) -> bool:
    return isinstance(value, tuple) and all(_is_index(v) for v in value)


# The signatures mirror torch._utils so the pickle's REDUCE arguments line up.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _Tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _Tensor(storage, storage_offset, size, stride, dtype=dtype, metadata=metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _Tensor):
        raise _Unreadable(f"a Parameter wraps a {type(data).__name__}, not a tensor")
    return data


_DTYPES = {
    d.name: d
    for d in (
        _DType("float32", "<f4"),
        _DType("float64", "<f8"),
        _DType("float16", "<f2"),
        # numpy has no bfloat16; widening to float32 is exact (bf16 is the top half of an f32).
        _DType("bfloat16", "<u2", bfloat16=True),
        _DType("int64", "<i8"),
        _DType("int32", "<i4"),
        _DType("int16", "<i2"),
        _DType("int8", "i1"),
        _DType("uint8", "u1"),
        _DType("uint16", "<u2"),
        _DType("uint32", "<u4"),
        _DType("uint64", "<u8"),
        _DType("bool", "?"),
        _DType("complex64", "<c8"),
        _DType("complex128", "<c16"),
        *(
            _DType(name, None)
            for name in (
                "float8_e5m2",
                "float8_e4m3fn",
                "float8_e5m2fnuz",
                "float8_e4m3fnuz",
                "float8_e8m0fnu",
                "float4_e2m1fn_x2",
                "complex32",
                "bits8",
                "bits16",
                "bits1x8",
                "bits2x4",
                "bits4x2",
            )
        ),
    )
}
_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
}
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,  # a tuple subclass; some tensors pickle their shape as one
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", _DTYPES["uint8"]),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", _DTYPES["uint8"]),
}
_ALLOWED.update({("torch", s): _StorageType(s, _DTYPES[d]) for s, d in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): dtype for name, dtype in _DTYPES.items()})
_ALLOWED.update({("torch", alias): _DTYPES[name] for alias, name in _DTYPE_ALIASES.items()})


# Protocol-2 pickles spell modules the Python 2 way (__builtin__, commands) as pickle's own
# IMPORT_MAPPING records, and os.system pickles as posix.system; messages use the names users know.
_MODULE_ALIASES = {**_compat_pickle.IMPORT_MAPPING, "posix": "os", "nt": "os"}


def _describe_global(module: str, name: str) -> str:
    if module in _MODULE_ALIASES:
        return f"{_MODULE_ALIASES[module]}.{name} (pickled as {module}.{name})"
    return f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage] | None):
        super().__init__(file, encoding="utf-8")
        self._storages = storages  # None while reading the legacy header pickles, which hold no tensors

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(
                f"the pickle references {_describe_global(module, name)}, which a state dict never needs; "
                "only tensors, storages and OrderedDict are allowed"
            )
        return found

    def persistent_load(self, pid):
        if self._storages is None or not isinstance(pid, tuple) or not pid:
            raise _Unreadable(f"unexpected persistent id {pid!r:.100}; torch writes only ('storage', ...) tuples")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise _Refused(
                "the pickle holds a whole nn.Module class, not a state dict; save model.state_dict() instead"
            )
        if kind != "storage" or len(pid) not in (5, 6):
            raise _Unreadable(f"unexpected persistent id {pid!r:.100}; torch writes only ('storage', ...) tuples")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None  # legacy files keep a slot for pre-1.0 storage views
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_index(numel):
            raise _Unreadable(f"malformed storage id {pid!r:.100}: expected (type, key: str, location, numel: int)")
        root = self._storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if root.dtype is not storage_type.dtype or root.numel != numel:
            raise _Unreadable(
                f"storage {key!r} is declared twice, as {root.numel} x {root.dtype.name} "
                f"and as {numel} x {storage_type.dtype.name}"
            )
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1]) and _is_index(view[2])):
            raise _Unreadable(f"storage {key!r} has malformed view_metadata {view!r:.100}")
        _view_key, start, view_numel = view
        if start + view_numel > numel:
            raise _Unreadable(f"a view of storage {key!r} covers elements [{start}, {start + view_numel}) of {numel}")
        return _Storage(key, root.dtype, view_numel, start)


def _unpickle(file, storages: dict[str, _Storage] | None, what: str):
    try:
        return _RestrictedUnpickler(file, storages).load()
    except _Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside a pickle means the bytes are bad
        raise _Unreadable(f"the {what} pickle is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _open_legacy(f, file_size: int):
    """Returns (top-level object, {storage key: bytes}) of a legacy-format file."""
    try:
        magic = _RestrictedUnpickler(f, None).load()
    except _Unreadable:
        raise
    except Exception:  # noqa: BLE001
        magic = None
    if magic != _LEGACY_MAGIC:
        if file_size == 0:
            raise _Unreadable("the file is empty")
        f.seek(0)
        head = f.read(len(_MAGIC_PICKLE))
        if len(head) < len(_MAGIC_PICKLE) and _MAGIC_PICKLE.startswith(head):
            raise _Unreadable(f"file is truncated: it ends after {len(head)} bytes, inside the magic number")
        raise _Unreadable(
            "it is not a PyTorch checkpoint: neither a zip archive nor a pickle starting with torch's magic number"
        )
    version = _unpickle(f, None, "protocol version")
    if version != _LEGACY_PROTOCOL:
        raise _Unreadable(f"field protocol_version is {version!r}; only {_LEGACY_PROTOCOL} exists")
    _unpickle(f, None, "sys_info")  # storage bytes are little-endian whatever machine wrote them
    storages: dict[str, _Storage] = {}
    obj = _unpickle(f, storages, "object")
    keys = _unpickle(f, None, "storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Unreadable(f"the storage key list is a {type(keys).__name__}, not a list of strings")
    data: dict[str, bytes] = {}
    for key in keys:
        if key not in storages:
            raise _Unreadable(f"storage key list names {key!r}, which no tensor in the pickle uses")
        storage = storages[key]
        header = f.read(8)
        if len(header) < 8:
            raise _Unreadable(f"file is truncated: the element count of storage {key!r} is missing")
        (count,) = struct.unpack("<q", header)
        if count != storage.numel:
            raise _Unreadable(
                f"storage {key!r} has {storage.numel} elements in the pickle but its data block says {count}"
            )
        nbytes = count * storage.dtype.itemsize
        # Checked before reading so a forged count cannot make us allocate gigabytes.
        if nbytes > file_size - f.tell():
            raise _Unreadable(
                f"file is truncated: storage {key!r} needs {nbytes} bytes but only {file_size - f.tell()} remain"
            )
        data[key] = f.read(nbytes)
    return obj, data


def _open_zip(zf: zipfile.ZipFile):
    """Returns (top-level object, storage loader, byte order) of a zip-format file."""
    names = zf.namelist()
    inner = [n.split("/", 1)[1] for n in names if "/" in n]
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        raise _Refused(
            "it is a TorchScript archive (torch.jit.save), which carries code; "
            "load it with torch.jit.load and torch.save(model.state_dict(), path) instead"
        )
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Unreadable(f"expected one <dir>/data.pkl record, found {len(pickles)} among {names[:8]}")
    _check_declared_sizes(zf, pickles[0])
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"  # files from before the byteorder record were written on little-endian machines
    if prefix + "byteorder" in names:
        byteorder = _read_record(zf, prefix + "byteorder").decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise _Unreadable(f"field byteorder is {byteorder!r}; expected 'little' or 'big'")
    storages: dict[str, _Storage] = {}
    obj = _unpickle(io.BytesIO(_read_record(zf, pickles[0])), storages, "data.pkl")

    def load(storage: _Storage) -> bytes:
        name = f"{prefix}data/{storage.key}"
        if name not in names:
            raise _Unreadable(f"record {name} for storage {storage.key!r} is missing")
        expected = storage.numel * storage.dtype.itemsize
        actual = zf.getinfo(name).file_size
        if actual != expected:
            raise _Unreadable(
                f"storage {storage.key!r} declares {storage.numel} x {storage.dtype.name} "
                f"({expected} bytes) but record {name} holds {actual} bytes"
            )
        return _read_record(zf, name)

    return obj, load, byteorder


def _check_declared_sizes(zf: zipfile.ZipFile, pickle_name: str) -> None:
    """Refuse, before reading any record, members that would inflate far beyond their stored bytes.

    zipfile never returns more than a member's declared size, so checking the declared sizes bounds memory.
    """
    for info in zf.infolist():
        if info.file_size > _ZIP_SMALL_MEMBER and info.file_size > _MAX_ZIP_EXPANSION * max(info.compress_size, 1):
            raise _Refused(
                f"record {info.filename} expands from {info.compress_size} to {info.file_size} bytes, more than "
                f"{_MAX_ZIP_EXPANSION}x (a zip bomb; torch.save stores records uncompressed)"
            )
    declared = zf.getinfo(pickle_name).file_size
    if declared > _MAX_PICKLE_BYTES:
        raise _Refused(
            f"record {pickle_name} declares {declared} bytes, over the {_MAX_PICKLE_BYTES}-byte limit for the "
            "pickle of a state dict (weights live in the data/ records, not in data.pkl)"
        )


def _read_record(zf: zipfile.ZipFile, name: str) -> bytes:
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise _Unreadable(f"record {name} is truncated or corrupt ({exc})") from None


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, _Tensor) for v in d.values())


def _select_state_dict(obj) -> dict:
    if not isinstance(obj, dict):
        raise _Unreadable(f"it holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict()")
    if _has_tensors(obj):
        return obj
    wrapped = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict) and _has_tensors(obj[k])]
    if len(wrapped) == 1:
        return obj[wrapped[0]]
    if wrapped:
        raise _Unreadable(
            f"entries {wrapped} all hold tensors, so which is the model is ambiguous; "
            f"re-save the one you want with torch.save(checkpoint[{wrapped[0]!r}], path)"
        )
    raise _Unreadable(f"it holds no tensors; its top-level keys are {[str(k) for k in list(obj)[:10]]}")


def _strip_prefixes(name: str) -> str:
    while name.startswith(_NAME_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _to_numpy(name: str, t: _Tensor, raw: bytes, big_endian: bool) -> np.ndarray:
    dtype = t.dtype
    if dtype.numpy is None:
        raise _Unreadable(f"tensor {name!r} has dtype torch.{dtype.name}, which numpy cannot hold")
    np_dtype = np.dtype(dtype.numpy).newbyteorder(">" if big_endian else "<")
    span = t.storage.numel * t.storage.dtype.itemsize  # bytes this tensor may see
    start = t.storage.start * t.storage.dtype.itemsize
    if span % np_dtype.itemsize:
        raise _Unreadable(
            f"tensor {name!r} of torch.{dtype.name} sits on storage {t.storage.key!r} of {span} bytes, "
            "not a whole number of elements"
        )
    available = span // np_dtype.itemsize
    if 0 in t.size:
        return np.zeros(t.size, dtype=np_dtype.newbyteorder("="))
    extent = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True)) + 1
    if extent > available:
        raise _Unreadable(
            f"tensor {name!r} (size {t.size}, stride {t.stride}, storage_offset {t.offset}) reaches element "
            f"{extent - 1} of storage {t.storage.key!r}, which holds only {available}"
        )
    numel = math.prod(t.size)
    if numel > available:
        # Only a view that repeats elements (stride 0, overlapping strides) can claim more than its storage
        # holds; a state dict never needs one, and copying it out could allocate terabytes from a few bytes.
        raise _Refused(
            f"tensor {name!r} (size {t.size}, stride {t.stride}) claims {numel} elements but storage "
            f"{t.storage.key!r} holds only {available}: a stride-0 or overlapping view; save tensor.clone() instead"
        )
    base = np.frombuffer(raw, dtype=np_dtype, count=available, offset=start)
    strides = tuple(s * np_dtype.itemsize for s in t.stride)
    view = np.lib.stride_tricks.as_strided(base[t.offset :], shape=t.size, strides=strides, writeable=False)
    array = np.array(view, dtype=np_dtype.newbyteorder("="), order="C")  # a copy: never alias the file's bytes
    if dtype.bfloat16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    if t.conj:
        array = np.conj(array)
    if t.neg:
        array = np.negative(array)
    return array


def _collect(obj, load: Callable[[_Storage], bytes], big_endian: bool) -> dict[str, np.ndarray]:
    state = _select_state_dict(obj)
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    cache: dict[str, bytes] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            continue  # epochs, configs, optimizer scalars: not weights
        name = _strip_prefixes(key)
        if name in out:
            raise _Unreadable(
                f"entries {source[name]!r} and {key!r} both become {name!r} once 'module.'/'_orig_mod.' are stripped"
            )
        if value.storage.key not in cache:
            cache[value.storage.key] = load(value.storage)
        out[name] = _to_numpy(key, value, cache[value.storage.key], big_endian)
        source[name] = key
    return out


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch.save'd state dict into {name: ndarray}, in file order, without torch.

    Unwraps {"state_dict": ...}/{"model": ...} checkpoints, strips "module." and "_orig_mod."
    prefixes and drops non-tensor entries. bfloat16 tensors come back as float32 (exactly).
    Raises CheckpointError for anything malformed, truncated, TorchScript, or referencing a
    global other than tensor/storage/OrderedDict machinery; nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a file; pass the path of a .pth/.pt file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(0)
            if head.startswith(b"PK"):
                try:
                    zf = zipfile.ZipFile(f)
                except (zipfile.BadZipFile, OSError) as exc:
                    raise _Unreadable(f"it starts like a zip archive but is truncated or corrupt ({exc})") from None
                with zf:
                    obj, load, byteorder = _open_zip(zf)
                    return _collect(obj, load, byteorder == "big")
            if head[257:262] == b"ustar":
                raise _Unreadable(
                    "it is a pre-0.4 tar-format checkpoint; re-save it with torch.save from any recent torch"
                )
            obj, data = _open_legacy(f, path.stat().st_size)

            def load(storage: _Storage) -> bytes:
                if storage.key not in data:
                    raise _Unreadable(f"storage {storage.key!r} is used by a tensor but has no data block")
                return data[storage.key]

            return _collect(obj, load, big_endian=False)
    except _Unreadable as exc:
        raise CheckpointError(f"{exc.verb} {path}: {exc}") from None
