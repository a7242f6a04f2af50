"""read_checkpoint/detect_format: every format found by content (also under a misleading name), unknown ones refused."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import save_file

from tfl.checkpoints import FORMATS, Checkpoint, CheckpointError, detect_format, read_checkpoint, read_torch_state_dict

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """One small file (or prefix, or directory) per format, written by the library that owns the format."""
    root = tmp_path_factory.mktemp("formats")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.save(root / "model.keras")
    model.save_weights(root / "model.weights.h5")
    model.save(root / "legacy.h5")
    tf.saved_model.save(model, str(root / "saved"))
    tf2 = tf.train.Checkpoint(model=model).write(str(root / "tf2" / "ckpt"))
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.get_variable("w", initializer=np.ones(2, np.float32))
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            tf1 = tf.compat.v1.train.Saver().save(session, str(root / "tf1" / "model.ckpt"))
    save_file({"w": np.ones(2, np.float32)}, str(root / "model.safetensors"))
    return {
        "keras": str(root / "model.keras"),
        "keras_weights_h5": str(root / "model.weights.h5"),
        "keras_legacy_h5": str(root / "legacy.h5"),
        "tf1_checkpoint": tf1,
        "tf2_checkpoint": tf2,
        "saved_model": str(root / "saved"),
        "pytorch_zip": str(FIXTURES / "torch_zip.pth"),
        "pytorch_legacy": str(FIXTURES / "torch_legacy.pth"),
        "safetensors": str(root / "model.safetensors"),
    }


def test_every_format_is_detected_and_read(files):
    assert sorted(files) == sorted(FORMATS)
    for fmt, path in files.items():
        assert detect_format(path) == fmt, path
        checkpoint = read_checkpoint(path)
        assert checkpoint.format == fmt and checkpoint.path == path
        assert checkpoint.tensors and all(isinstance(v, np.ndarray) for v in checkpoint.tensors.values()), fmt
    assert "torch" not in sys.modules  # the torch formats were read without it


@pytest.mark.parametrize("fmt", ["keras", "keras_weights_h5", "keras_legacy_h5", "pytorch_zip", "pytorch_legacy",
                                 "safetensors"])
def test_detection_reads_content_not_the_suffix(files, fmt, tmp_path):
    disguised = tmp_path / "weights.bin"
    shutil.copy(files[fmt], disguised)
    assert detect_format(disguised) == fmt
    np.testing.assert_equal(read_checkpoint(disguised).tensors, read_checkpoint(files[fmt]).tensors)


def test_torch_files_match_the_torch_reader(files):
    for fmt in ("pytorch_zip", "pytorch_legacy"):
        np.testing.assert_equal(read_checkpoint(files[fmt]).tensors, read_torch_state_dict(files[fmt]))


def test_torchscript_is_refused_through_the_dispatcher():
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        read_checkpoint(FIXTURES / "torchscript_tiny.pt")


def test_listing_is_sorted_and_leaves_extras_out():
    checkpoint = Checkpoint("x", "tf1_checkpoint", {"b/kernel": np.zeros((2, 3), np.float32),
                                                    "a/bias": np.zeros(3, np.float16)},
                            {"global_step": np.array(5, np.int64)})
    assert checkpoint.listing() == [{"name": "a/bias", "shape": [3], "dtype": "float16"},
                                    {"name": "b/kernel", "shape": [2, 3], "dtype": "float32"}]


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _unknown_cases(tmp_path):
    (tmp_path / "random.bin").write_bytes(bytes(range(200)))
    _zip(tmp_path / "other.zip", {"readme.txt": b"hello"})
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.ones(3)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "no_vars" / "variables").mkdir(parents=True)
    (tmp_path / "no_vars" / "saved_model.pb").write_bytes(b"")
    return {
        "random.bin": "its first bytes",
        "other.zip": "neither a Keras config.json nor a torch data.pkl",
        "plain.h5": "neither Keras 3 layers/ groups nor a Keras 2 layer_names",
        "empty_dir": "a directory with neither saved_model.pb",
        "no_vars": "a SavedModel without variables/variables.index",
        "missing": "no such file, directory or checkpoint prefix",
    }


def test_unknown_inputs_are_refused_naming_the_supported_formats(tmp_path):
    for name, reason in _unknown_cases(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            detect_format(tmp_path / name)
        assert reason in str(err.value), name
        assert str(tmp_path / name) in str(err.value)
        if name not in ("no_vars", "missing"):
            assert "supported formats: " + ", ".join(FORMATS) in str(err.value)


def test_keras_archive_with_unexpected_members_is_refused(files, tmp_path):
    with zipfile.ZipFile(files["keras"]) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    path = _zip(tmp_path / "extra.keras", {**members, "payload.py": b"import os"})
    with pytest.raises(CheckpointError, match=r"unexpected archive members \['payload.py'\]"):
        read_checkpoint(path)
