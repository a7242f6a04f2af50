"""A run trained in bfloat16 (`finetune --mixed-precision on` on a CPU, or `auto` where bfloat16 is faster) exports
to every format.

Its model computes in bfloat16 with float32 variables; TFLite's builtin ops have no bfloat16 Conv2D, so exporting
the model's own graph failed ("ConverterError ... FLEX_OPS"). Exports build their graph from a float32 copy of it
(tfl.serving.layout.float32_model): the same weights, computed in float32. Checked for TFLite, ONNX and SavedModel.
"""

import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from test_export import CLASSES, SIZE, evaluation_pixels, make_shapes, probe_files, tflite_outputs
from tfl.cli import cli
from tfl.models import build_classifier
from tfl.serving import layout
from tfl.training.rundir import CLASSES as CLASSES_FILE
from tfl.training.rundir import CONFIG, RunDir

# What separates the bfloat16 model's probabilities from the float32 export's: bfloat16 keeps 8 significant bits, so
# each layer's output is rounded by up to 2^-9 (0.2%) relative, and the logits (+-6 here) inherit a few of those
# roundings. Measured on these 14 images: 9.5e-4 at most (`pytest -s tests/test_export_bf16.py` prints it); 1e-2
# leaves 10x for another CPU's rounding and stays far below what a wrong graph gives: these probabilities span
# 0.1-0.9, so a missing temperature, softmax or layer moves them by tenths.
BF16_ATOL = 1e-2
FLOAT32_ATOL = 1e-5  # the export against the same float32 graph in Keras: float noise only (as tests/test_export.py)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def bf16_classifier(images):
    """compact_cnn built as `finetune --mixed-precision on` builds it on a CPU (bfloat16 compute, float32
    variables), seeded random weights, its logits layer scaled so the logits of `images` spread over about +-6:
    probabilities from near 0 to near 1, where a wrong serving graph cannot pass for a right one."""
    keras.utils.set_random_seed(0)
    model = build_classifier("compact_cnn", len(CLASSES), image_size=SIZE, weights=None, precision="bfloat16")
    logits = model.get_layer("logits")
    spread = float(np.std(model(images, training=False).numpy()))
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel * (3.0 / spread), bias])
    return model


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    make_shapes(root / "shapes")
    images = evaluation_pixels(probe_files(root / "run"))  # 12 PNGs of 16-56 px and two JPEG photos, at 32 px
    run = RunDir(str(root / "run"))
    run.write_json(CONFIG, {"backbone": "compact_cnn", "image_size": SIZE, "num_classes": len(CLASSES),
                            "precision": "bfloat16"})
    run.write_json(CLASSES_FILE, CLASSES)
    run.save_model(bf16_classifier(images))
    model = RunDir(str(root / "run"), create=False).load_model()
    assert model.get_layer("preprocess").dtype_policy.name == "mixed_bfloat16"  # as saved: a bfloat16 model
    probabilities = keras_probabilities(model, images)
    assert probabilities.max() > 0.9 and probabilities.min() < 0.1
    return {"root": root, "run": root / "run", "model": model, "images": images}


def keras_probabilities(model, images):
    return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32), axis=-1).numpy()


def test_the_float32_copy_has_the_same_weights_and_computes_in_float32(bf16_run):
    model = bf16_run["model"]
    copy = layout.float32_model(model)
    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}
    for a, b in zip(model.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert layout.float32_model(copy) is copy  # a float32 model is used as it is, not copied


def test_tflite_export_of_a_bf16_run_matches_keras(bf16_run):
    result = invoke("export", "--run", bf16_run["run"], "--format", "tflite", "--output", bf16_run["root"] / "tflite",
                    "--json")
    assert result.exit_code == 0, result.output
    path = pathlib.Path(json.loads(result.stdout)["path"]) / "model.tflite"
    probabilities = tflite_outputs(str(path), bf16_run["images"])["probabilities"]
    float32 = keras_probabilities(layout.float32_model(bf16_run["model"]), bf16_run["images"])
    np.testing.assert_allclose(probabilities, float32, atol=FLOAT32_ATOL)
    bf16 = keras_probabilities(bf16_run["model"], bf16_run["images"])
    print(f"max |p_tflite - p_keras_bf16| = {np.abs(probabilities - bf16).max():.2e}")
    np.testing.assert_allclose(probabilities, bf16, atol=BF16_ATOL)
    assert (probabilities.argmax(1) == bf16.argmax(1)).all()


def test_onnx_export_of_a_bf16_run_matches_keras(bf16_run):
    import onnxruntime

    result = invoke("export", "--run", bf16_run["run"], "--format", "onnx", "--output", bf16_run["root"] / "onnx",
                    "--json")
    assert result.exit_code == 0, result.output
    path = pathlib.Path(json.loads(result.stdout)["path"]) / "model.onnx"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"image": bf16_run["images"]})
    float32 = layout.float32_model(bf16_run["model"])(bf16_run["images"], training=False).numpy()
    np.testing.assert_allclose(logits, float32, atol=1e-4)
    bf16 = keras_probabilities(bf16_run["model"], bf16_run["images"])
    print(f"max |p_onnx - p_keras_bf16| = {np.abs(probabilities - bf16).max():.2e}")
    np.testing.assert_allclose(probabilities, bf16, atol=BF16_ATOL)


def test_saved_model_export_of_a_bf16_run_computes_in_float32(bf16_run):
    result = invoke("export", "--run", bf16_run["run"], "--output", bf16_run["root"] / "saved_model", "--json")
    assert result.exit_code == 0, result.output
    served = tf.saved_model.load(json.loads(result.stdout)["path"]).signatures["predict_images"]
    probabilities = served(images=tf.constant(bf16_run["images"]))["probabilities"].numpy()
    float32 = keras_probabilities(layout.float32_model(bf16_run["model"]), bf16_run["images"])
    np.testing.assert_allclose(probabilities, float32, atol=FLOAT32_ATOL)
    bf16 = keras_probabilities(bf16_run["model"], bf16_run["images"])
    assert np.abs(probabilities - bf16).max() > FLOAT32_ATOL  # float32, not the bfloat16 graph: they differ
