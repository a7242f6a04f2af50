"""Keras files -> ({canonical name: array}, {non-weight name: array}).

- `.weights.h5` (Keras 3 `save_weights`): each saveable's variables sit in `<h5 path>/vars/<i>` and the `vars`
  group's `name` attribute is the layer name (the h5 path itself uses auto-names like `dense_1`, which stand in
  when a file from an older Keras lacks the attribute). Names are `<leaf layer>/vars/<i>`, i = the position in
  that layer's own variables (== `layer.weights` for leaf layers).
  Everything outside `layers/` (the optimizer, the model's own counters) goes to `extra`.
- Legacy Keras 2 `.h5` (Keras Applications weight files, `save_weights` in Keras 2, whole-model `.h5`):
  `layer_names` on the root (or on `model_weights`) and `weight_names` on each layer group; names are the
  weight names with the `:0` suffix dropped, reduced to `<leaf layer>/<weight>`.
- `.keras` archives: config.json is audited *before* Keras sees it (see audit_config); a clean config is rebuilt
  with `keras.saving.load_model(safe_mode=True, compile=False)` so names are `<leaf layer>/<weight>`. Besides Keras
  built-ins, only the classes the caller passes as `custom_objects` ({registered name: class}) are rebuilt, so this
  package need not import the modules that define tfl's own layers. A config naming code (Lambda, any other custom
  class, ...) is refused unless unsafe=True, and even then tfl does not rebuild it: the weights are read straight
  from model.weights.h5 as `<leaf layer>/vars/<i>`, so no code from the file runs, ever.

A canonical name is the last two parts of Keras' variable path (`backbone/conv1/kernel` -> `conv1/kernel`);
when two weights would get the same short name (same-named layers in different nested models) both keep their
full path. Every HDF5 file goes through hdf5_safety before any dataset is read.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import zipfile
from typing import Mapping

import h5py
import numpy as np

from tfl.checkpoints.errors import CheckpointError
from tfl.checkpoints.hdf5_safety import open_checked, text
from tfl.checkpoints.json_limits import JSONTooDeep, loads_bounded

_WEIGHTS_MEMBER = "model.weights.h5"
_CONFIG_MEMBER = "config.json"
_KNOWN_MEMBERS = {_CONFIG_MEMBER, _WEIGHTS_MEMBER, "metadata.json"}
_MAX_CONFIG_BYTES = 64 * 1024 * 1024
# Keras stores members uncompressed; DEFLATE tops out near 1000:1, so 100:1 on a big member is a zip bomb.
_MAX_ZIP_EXPANSION = 100
_ZIP_SMALL_MEMBER = 1024 * 1024
# Each nested model adds about four levels (config -> layers -> layer -> config); real files stay far below this.
_MAX_CONFIG_DEPTH = 200

# Serialised values that carry data, not code (keras/src/saving/serialization_lib.py).
_DATA_MARKERS = {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__"}
# Built-in Keras layers that run code or touch the file system when rebuilt.
_UNSAFE_BUILTINS = {
    "Lambda": "runs a Python function stored in the file",
    "TFSMLayer": "loads a SavedModel from a path named in the file",
    "TorchModuleWrapper": "unpickles a torch module",
    "JaxLayer": "wraps a JAX function",
    "FlaxLayer": "wraps a Flax module",
    "StringLookup": "can read a vocabulary file named in the file",
    "IntegerLookup": "can read a vocabulary file named in the file",
    "TextVectorization": "can read a vocabulary file named in the file",
}
_ACTIVATION_MODULES = {"keras.activations", "keras.src.activations.activations", "builtins"}
_LEGACY_SUFFIX = re.compile(r":\d+$")


def leaf_names(items: list[tuple[str, str]], what: str) -> list[str]:
    """[(short, full)] -> names: the short one unless another item shares it, then the full one."""
    counts: dict[str, int] = {}
    for short, _ in items:
        counts[short] = counts.get(short, 0) + 1
    names = [short if counts[short] == 1 else full for short, full in items]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"cannot read {what}: several weights are called {', '.join(twice[:5])}")
    return names


def short_name(path: str) -> str:
    return "/".join(path.split("/")[-2:])


def _array(dataset) -> np.ndarray:
    if not isinstance(dataset, h5py.Dataset):
        raise CheckpointError(f"{_h5_name(dataset)} is a group where Keras writes a weight dataset")
    value = np.asarray(dataset[()])
    if dataset.attrs.get("dtype") in ("bfloat16", b"bfloat16") and value.dtype.itemsize == 2:
        return (value.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if value.dtype.kind == "V":
        raise CheckpointError(f"dataset {_h5_name(dataset)} holds opaque {value.dtype} values tfl cannot interpret")
    return value.astype(value.dtype.newbyteorder("="), copy=False)


def _h5_name(obj) -> str:
    """An object's full HDF5 path as text, also when a part of it is not UTF-8 (see hdf5_safety.text)."""
    return text(h5py.h5i.get_name(obj.id))


def layout(f) -> str | None:
    """Which Keras writer made an open HDF5 file: "keras_weights_h5", "keras_legacy_h5" or None."""
    if "layer_names" in f.attrs or "layer_names0" in f.attrs or "model_weights" in f:
        return "keras_legacy_h5"
    if "layers" in f or "vars" in f:
        return "keras_weights_h5"
    return None


# --- Keras 3 .weights.h5 ---------------------------------------------------------------------------------------


def _keras3_tensors(f, label: str) -> tuple[dict, dict]:
    weights: list[tuple[str, str, np.ndarray]] = []  # (short, full, value)
    extra: dict[str, np.ndarray] = {}

    def visit(group, h5_path: str, chain: tuple[str, ...]):
        if "vars" in group and hasattr(group["vars"], "keys"):
            vars_group = group["vars"]
            layer = text(vars_group.attrs.get("name", h5_path.rsplit("/", 1)[-1] or "model"))
            chain = chain + (layer,) if h5_path else chain  # the root saveable is the model itself
            keys = [(text(k), k) for k in vars_group.keys()]
            for key, raw in sorted(keys, key=lambda k: (not k[0].isdigit(), int(k[0]) if k[0].isdigit() else 0, k[0])):
                value = _array(vars_group[raw])
                if h5_path.startswith("layers/"):
                    weights.append((f"{layer}/vars/{key}", "/".join(chain) + f"/vars/{key}", value))
                else:
                    extra[f"{h5_path}/vars/{key}".lstrip("/")] = value
        for name in group.keys():
            child = group[name]
            if name != "vars" and hasattr(child, "keys"):
                visit(child, f"{h5_path}/{text(name)}".lstrip("/"), chain)

    visit(f, "", ())
    names = leaf_names([(short, full) for short, full, _ in weights], label)
    return dict(zip(names, (value for _, _, value in weights))), extra


def read_weights_h5(path: str) -> tuple[dict, dict]:
    with open_checked(path, path) as f:
        if layout(f) != "keras_weights_h5":
            raise CheckpointError(f"cannot read {path}: it has no layers/ group, so it is not a Keras 3 .weights.h5")
        return _keras3_tensors(f, path)


# --- legacy Keras 2 .h5 ----------------------------------------------------------------------------------------


def _strings(obj, name: str) -> list:
    """A list-of-names attribute; Keras 2 splits long ones into name0, name1, ... (64 KB attribute limit).
    The values as stored (bytes, or str), to look groups up by; text() gives their printable names."""
    if name in obj.attrs:
        values = list(obj.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in obj.attrs:
            values += list(obj.attrs[f"{name}{chunk}"])
            chunk += 1
    return [bytes(v) if isinstance(v, bytes) else str(v) for v in values]


def _member(group, raw):
    """group[raw], or None when there is no such member. (`raw in group` decodes the name as UTF-8 first.)"""
    try:
        return group[raw]
    except KeyError:
        return None


def _legacy_group_tensors(root, layer_names, label: str) -> list[tuple[str, str, np.ndarray]]:
    found = []
    for raw_layer in layer_names:
        layer = text(raw_layer)
        group = _member(root, raw_layer)
        if group is None:
            raise CheckpointError(f"cannot read {label}: layer_names lists {layer!r} but the file has no such group")
        for raw_weight in _strings(group, "weight_names"):
            weight = text(raw_weight)
            dataset = _member(group, raw_weight)
            if dataset is None:
                raise CheckpointError(f"cannot read {label}: layer {layer!r} lists weight {weight!r}, which is missing")
            full = _LEGACY_SUFFIX.sub("", weight)
            full = full if "/" in full else f"{layer}/{full}"  # Keras 1 names (`conv1_W`) carry no layer
            found.append((short_name(full), full, _array(dataset)))
    return found


def read_legacy_h5(path: str) -> tuple[dict, dict]:
    with open_checked(path, path) as f:
        root = f if ("layer_names" in f.attrs or "layer_names0" in f.attrs) else f.get("model_weights")
        if root is None or not _strings(root, "layer_names"):
            raise CheckpointError(f"cannot read {path}: no layer_names attribute, so it is not a Keras 2 weights file")
        weights = _legacy_group_tensors(root, _strings(root, "layer_names"), path)
        names = leaf_names([(short, full) for short, full, _ in weights], path)
        extra = {}
        if "optimizer_weights" in f:
            group = f["optimizer_weights"]
            members = {text(w): _member(group, w) for w in _strings(group, "weight_names")}
            extra = {_LEGACY_SUFFIX.sub("", w): _array(m) for w, m in members.items() if m is not None}
        return dict(zip(names, (value for _, _, value in weights))), extra


# --- .keras archives -------------------------------------------------------------------------------------------


def _activations(keras) -> set[str]:
    helpers = {"get", "serialize", "deserialize"}
    return {name for name, fn in vars(keras.activations).items() if callable(fn) and name[0] != "_"} - helpers


def _judge(node: dict, trusted: Mapping[str, object]) -> str | None:
    """Why Keras must not rebuild this serialised object, or None when it is a built-in or `trusted`."""
    import keras

    class_name, module, registered = node["class_name"], node.get("module"), node.get("registered_name")
    if class_name in _DATA_MARKERS:
        return None
    if class_name == "__lambda__":
        return "a Python lambda stored as bytecode"
    if class_name == "function":
        fn = node["config"]
        if isinstance(fn, str) and fn in trusted:
            return None
        if module in _ACTIVATION_MODULES and fn in _activations(keras):
            return None
        return f"function {module}.{fn}, which is not a Keras activation"
    if registered and registered != class_name:
        if registered in trusted:
            return None
        return (f"custom class {registered} (module {module}); only Keras built-ins and the classes passed as "
                "custom_objects are rebuilt")
    # Keras resolves built-ins by module; only modules Keras itself already imported are looked at.
    owner = sys.modules.get(module) if isinstance(module, str) and module.split(".")[0] == "keras" else None
    cls = getattr(owner, class_name, None) if owner is not None else None
    safe_bases = (  # a nested model's compile_config is rebuilt too, hence optimizers, losses and metrics
        keras.Operation,
        keras.initializers.Initializer,
        keras.regularizers.Regularizer,
        keras.constraints.Constraint,
        keras.DTypePolicy,
        keras.optimizers.Optimizer,
        keras.optimizers.schedules.LearningRateSchedule,
        keras.losses.Loss,
        keras.metrics.Metric,
    )
    if not (isinstance(cls, type) and issubclass(cls, safe_bases)):
        return f"class {module}.{class_name}, which is neither a Keras built-in nor one of custom_objects"
    if cls.__name__ in _UNSAFE_BUILTINS:
        return f"{cls.__name__} layer, which {_UNSAFE_BUILTINS[cls.__name__]}"
    return None


def audit_config(config: dict, custom_objects: Mapping[str, object] | None = None) -> list[str]:
    """Every object in a .keras config.json that Keras would rebuild and tfl will not allow, one phrase each.

    custom_objects: {registered name ("package>Class"): class} the caller vouches for, e.g. tfl's own layers.
    The top-level compile_config is skipped: compile=False means Keras never deserialises it.
    """
    trusted = dict(custom_objects or {})
    problems: list[str] = []

    def visit(node, layer: str):
        if isinstance(node, list):
            for item in node:
                visit(item, layer)
            return
        if not isinstance(node, dict):
            return
        if isinstance(node.get("class_name"), str) and "config" in node:
            inner = node["config"]
            if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                layer = inner["name"]
            problem = _judge(node, trusted)
            if problem:
                problems.append(f"{problem} (layer {layer!r})")
        for key, value in node.items():
            if key not in ("class_name", "module", "registered_name"):
                visit(value, layer)

    visit({k: v for k, v in config.items() if k != "compile_config"}, "")
    return problems


def _check_members(zf: zipfile.ZipFile, path: str) -> None:
    names = zf.namelist()
    unknown = [n for n in names if n not in _KNOWN_MEMBERS and not n.startswith("assets/")]
    if "model.weights.npz" in names:
        raise CheckpointError(f"cannot read {path}: its weights are in model.weights.npz; re-save it with the default "
                              "weights_format='h5'")
    if unknown:
        raise CheckpointError(f"refusing to read {path}: unexpected archive members {unknown[:5]}; a .keras archive "
                              f"holds only {', '.join(sorted(_KNOWN_MEMBERS))} and assets/")
    for member in (_CONFIG_MEMBER, _WEIGHTS_MEMBER):
        if member not in names:
            raise CheckpointError(f"cannot read {path}: the archive has no {member}")
    for info in zf.infolist():
        if info.file_size > _ZIP_SMALL_MEMBER and info.file_size > _MAX_ZIP_EXPANSION * max(info.compress_size, 1):
            raise CheckpointError(f"refusing to read {path}: member {info.filename} expands from {info.compress_size} "
                                  f"to {info.file_size} bytes (a zip bomb)")
    if zf.getinfo(_CONFIG_MEMBER).file_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"refusing to read {path}: config.json is over {_MAX_CONFIG_BYTES} bytes")


def _owned_weights(model, chain: tuple[str, ...]) -> list[tuple[tuple[str, ...], str, object]]:
    """[(names of the nested models around it, its path from its leaf layer on, variable)], layer by layer.

    A variable's own path depends on how its model was built (a rebuilt nested Sequential drops its name), so the
    nesting comes from the layer tree; the path still tells which sub-layer of a leaf (MultiHeadAttention's
    `query`) owns it.
    """
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _owned_weights(layer, chain + (layer.name,))
            continue
        for variable in layer.weights:
            parts = variable.path.split("/")
            starts = [i for i, part in enumerate(parts[:-1]) if part == layer.name]
            relative = "/".join(parts[starts[-1]:]) if starts else f"{layer.name}/{variable.name}"
            found.append((chain, relative, variable))
    return found


def _rebuild(path: str, raw_count: int, custom_objects: Mapping[str, object]) -> dict:
    import keras

    try:
        with tempfile.TemporaryDirectory() as scratch:
            # Keras picks its loader by suffix; an archive found by content under another name goes via a link.
            named = path if path.endswith(".keras") else os.path.join(scratch, "model.keras")
            if named != path:
                os.symlink(os.path.abspath(path), named)
            model = keras.saving.load_model(named, custom_objects=dict(custom_objects), compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means Keras cannot rebuild this file
        raise CheckpointError(
            f"cannot rebuild {path} with Keras ({type(exc).__name__}: {str(exc)[:300]}); pass --unsafe "
            "to read its weights without rebuilding, named <layer>/vars/<i>"
        ) from None
    found = _owned_weights(model, ())
    if len(found) != raw_count:
        raise CheckpointError(f"cannot read {path}: the rebuilt model has {len(found)} layer weights but "
                              f"model.weights.h5 holds {raw_count}")
    names = leaf_names([(short_name(relative), "/".join(chain + (relative,))) for chain, relative, _ in found], path)
    tensors = {}
    for name, (_, _, variable) in zip(names, found):
        value = keras.ops.convert_to_numpy(variable)
        tensors[name] = value.astype(np.float32) if value.dtype.name == "bfloat16" else value
    return tensors


def _audited_config(zf: zipfile.ZipFile, path: str, custom_objects: Mapping[str, object] | None) -> list[str]:
    """The archive's members checked, config.json parsed with bounded nesting, and audit_config's problems."""
    _check_members(zf, path)
    try:
        config = loads_bounded(zf.read(_CONFIG_MEMBER).decode("utf-8"), _MAX_CONFIG_DEPTH)
    except JSONTooDeep as exc:
        raise CheckpointError(f"refusing to read {path}: its config.json is not a Keras config: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"cannot read {path}: config.json holds a {type(config).__name__}, not an object")
    return audit_config(config, custom_objects)


def _refusal(path: str, problems: list[str], advice: str) -> str:
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
    return f"refusing to rebuild {path}: its config.json asks for {shown}. {advice}"


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: not a readable zip archive ({exc})") from None


def check_keras_archive(path: str, custom_objects: Mapping[str, object] | None = None) -> None:
    """Raise CheckpointError unless Keras may rebuild `path` in safe mode: the same member, size, nesting and class
    checks read_keras_archive makes, for callers that load the model with Keras themselves."""
    zf = _open_zip(path)
    with zf:
        problems = _audited_config(zf, path, custom_objects)
    if problems:
        raise CheckpointError(_refusal(path, problems, "tfl writes only Keras built-ins and its own layers, so this "
                                                       "file was not written by tfl or was altered since"))


def read_keras_archive(path: str, unsafe: bool = False,
                       custom_objects: Mapping[str, object] | None = None) -> tuple[dict, dict]:
    zf = _open_zip(path)
    with zf:
        problems = _audited_config(zf, path, custom_objects)
        if problems and not unsafe:
            raise CheckpointError(_refusal(path, problems, "If you trust the file, pass --unsafe: tfl then reads "
                                           "the weights without rebuilding the model (names <layer>/vars/<i>) and "
                                           "still runs nothing from the file"))
        with zf.open(_WEIGHTS_MEMBER) as member:
            # model.weights.h5 is stored uncompressed, so h5py seeks in it cheaply without extracting it.
            with open_checked(member, f"{path}!{_WEIGHTS_MEMBER}") as f:
                raw, extra = _keras3_tensors(f, path)
    if problems:
        return raw, extra
    return _rebuild(path, len(raw), custom_objects or {}), extra
