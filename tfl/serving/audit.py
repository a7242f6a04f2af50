"""What a SavedModel would do besides computing: its ops, read from saved_model.pb before TensorFlow loads it.

Loading a SavedModel and calling a signature runs whatever ops its graph holds, and TensorFlow has ops that write
and delete files, list directories, run Python, talk to the network or print to a file. `tfl predict
--saved-model` reads saved_model.pb with protobuf only (nothing is loaded or run) and refuses a model in which any
node — in the top-level graph or in any function of its library, which includes every signature, every nested
function, loop and branch body, and the resource initialisers the loader runs — is one of the denied ops below.

A deny-list of op-name patterns rather than an allow-list: an allow-list of every math/NN op 47 backbones can
produce would refuse legitimate exports whenever Keras or TensorFlow lowers a layer differently, while the
side-effecting ops fall into a few families with telling names (File, Reader, Writer, Summary, PyFunc, Dataset,
Save/Restore, Rpc, Collective, ...), so a pattern also catches the next WriteFileV2. The two allowances:
- SaveV2, RestoreV2, MergeV2Checkpoints and ShardedFilename (the variables' checkpoint, what every SavedModel
  holds) only inside the saver functions (`__inference__traced_save_*` / `__inference__traced_restore_*`), only
  when no other function calls them, and only called from the top-level graph with the saver's filename input;
- InitializeTableFromTextFile(V2): a lookup table read from a text file, which is how tfl's own exports read
  assets/labels.txt; it can only read a file into the model's outputs, never write one.
"""

from __future__ import annotations

import os
import re

from tfl.errors import UsageError

# Side effects beyond computing outputs: files, processes, Python, network, summaries, printing, other devices.
DENIED_OP_PATTERN = re.compile(
    r".*(File|Filename|Reader|Writer|Summary|PyFunc|Dataset|Iterator|Save|Restore|Checkpoint|Rpc|RemoteCall|"
    r"Collective|Nccl|Send|Recv|Debug|Print|Sql|LMDB|Lmdb|Record|Proto|TPU|Tpu|Socket).*"
    r"|ImmutableConst|Load.*|GenerateVocabRemapping|Barrier.*|.*Queue.*|WorkerHeartbeat"
)
ALLOWED_EXCEPTIONS = frozenset({"InitializeTableFromTextFile", "InitializeTableFromTextFileV2"})
SAVER_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "SaveSlices", "Save",
                       "Restore", "RestoreSlice"})
_SAVER_FUNCTION = re.compile(r"__inference__traced_(save|restore)_\d+")


def denied(op: str) -> bool:
    return op not in ALLOWED_EXCEPTIONS and bool(DENIED_OP_PATTERN.fullmatch(op))


def _called(node, library: set[str]) -> set[str]:
    """Functions a node calls: through func-valued attributes (calls, loops, branches) or as its op type."""
    names = {node.op} & library
    for value in node.attr.values():
        if value.HasField("func"):
            names.add(value.func.name)
        if value.HasField("list"):
            names.update(f.name for f in value.list.func)
    return names


def side_effects(export_dir: str) -> list[str]:
    """'<op> in <where> (node <name>)' for every denied op in the SavedModel at `export_dir`, in file order."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(export_dir, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends: the file is not a SavedModel
            raise UsageError(f"--saved-model {export_dir!r}: {path} is not a SavedModel ({error})") from None
    found: list[str] = []
    for meta in proto.meta_graphs:
        graph = meta.graph_def
        functions = {f.signature.name: f for f in graph.library.function}
        library = set(functions)
        saver = {name for name in library if _SAVER_FUNCTION.fullmatch(name)}
        calls = {name: set().union(*(_called(n, library) for n in f.node_def)) for name, f in functions.items()}
        # A saver function stays trusted only if no other function reaches it.
        for name, callees in calls.items():
            if name not in saver:
                saver -= callees
        filename = meta.saver_def.filename_tensor_name.split(":")[0]
        for node in graph.node:
            for callee in _called(node, library) & saver:
                if filename == "" or not any(i.split(":")[0].lstrip("^") == filename for i in node.input):
                    saver.discard(callee)  # called from the graph other than as the saver: no longer trusted
            if denied(node.op):
                found.append(f"{node.op} in the top-level graph (node {node.name})")
        for name, function in functions.items():
            for node in function.node_def:
                if denied(node.op) and not (name in saver and node.op in SAVER_OPS):
                    found.append(f"{node.op} in function {name} (node {node.name})")
    return found


def check_saved_model(export_dir: str) -> None:
    """ValueError naming every denied op, unless the SavedModel only computes (see the module docstring)."""
    found = side_effects(export_dir)
    if found:
        shown = "; ".join(found[:8]) + (f"; ... ({len(found)} in all)" if len(found) > 8 else "")
        raise UsageError(
            f"--saved-model {export_dir!r}: refusing to run it: its graph has ops that touch files, processes, "
            f"Python or the network, which a model serving predictions never needs: {shown}. If you trust "
            "whoever made it, pass --trust-saved-model"
        )
