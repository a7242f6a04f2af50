"""Keras readers against files written by Keras itself (and by h5py in Keras 2's layout), and hostile HDF5 files.

The hostile files point outside themselves at a FIFO; a thread waits to write into it, so if anything ever opened
the FIFO for reading, the thread would notice. Each test asserts both the refusal and that the FIFO stayed shut.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile

import h5py
import keras
import numpy as np
import pytest

from tfl.checkpoints import CheckpointError, read_checkpoint
from tfl import reuse
from tfl.models import ImagePreprocessing

# The reader trusts no class beyond Keras' built-ins unless told; tfl's callers pass tfl's (tfl.reuse).
TFL_LAYERS = {"tfl>ImagePreprocessing": ImagePreprocessing}


def _seeded(model: keras.Model) -> keras.Model:
    """Distinct, recognisable values in every weight (BN statistics included)."""
    for i, variable in enumerate(model.weights):
        variable.assign(np.arange(np.prod(variable.shape), dtype=np.float32).reshape(variable.shape) / 7 + i)
    return model


def _nested_model() -> keras.Model:
    backbone = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="conv1"), keras.layers.BatchNormalization(name="bn1")],
        name="backbone",
    )
    inputs = keras.Input((4,), name="image")
    x = ImagePreprocessing(mean=(1.0, 2.0, 3.0), name="preprocess")(inputs[:, :3])
    x = keras.layers.Concatenate()([x, inputs[:, 3:]])
    outputs = keras.layers.Dense(2, name="logits")(backbone(x))
    return _seeded(keras.Model(inputs, outputs, name="clf"))


EXPECTED = {  # layer -> its weight names, in layer.weights order
    "conv1": ["kernel", "bias"],
    "bn1": ["gamma", "beta", "moving_mean", "moving_variance"],
    "logits": ["kernel", "bias"],
}


def _by_layer(model: keras.Model) -> dict[str, np.ndarray]:
    layers = {"conv1": model.get_layer("backbone").get_layer("conv1"),
              "bn1": model.get_layer("backbone").get_layer("bn1"), "logits": model.get_layer("logits")}
    return {f"{layer}/{name}": np.asarray(weight) for layer, layer_obj in layers.items()
            for name, weight in zip(EXPECTED[layer], layer_obj.weights)}


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def model():
    return _nested_model()


def test_keras_archive_is_rebuilt_into_layer_weight_names(tmp_path, model):
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / "model.keras"
    model.save(path)
    checkpoint = read_checkpoint(path, custom_objects=TFL_LAYERS)
    assert checkpoint.format == "keras"
    _assert_same(checkpoint.tensors, _by_layer(model))  # tfl's own ImagePreprocessing rebuilt fine (no weights)
    # The optimizer's iteration count, learning rate and 2 slots x 6 trainable weights stay out of the tensors.
    assert set(checkpoint.extra) == {f"optimizer/vars/{i}" for i in range(14)}


def test_weights_h5_names_leaf_layers_and_their_variable_index(tmp_path, model):
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "keras_weights_h5"
    want = {}
    for name, value in _by_layer(model).items():
        layer, weight = name.split("/")
        want[f"{layer}/vars/{EXPECTED[layer].index(weight)}"] = value
    _assert_same(checkpoint.tensors, want)


def test_weights_h5_bfloat16_variables_come_back_as_float32(tmp_path):
    inputs = keras.Input((3,))
    model = _seeded(keras.Model(inputs, keras.layers.Dense(2, name="half", dtype="bfloat16")(inputs)))
    path = tmp_path / "bf16.weights.h5"
    model.save_weights(path)
    kernel = read_checkpoint(path).tensors["half/vars/0"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, keras.ops.convert_to_numpy(model.weights[0]).astype(np.float32))


def test_same_named_layers_in_two_nested_models_keep_their_full_path(tmp_path):
    def branch(name):
        return keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="proj")], name=name)

    inputs = keras.Input((2,))
    model = _seeded(keras.Model(inputs, keras.layers.Add()([branch("left")(inputs), branch("right")(inputs)])))
    model.save_weights(tmp_path / "twins.weights.h5")
    model.save(tmp_path / "twins.keras")
    assert sorted(read_checkpoint(tmp_path / "twins.weights.h5").tensors) == [
        "left/proj/vars/0", "left/proj/vars/1", "right/proj/vars/0", "right/proj/vars/1"]
    archive = read_checkpoint(tmp_path / "twins.keras").tensors
    assert sorted(archive) == ["left/proj/bias", "left/proj/kernel", "right/proj/bias", "right/proj/kernel"]
    np.testing.assert_array_equal(archive["right/proj/kernel"], np.asarray(model.get_layer("right").weights[0]))


def test_keras_written_legacy_h5_strips_the_nested_model_prefix(tmp_path, model):
    path = tmp_path / "whole_model.h5"
    model.save(path)  # Keras 3's legacy whole-model format: model_weights/<layer>/weight_names
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "keras_legacy_h5"
    _assert_same(checkpoint.tensors, _by_layer(model))


def test_keras2_weights_file_layout(tmp_path):
    """What Keras Applications ship: root layer_names, per-layer weight_names ending in ':0', chunked attributes."""
    kernel = np.arange(27 * 4, dtype=np.float32).reshape(3, 3, 3, 4)
    gamma, w_old = np.linspace(0, 1, 4, dtype=np.float32), np.ones((2, 2), dtype=np.float32)
    path = tmp_path / "resnet_notop.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names0"] = [b"input_1", b"conv1"]  # Keras 2 splits attributes past 64 KB like this
        f.attrs["layer_names1"] = [b"bn_conv1", b"fc_old"]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        f.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        f.create_group("conv1").attrs["weight_names"] = [b"conv1/kernel:0"]
        f["conv1/conv1/kernel:0"] = kernel
        f.create_group("bn_conv1").attrs["weight_names"] = [b"bn_conv1/gamma:0"]
        f["bn_conv1/bn_conv1/gamma:0"] = gamma
        f.create_group("fc_old").attrs["weight_names"] = [b"fc_old_W:0"]  # Keras 1 names carry no layer part
        f["fc_old/fc_old_W:0"] = w_old
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "keras_legacy_h5"
    _assert_same(checkpoint.tensors, {"conv1/kernel": kernel, "bn_conv1/gamma": gamma, "fc_old/fc_old_W": w_old})


# --- config.json audit ------------------------------------------------------------------------------------------


def test_lambda_layer_is_refused_and_unsafe_reads_weights_without_running_it(tmp_path):
    marker = tmp_path / "lambda_ran"
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(2, name="hidden")(inputs)

    def side_effect(x):
        marker.touch()  # any run of this function, at build time or when rebuilt, leaves the marker
        return x * 2

    outputs = keras.layers.Lambda(side_effect, name="double")(hidden)
    model = _seeded(keras.Model(inputs, outputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    marker.unlink()
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "Lambda layer, which runs a Python function stored in the file (layer 'double')" in str(err.value)
    assert "pass --unsafe" in str(err.value) and "unsafe=True" not in str(err.value)
    checkpoint = read_checkpoint(path, unsafe=True)
    _assert_same(checkpoint.tensors, {"hidden/vars/0": np.asarray(model.weights[0]),
                                      "hidden/vars/1": np.asarray(model.weights[1])})
    assert not marker.exists()


@keras.saving.register_keras_serializable(package="someone_else")
class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.factor = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="factor")

    def call(self, x):
        return x * self.factor


def test_tfl_layers_are_rebuilt_only_when_the_caller_vouches_for_them(tmp_path, model):
    path = tmp_path / "model.keras"
    model.save(path)
    with pytest.raises(CheckpointError, match=r"custom class tfl>ImagePreprocessing .*\(layer 'preprocess'\)"):
        read_checkpoint(path)
    assert set(reuse.custom_objects()) >= set(TFL_LAYERS)
    _assert_same(reuse.read_checkpoint(path).tensors, _by_layer(model))


def test_custom_class_outside_tfl_is_refused_even_when_registered_here(tmp_path):
    inputs = keras.Input((3,))
    model = _seeded(keras.Model(inputs, Scale(name="scale")(keras.layers.Dense(3, name="d")(inputs))))
    path = tmp_path / "custom.keras"
    model.save(path)
    with pytest.raises(CheckpointError, match=r"custom class someone_else>Scale .*\(layer 'scale'\)"):
        reuse.read_checkpoint(path)
    assert sorted(read_checkpoint(path, unsafe=True).tensors) == ["d/vars/0", "d/vars/1", "scale/vars/0"]


def test_config_naming_a_non_keras_module_is_refused(tmp_path, model):
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(members["config.json"])
    dense = next(layer for layer in config["config"]["layers"] if layer["name"] == "logits")
    dense["module"], dense["class_name"] = "os", "system"
    members["config.json"] = json.dumps(config).encode()
    hostile = tmp_path / "hostile.keras"
    with zipfile.ZipFile(hostile, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"class os\.system, which is neither a Keras built-in .*'logits'"):
        read_checkpoint(hostile)


# --- hostile HDF5 ----------------------------------------------------------------------------------------------


class FifoSentinel:
    """A FIFO whose writer end waits in a thread: it only gets through if someone opens the FIFO to read."""

    def __init__(self, path):
        self.path = path
        os.mkfifo(path)
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self):
        fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader opens the FIFO
        self.opened.set()
        os.close(fd)

    def was_opened(self) -> bool:
        opened = self.opened.is_set()  # read before our own open below lets the writer through
        os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self.thread.join(timeout=5)
        return opened


def _weights_file(tmp_path) -> str:
    inputs = keras.Input((3,))
    model = _seeded(keras.Model(inputs, keras.layers.Dense(2, name="hidden")(inputs)))
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    return path


def _external_link(f, target):
    f["layers/dense/vars/2"] = h5py.ExternalLink(target, "/data")
    return "/layers/dense/vars/2 is an external link to /data in file " + target


def _soft_link(f, target):
    f["layers/dense/vars/2"] = h5py.SoftLink("/layers/dense/vars/0")
    return "/layers/dense/vars/2 is a soft link to /layers/dense/vars/0"


def _external_storage(f, target):
    f["layers/dense/vars"].create_dataset("2", shape=(4,), dtype="f4", external=[(target, 0, 16)])
    return "dataset /layers/dense/vars/2 keeps its bytes in external file(s) " + target


def _virtual(f, target):
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(target, "/data", shape=(4,))
    f["layers/dense/vars"].create_virtual_dataset("2", layout)
    return "dataset /layers/dense/vars/2 is a virtual dataset mapping data from " + target


@pytest.mark.parametrize("make", [_external_link, _soft_link, _external_storage, _virtual],
                         ids=["external_link", "soft_link", "external_storage", "virtual_dataset"])
def test_hdf5_reaching_outside_the_file_is_refused_before_reading(tmp_path, make):
    path = _weights_file(tmp_path)
    sentinel = FifoSentinel(str(tmp_path / "outside.h5"))
    with h5py.File(path, "a") as f:
        expected = make(f, sentinel.path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert f"refusing to read {path}: {expected}" in str(err.value)
    assert not sentinel.was_opened()


def test_keras_archive_with_an_external_link_inside_is_refused(tmp_path, model):
    sentinel = FifoSentinel(str(tmp_path / "outside.h5"))
    inner = tmp_path / "model.weights.h5"
    model.save_weights(inner)
    with h5py.File(inner, "a") as f:
        f["layers/dense/vars/9"] = h5py.ExternalLink(sentinel.path, "/data")
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as zf:
        config, metadata = zf.read("config.json"), zf.read("metadata.json")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", config)
        zf.writestr("metadata.json", metadata)
        zf.write(inner, "model.weights.h5")
    with pytest.raises(CheckpointError, match=r"model\.keras!model\.weights\.h5: /layers/dense/vars/9 is an external"):
        read_checkpoint(path, custom_objects=TFL_LAYERS)
    assert not sentinel.was_opened()


def test_hard_link_alias_and_shape_bomb_are_refused(tmp_path):
    path = _weights_file(tmp_path)
    with h5py.File(path, "a") as f:
        f["layers/dense/vars/2"] = f["layers/dense/vars/0"]
    with pytest.raises(CheckpointError, match="/layers/dense/vars/2 is a second name for /layers/dense/vars/0"):
        read_checkpoint(path)
    with h5py.File(path, "a") as f:
        del f["layers/dense/vars/2"]
        f["layers/dense/vars"].create_dataset("2", shape=(10**6, 10**6), dtype="f4", chunks=(64, 64))
    with pytest.raises(CheckpointError, match="declare 4000000000032 bytes"):
        read_checkpoint(path)


def test_dataset_needing_a_filter_plugin_is_refused(tmp_path):
    path = _weights_file(tmp_path)
    with h5py.File(path, "a") as f:
        f["layers/dense/vars"].create_dataset("2", shape=(4,), dtype="f4", chunks=(4,), compression=32013,
                                              allow_unknown_filter=True)
    with pytest.raises(CheckpointError, match="dataset /layers/dense/vars/2 needs HDF5 filter 32013"):
        read_checkpoint(path)
