"""TensorFlow checkpoints (TF1 Saver, TF2 tf.train.Checkpoint, SavedModel variables/) -> (weights, extra).

Only TF's checkpoint reader (tf.train.load_checkpoint) touches the files: no graph, no SavedModel function and
no Python object is ever loaded, so nothing in them runs.

- TF1 name-based: names as saved (`hidden1/weights`). Optimizer slots (a variable named `<another variable>/<slot>`,
  e.g. `hidden1/weights/Adam_1`), `global_step`, `beta1_power`/`beta2_power` go to `extra`.
- TF2 object-based (and SavedModel variables/, and checkpoints Keras writes): the `_CHECKPOINTABLE_OBJECT_GRAPH`
  proto says which object each entry belongs to. Weights are the variables reachable from the root without passing
  through an optimizer; each is named from the `full_name` its attribute records — Keras 3's variable path
  (`clf/hidden1/kernel`) — reduced to `<leaf layer>/<weight>` (`hidden1/kernel`), the full name where two would
  collide, and the object path (`model/_operations/1/_kernel`) for variables whose full name has no layer part.
  Optimizer variables, slots, `save_counter` and the object graph itself go to `extra` under their object paths.
"""

from __future__ import annotations

import collections
import os
import re
import struct
from pathlib import Path

import numpy as np

from tfl.checkpoints.errors import CheckpointError
from tfl.checkpoints.keras_files import leaf_names, short_name

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_ATTRIBUTE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_COUNTERS = re.compile(r"(.*/)?(global_step|save_counter|beta[12]_power(_\d+)?)")
_DATA_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")
# A checkpoint .index is a LevelDB-style table; its footer ends with this magic number.
_TABLE_MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)


def is_index_file(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - 8, 0))
            return size >= 48 and f.read(8) == _TABLE_MAGIC
    except OSError:
        return False


def missing_data_shards(prefix: str) -> list[str]:
    """The data shards (`<prefix>.data-<i>-of-<n>`) a checkpoint lacks: those the shards present count and are not
    there, or the first one when none is (every checkpoint TensorFlow writes has at least one)."""
    folder, name = os.path.split(prefix)
    pattern = re.compile(re.escape(name) + r"\.data-(\d{5})-of-(\d{5})")
    present, totals = set(), set()
    for entry in os.listdir(folder or "."):
        match = pattern.fullmatch(entry)
        if match:
            present.add(entry)
            totals.add(int(match.group(2)))
    expected = {f"{name}.data-{i:05d}-of-{n:05d}" for n in totals for i in range(n)} or {f"{name}.data-00000-of-00001"}
    return sorted(expected - present)


def saved_model_problem(directory: str) -> str | None:
    """What a SavedModel directory lacks to be loaded (its variables' index or a data shard), or None."""
    variables = os.path.join(directory, "variables", "variables")
    if not is_index_file(Path(variables + ".index")):
        return "a SavedModel without variables/variables.index holds no weights"
    missing = missing_data_shards(variables)
    if missing:
        return (f"a SavedModel without {', '.join('variables/' + m for m in missing[:3])}"
                f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}: its weights are incomplete")
    return None


def prefix_of(path: str) -> str | None:
    """The checkpoint prefix `path` names — a prefix, its .index or a data shard — if its index file is real."""
    prefix = _DATA_SHARD.sub("", path[: -len(".index")] if path.endswith(".index") else path)
    return prefix if is_index_file(Path(prefix + ".index")) else None


def prefix_in_directory(directory: Path) -> str | None:
    """The checkpoint a directory holds: the one its `checkpoint` file names, else its only .index file."""
    if (directory / "checkpoint").is_file():
        import tensorflow as tf

        try:
            state = tf.train.get_checkpoint_state(str(directory))
        except Exception as exc:  # noqa: BLE001 - a corrupt state file is a user-facing error
            raise CheckpointError(f"cannot read {directory}/checkpoint: {exc}") from None
        if state is None or not state.model_checkpoint_path:
            raise CheckpointError(f"{directory}/checkpoint names no model_checkpoint_path")
        named = state.model_checkpoint_path  # TF has already joined a relative path to the directory
        target = Path(os.path.realpath(named))
        if not target.is_relative_to(Path(os.path.realpath(directory))):
            raise CheckpointError(
                f"refusing to follow {directory}/checkpoint: it points at {named}, outside the directory; "
                "pass the checkpoint prefix itself if you mean it"
            )
        return prefix_of(str(target))
    indexes = sorted(directory.glob("*.index"))
    return prefix_of(str(indexes[0])) if len(indexes) == 1 else None


def _reader(prefix: str):
    import tensorflow as tf

    try:
        return tf.train.load_checkpoint(prefix)
    except Exception as exc:  # noqa: BLE001 - TF raises its own error types for every kind of bad file
        raise CheckpointError(f"cannot read TF checkpoint {prefix}: {type(exc).__name__}: {exc}") from None


def has_object_graph(prefix: str) -> bool:
    return _reader(prefix).has_tensor(GRAPH_KEY)


def _value(reader, prefix: str, key: str) -> np.ndarray:
    try:
        value = np.asarray(reader.get_tensor(key))
    except Exception as exc:  # noqa: BLE001 - TF's DataLossError and friends for a damaged data file
        problem = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"cannot read TF checkpoint {prefix}, entry {key!r}: {problem}") from None
    return value.astype(np.float32) if value.dtype.name == "bfloat16" else value


def _numeric(dtype) -> bool:
    return dtype.is_floating or dtype.is_integer or dtype.is_bool or dtype.is_complex


def _read_name_based(reader, prefix: str) -> tuple[dict, dict]:
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    tensors, extra = {}, {}
    for key in sorted(shapes):
        if not dtypes[key].is_numpy_compatible:
            continue  # iterator and resource state: not values numpy can hold, and never weights
        slot = "/" in key and key.rsplit("/", 1)[0] in shapes
        if slot or _COUNTERS.fullmatch(key) or not _numeric(dtypes[key]):
            extra[key] = _value(reader, prefix, key)
        else:
            tensors[key] = _value(reader, prefix, key)
    return tensors, extra


def _is_optimizer(node, local_name: str) -> bool:
    children = {child.local_name for child in node.children}
    # Keras 3 optimizers track `_iterations`, Keras 2 OptimizerV2 tracks `iter`.
    return "optimizer" in local_name.lower() or "_iterations" in children or "iter" in children


def _paths(graph, skip) -> dict[int, str]:
    """{node id: object path from the root}, breadth first (shortest paths), never entering nodes `skip` picks."""
    paths = {0: ""}
    queue = collections.deque([0])
    while queue:
        node_id = queue.popleft()
        for child in graph.nodes[node_id].children:
            if child.node_id in paths or skip(graph.nodes[child.node_id], child.local_name):
                continue
            paths[child.node_id] = f"{paths[node_id]}/{child.local_name}".lstrip("/")
            queue.append(child.node_id)
    return paths


def _read_object_based(reader, prefix: str) -> tuple[dict, dict]:
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    try:
        graph.ParseFromString(reader.get_tensor(GRAPH_KEY))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise CheckpointError(f"cannot read TF checkpoint {prefix}: its object graph is corrupt ({exc})") from None
    # A Keras optimizer also tracks the model's variables; a weight is what the root reaches without it.
    model_paths = _paths(graph, skip=_is_optimizer)
    dtypes = reader.get_variable_to_dtype_map()
    candidates: dict[str, list[tuple[str, np.ndarray]]] = {}  # full name -> [(object path, value)]
    extra: dict[str, np.ndarray] = {GRAPH_KEY: np.asarray(reader.get_tensor(GRAPH_KEY))}
    claimed = {GRAPH_KEY}
    for node_id, node in enumerate(graph.nodes):
        for attribute in node.attributes:
            key = attribute.checkpoint_key
            if key not in dtypes or not dtypes[key].is_numpy_compatible:
                continue
            claimed.add(key)
            path = model_paths.get(node_id)
            is_weight = (
                path is not None
                and attribute.name == "VARIABLE_VALUE"
                and _numeric(dtypes[key])
                and not _COUNTERS.fullmatch(path)
                and not _COUNTERS.fullmatch(attribute.full_name)
            )
            if is_weight:
                candidates.setdefault(attribute.full_name or path, []).append((path, _value(reader, prefix, key)))
            else:
                extra[key.removesuffix(_ATTRIBUTE_SUFFIX)] = _value(reader, prefix, key)
    for key in sorted(set(dtypes) - claimed):  # entries no object claims: keep them visible, out of the way
        if dtypes[key].is_numpy_compatible:
            extra[key] = _value(reader, prefix, key)

    items, values = [], []
    for full, found in candidates.items():
        # One variable tracked under two names (Keras' export keeps `variables` and `_all_variables`) is one weight.
        distinct = [found[0]] + [f for f in found[1:] if not _same(f[1], found[0][1])]
        for path, value in distinct:
            short = short_name(full) if "/" in full else path
            items.append((short, full if len(distinct) == 1 else path))
            values.append(value)
    return dict(zip(leaf_names(items, prefix), values)), extra


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def read_tf_checkpoint(prefix: str) -> tuple[dict, dict]:
    """Weights and extras of the checkpoint at `prefix` (TF1 or TF2; SavedModel: `<dir>/variables/variables`)."""
    reader = _reader(prefix)
    if reader.has_tensor(GRAPH_KEY):
        return _read_object_based(reader, prefix)
    return _read_name_based(reader, prefix)
