"""`tfl export --format onnx`: model.onnx run by onnxruntime against the Keras model on real images, a dynamic
batch, a calibrated run's temperature and abstain threshold, and the message when the converter is not installed.

The run is tests/test_export.py's (EfficientNet-Lite0 at 32 px with its ImageNet weights and a seeded random
3-class head); the conversions are the slow part, so each export is made once per module.
"""

import json
import os
import shutil
import sys

import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from click.testing import CliRunner

from test_export import CLASSES, SIZE, evaluation_pixels, keras_probabilities, probe_files, untrained_run
from tfl.cli import cli
from tfl.serving import export_run
from tfl.training import rundir

# Measured on the 14 images of probe_files (12 PNGs of 16-56 px and two JPEG photos, at 32 px): max |p_onnx - p_keras|
# 6.6e-7 for this run (`pytest -s tests/test_export_onnx.py -k real_images` prints it); the issue asks for <= 1e-4.
ATOL = 1e-4


def session(version_dir):
    return onnxruntime.InferenceSession(os.path.join(version_dir, "model.onnx"), providers=["CPUExecutionProvider"])


def run_onnx(version_dir, images) -> dict:
    runner = session(version_dir)
    names = [output.name for output in runner.get_outputs()]
    return dict(zip(names, runner.run(names, {"image": images})))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("export_onnx"))


@pytest.fixture(scope="module")
def model(run_dir):
    return rundir.RunDir(str(run_dir), create=False).load_model()


@pytest.fixture(scope="module")
def onnx_dir(run_dir):
    """The export where it goes by default, from the run's parent directory: saved_models/run-onnx/1."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run_dir.parent)
        path = export_run(str(run_dir), "onnx", log=lambda *_: None)
    assert path == os.path.join("saved_models", "run-onnx", "1")
    return str(run_dir.parent / path)


@pytest.fixture(scope="module")
def images(run_dir):
    return evaluation_pixels(probe_files(run_dir))


def test_version_dir_holds_model_onnx_and_labels(onnx_dir):
    assert sorted(os.listdir(onnx_dir)) == ["labels.txt", "model.onnx"]  # no calibration.json: not calibrated
    with open(os.path.join(onnx_dir, "labels.txt"), encoding="utf-8") as f:
        assert f.read() == "".join(name + "\n" for name in CLASSES)
    assert os.listdir(os.path.dirname(onnx_dir)) == ["1"]  # and no build folder left beside it


def test_onnx_matches_keras_on_real_images(onnx_dir, model, images):
    out = run_onnx(onnx_dir, images)
    assert set(out) == {"logits", "probabilities"}  # confident only with an abstain threshold
    expected = keras_probabilities(model, images)
    print(f"max |p_onnx - p_keras| on {len(images)} images = {np.abs(out['probabilities'] - expected).max():.1e}")
    np.testing.assert_allclose(out["probabilities"], expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["logits"], model(images, training=False).numpy(), atol=ATOL, rtol=0)
    assert (out["probabilities"].argmax(1) == expected.argmax(1)).all()
    assert expected.max() - expected.min() > 0.1  # the images are told apart: a constant output would fail above


def test_batch_dimension_is_dynamic(onnx_dir, images):
    runner = session(onnx_dir)
    (image,) = runner.get_inputs()
    assert image.name == "image" and image.type == "tensor(float)"
    assert not isinstance(image.shape[0], int) and image.shape[1:] == [SIZE, SIZE, 3]
    five = runner.run(["probabilities"], {"image": images[:5]})[0]
    one = runner.run(["probabilities"], {"image": images[3:4]})[0]
    assert five.shape == (5, len(CLASSES)) and one.shape == (1, len(CLASSES))
    np.testing.assert_allclose(one[0], five[3], atol=1e-6)


@pytest.fixture(scope="module")
def calibrated(run_dir, model, images, tmp_path_factory):
    """A copy of the run with a calibration.json as `tfl calibrate --abstain` writes it (T = 2.5), its threshold
    set between the top probabilities of the images so both verdicts occur; and its ONNX export."""
    temperature = 2.5
    copy = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(run_dir, copy)
    top = tf.nn.softmax(model(images, training=False) / temperature).numpy().max(axis=1)
    threshold = float(np.median(top))
    (copy / rundir.CALIBRATION).write_text(json.dumps({"temperature": temperature, "kept": False,
                                                        "abstain": {"target": 0.5, "threshold": threshold}}))
    path = export_run(str(copy), "onnx", output=str(copy.parent / "onnx"), log=lambda *_: None)
    return {"path": path, "temperature": temperature, "threshold": threshold}


def test_calibrated_run_exports_its_temperature_and_threshold(calibrated, model, images):
    out = run_onnx(calibrated["path"], images)
    assert set(out) == {"logits", "probabilities", "confident"} and out["confident"].dtype == np.bool_
    logits = model(images, training=False).numpy()
    np.testing.assert_allclose(out["logits"], logits, atol=ATOL, rtol=0)  # raw: before the temperature
    expected = tf.nn.softmax(logits / calibrated["temperature"]).numpy()
    np.testing.assert_allclose(out["probabilities"], expected, atol=ATOL, rtol=0)
    assert not np.allclose(expected, tf.nn.softmax(logits).numpy(), atol=ATOL)  # T = 2.5 changes them measurably
    assert list(out["confident"]) == list(out["probabilities"].max(1) >= np.float32(calibrated["threshold"]))
    assert 0 < out["confident"].sum() < len(images)
    assert json.loads(open(os.path.join(calibrated["path"], rundir.CALIBRATION)).read())["temperature"] == 2.5


def test_without_the_extra_the_export_fails_with_the_install_command(run_dir, monkeypatch, tmp_path):
    # None in sys.modules is how Python marks a module as not importable: what a machine without the extra has.
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    result = CliRunner().invoke(cli, ["export", "--run", str(run_dir), "--format", "onnx", "--output",
                                      str(tmp_path / "onnx")])
    assert result.exit_code == 1
    assert "--format onnx needs tf2onnx, which is not installed; install the extra: pip install 'tfl[onnx]'" \
        in result.output
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("args,needle", [
    (["--tflite-mode", "int8"], "--tflite-mode only applies to --format tflite"),
    (["--top-k", "2"], "--top-k only applies to --format saved_model (a TFLite or ONNX export outputs every "
                       "probability)"),
])
def test_options_of_other_formats_are_refused(run_dir, args, needle):
    result = CliRunner().invoke(cli, ["export", "--run", str(run_dir), "--format", "onnx", *args])
    assert result.exit_code == 2 and needle in result.output
