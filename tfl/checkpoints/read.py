"""Every checkpoint format tfl reads -> Checkpoint(tensors={canonical name: ndarray}, extra={...}), without torch.

The format is found from the content (magic bytes, zip members, HDF5 layout, directory layout), not the suffix:

    keras             zip with config.json + model.weights.h5          <leaf layer>/<weight>
    keras_weights_h5  HDF5 with layers/.../vars groups (Keras 3)        <leaf layer>/vars/<i>
    keras_legacy_h5   HDF5 with a layer_names attribute (Keras 2)       weight_names without ":0"
    tf1_checkpoint    TF checkpoint .index without an object graph      variable names as saved
    tf2_checkpoint    TF checkpoint .index with _CHECKPOINTABLE_OBJECT_GRAPH  <leaf layer>/<weight> from full_name
    saved_model       directory with saved_model.pb + variables/variables.index   as tf2_checkpoint
    pytorch_zip       zip with <dir>/data.pkl                           raw state-dict keys
    pytorch_legacy    a pickle stream (the reader checks torch's magic)  raw state-dict keys
    safetensors       8-byte header length + JSON header that fit the file   raw keys

(The one use of a suffix: a `.safetensors` file whose header is damaged still goes to its reader, for the precise
message.)

`<leaf layer>/<weight>` is the last two parts of Keras' variable path, so a layer inside a nested backbone model
is named alike in every format; names that would collide keep their full path. Each module's docstring says how
names are made and what is refused; none runs code from the file, and `extra` keeps what is not a weight
(optimizer slots and counters) out of restore.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from tfl.checkpoints.errors import CheckpointError
from tfl.checkpoints.safetensors_file import looks_like_safetensors, read_safetensors
from tfl.checkpoints.torch_pickle import read_torch_state_dict

# The HDF5 and TF readers (keras_files, hdf5_safety, tf_checkpoint) are imported where a file is read, not here:
# they load h5py, and the backbone families import this module when the CLI only lists backbones.

FORMATS = (
    "keras",
    "keras_weights_h5",
    "keras_legacy_h5",
    "tf1_checkpoint",
    "tf2_checkpoint",
    "saved_model",
    "pytorch_zip",
    "pytorch_legacy",
    "safetensors",
)
_HEAD_BYTES = 64


@dataclasses.dataclass
class Checkpoint:
    path: str
    format: str
    tensors: dict[str, np.ndarray]
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def listing(self) -> list[dict]:
        """[{"name", "shape", "dtype"}] of the tensors (not the extras), sorted by name."""
        return [{"name": name, "shape": [int(d) for d in value.shape], "dtype": value.dtype.name}
                for name, value in sorted(self.tensors.items())]


def _unknown(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: {what}; supported formats: {', '.join(FORMATS)}")


def _tf_format(prefix: str) -> str:
    from tfl.checkpoints.tf_checkpoint import has_object_graph

    return "tf2_checkpoint" if has_object_graph(prefix) else "tf1_checkpoint"


def _zip_format(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: it starts like a zip archive but is not readable ({exc})") from None
    if "config.json" in names and any(n.startswith("model.weights.") for n in names):
        return "keras"
    if any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
        return "pytorch_zip"
    raise _unknown(path, f"a zip archive with neither a Keras config.json nor a torch data.pkl ({names[:5]})")


def _hdf5_format(path: str) -> str:
    from tfl.checkpoints.hdf5_safety import open_checked
    from tfl.checkpoints.keras_files import layout

    with open_checked(path, path) as f:
        found = layout(f)
    if found is None:
        raise _unknown(path, "an HDF5 file with neither Keras 3 layers/ groups nor a Keras 2 layer_names attribute")
    return found


def _resolve(path: str) -> tuple[str, str]:
    """(format, the path its reader takes: the file, the checkpoint prefix, or variables/variables)."""
    from tfl.checkpoints import tf_checkpoint
    from tfl.checkpoints.hdf5_safety import has_signature

    p = Path(path)
    if p.is_dir():
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            problem = tf_checkpoint.saved_model_problem(str(p))
            if problem:
                raise CheckpointError(f"cannot read {path}: {problem}")
            return "saved_model", str(p / "variables" / "variables")
        prefix = tf_checkpoint.prefix_in_directory(p)
        if prefix is None:
            raise _unknown(path, "a directory with neither saved_model.pb, a `checkpoint` file nor one .index file")
        return _tf_format(prefix), prefix
    prefix = tf_checkpoint.prefix_of(path)
    if prefix is not None:
        return _tf_format(prefix), prefix
    if not p.is_file():
        raise CheckpointError(f"cannot read {path}: no such file, directory or checkpoint prefix")
    with open(p, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_format(path), path
    if has_signature(head):
        return _hdf5_format(path), path
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pytorch_legacy", path
    if looks_like_safetensors(head, p.stat().st_size) or p.suffix == ".safetensors":
        return "safetensors", path  # by suffix too, so a damaged header gets the reader's precise message
    raise _unknown(path, f"its first bytes {head[:8]!r} match none of them")


def detect_format(path: str | os.PathLike) -> str:
    """One of FORMATS, from the content; CheckpointError naming the supported formats when none fits."""
    return _resolve(os.fspath(path))[0]


def read_checkpoint(path: str | os.PathLike, unsafe: bool = False,
                    custom_objects: Mapping[str, object] | None = None) -> Checkpoint:
    """Read any supported checkpoint into canonical names; `unsafe` only lets a .keras archive whose config.json
    names code (Lambda, unknown classes) be read anyway — as raw `<layer>/vars/<i>` weights, still running nothing.

    custom_objects: {registered name: class} a .keras archive may name and Keras may rebuild besides its built-ins
    (tfl.reuse.read_checkpoint passes tfl's own layers)."""
    path = os.fspath(path)
    fmt, source = _resolve(path)
    if fmt == "keras":
        from tfl.checkpoints.keras_files import read_keras_archive

        tensors, extra = read_keras_archive(source, unsafe=unsafe, custom_objects=custom_objects)
    elif fmt == "keras_weights_h5":
        from tfl.checkpoints.keras_files import read_weights_h5

        tensors, extra = read_weights_h5(source)
    elif fmt == "keras_legacy_h5":
        from tfl.checkpoints.keras_files import read_legacy_h5

        tensors, extra = read_legacy_h5(source)
    elif fmt in ("tf1_checkpoint", "tf2_checkpoint", "saved_model"):
        from tfl.checkpoints.tf_checkpoint import read_tf_checkpoint

        tensors, extra = read_tf_checkpoint(source)
    elif fmt == "safetensors":
        tensors, extra = read_safetensors(source), {}
    else:  # pytorch_zip, pytorch_legacy: one reader handles both layouts
        tensors, extra = read_torch_state_dict(source), {}
    return Checkpoint(path=path, format=fmt, tensors=tensors, extra=extra)
