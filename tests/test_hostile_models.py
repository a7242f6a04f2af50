"""Models and headers that would run code or crash the reader: side-effecting SavedModels, deep JSON, run
directories whose model.keras names a class that is not Keras' or tfl's."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfl.cli import cli
from tfl.checkpoints import CheckpointError, read_checkpoint
from tfl.inference import predict_saved_model
from tfl.training import rundir

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PHOTO = os.path.join(FIXTURES, "cat.jpg")


def _outputs():
    return {"probabilities": tf.constant([[0.25, 0.75]]), "classes": tf.constant([[1, 0]], tf.int32),
            "labels": tf.constant([[b"b", b"a"]])}


def _hostile_saved_model(path, marker):
    """serving_default writes `marker` (through a nested tf.function, so the op sits in a library function)."""

    class Writer(tf.Module):
        @tf.function(autograph=False)
        def write(self):
            tf.io.write_file(str(marker), "written by the model")
            return tf.constant(0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")], autograph=False)
        def serve(self, image_bytes):
            with tf.control_dependencies([self.write()]):
                return {key: tf.identity(value) for key, value in _outputs().items()}

    module = Writer()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    assert not marker.exists()  # saving traces, it does not run
    return path


def test_a_saved_model_that_writes_a_file_is_refused_and_writes_nothing(tmp_path):
    from tfl.serving.audit import side_effects

    marker = tmp_path / "pwned.txt"
    export = _hostile_saved_model(tmp_path / "evil" / "1", marker)
    found = side_effects(str(export))
    assert any(item.startswith("WriteFile in function __inference_write_") for item in found), found
    with pytest.raises(ValueError, match=r"refusing to run it: .*WriteFile in function .*--trust-saved-model"):
        predict_saved_model([PHOTO], str(tmp_path / "evil"))
    assert not marker.exists()

    result = CliRunner().invoke(cli, ["predict", "--saved-model", str(tmp_path / "evil"), PHOTO])
    assert result.exit_code == 2 and "WriteFile" in result.output and "Traceback" not in result.output
    assert not marker.exists()

    # The override runs it, and that is exactly what the refusal prevented.
    result = CliRunner().invoke(cli, ["predict", "--saved-model", str(tmp_path / "evil"), "--trust-saved-model",
                                      PHOTO, "--json"])
    assert result.exit_code == 0, result.output
    assert marker.read_text() == "written by the model"


def test_python_functions_and_printing_to_files_are_refused(tmp_path):
    from tfl.serving.audit import side_effects

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")], autograph=False)
        def serve(self, image_bytes):
            side = tf.py_function(lambda: 0, [], tf.int32)
            printed = tf.print("x", output_stream=f"file://{tmp_path / 'log.txt'}")
            with tf.control_dependencies([side, printed]):
                return {key: tf.identity(value) for key, value in _outputs().items()}

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.serve})
    ops = {item.split(" ")[0] for item in side_effects(str(tmp_path / "m"))}
    assert {"EagerPyFunc", "PrintV2"} <= ops


@pytest.mark.parametrize("op", ["WriteFile", "ReadFile", "MatchingFiles", "PyFunc", "EagerPyFunc", "PrintV2",
                                "SaveV2", "RestoreV2", "TFRecordDataset", "WriteScalarSummary", "ImmutableConst",
                                "DebugIdentityV2", "CollectiveReduceV2", "DatasetToTFRecord", "DecodeProtoV2"])
def test_denied_ops(op):
    from tfl.serving.audit import denied

    assert denied(op)


@pytest.mark.parametrize("op", ["Conv2D", "DepthwiseConv2dNative", "FusedBatchNormV3", "ReadVariableOp",
                                "StatefulPartitionedCall", "DecodeImage", "ResizeBilinear", "TopKV2", "Softmax",
                                "LookupTableFindV2", "InitializeTableFromTextFileV2", "MapDefun", "While",
                                "TensorListReserve", "Erf", "StringJoin"])
def test_compute_ops_pass(op):
    from tfl.serving.audit import denied

    assert not denied(op)


def test_tfl_exports_pass_the_audit(tmp_path):
    from test_export import untrained_run

    from tfl.serving.audit import side_effects
    from tfl.serving.saved_model import export_saved_model

    path = export_saved_model(str(untrained_run(tmp_path)), str(tmp_path / "exported"), log=lambda *_: None)
    assert side_effects(path) == []
    # The checkpoint ops every SavedModel holds are there, in the saver functions the audit trusts.
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
    saver_ops = {(f.signature.name.split("_traced_")[1].split("_")[0], n.op)
                 for f in proto.meta_graphs[0].graph_def.library.function if "_traced_" in f.signature.name
                 for n in f.node_def}
    assert {("save", "SaveV2"), ("restore", "RestoreV2")} <= saver_ops


# --- deep JSON -------------------------------------------------------------------------------------------------


def test_deeply_nested_safetensors_header_is_refused(tmp_path):
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    for header in (b'{"__metadata__": {"a": ' + deep + b"}}", b'{"w": {"dtype": "F32", "shape": ' + deep + b"}}"):
        path = tmp_path / "deep.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(CheckpointError, match=r"deep\.safetensors as safetensors: the header is not a "
                                                  r"safetensors header: it nests arrays/objects"):
            read_checkpoint(path)
    result = CliRunner().invoke(cli, ["inspect-checkpoint", str(path)])
    assert result.exit_code == 2 and "nests arrays/objects" in result.output and "Traceback" not in result.output


def _tiny_model():
    inputs = keras.Input((4, 4, 3))
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(inputs)))


def _rewrite_config(path, edit):
    """Rewrite config.json inside a .keras archive; every other member is copied as is."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(members["config.json"])
    members["config.json"] = edit(config)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_deeply_nested_keras_config_is_refused(tmp_path):
    path = tmp_path / "deep.keras"
    _tiny_model().save(path)
    deep = "[" * 100_000 + "]" * 100_000

    def nest(config):
        text = json.dumps(config)
        return text[:-1] + ', "extra": ' + deep + "}"

    _rewrite_config(path, nest)
    with pytest.raises(CheckpointError, match=r"refusing to read .*deep\.keras: its config\.json is not a Keras "
                                              r"config: it nests arrays/objects"):
        read_checkpoint(path)


def _hostile_run(tmp_path):
    """A run directory whose model.keras names os.system as a layer class."""
    run = rundir.RunDir(str(tmp_path / "run"))
    run.write_json(rundir.CLASSES, ["a", "b"])
    run.save_model(_tiny_model())
    marker = tmp_path / "pwned"

    def poison(config):
        config["config"]["layers"][-1].update(module="os", class_name="system", registered_name="system",
                                               config={"command": f"touch {marker}"})
        return json.dumps(config)

    _rewrite_config(run.file(rundir.MODEL), poison)
    return run.path, marker


def test_a_run_whose_model_names_os_system_is_refused_by_name(tmp_path):
    run_dir, marker = _hostile_run(tmp_path)
    for args in (["predict", "--run", run_dir, PHOTO], ["export", "--run", run_dir, "--output", str(tmp_path / "x")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "class os.system, which is neither a Keras built-in nor one of custom_objects" in result.output
        assert "Traceback" not in result.output and "TypeError" not in result.output
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_a_run_written_by_tfl_still_loads(tmp_path):
    from tfl.models import build_classifier

    run = rundir.RunDir(str(tmp_path / "run"))
    model = build_classifier("mobilenet", 2, image_size=32, weights="none")
    run.save_model(model)
    run.write_json(rundir.CLASSES, ["a", "b"])
    loaded = run.load_model()
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-5)
    shutil.rmtree(run.path)
