"""tfl.serving: a SavedModel that TF Serving's tools load and run, and TFLite files, checked against the Keras model.

The run here is EfficientNet-Lite0 at 32 px with its ImageNet weights and a seeded random 3-class head, written
as `tfl finetune` would (tests/test_cli_export.py makes a trained one); conversions are the slow part, so each
is done once per module.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfl.data import make_pipeline
from tfl.data.decode import decode_files
from tfl.serving import export_run, layout
from tfl.serving.saved_model import export_saved_model
from tfl.serving.tflite import convert_saved_model, write_probabilities_model
from tfl.models import build_classifier
from tfl.training import rundir

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CLASSES = ["disc", "square", "stripes"]
SIZE = 32
SAVED_MODEL_CLI = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def make_shapes(root, per_class=8, seed=0):
    """Three easy classes drawn at random sizes (16-56 px a side), so serving must resize up and down."""
    rng = np.random.RandomState(seed)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for name in CLASSES:
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                h, w = rng.randint(16, 57, size=2)
                yy, xx = np.mgrid[:h, :w]
                img = rng.randint(0, 60, (h, w, 3))
                if name == "disc":
                    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2] = 230
                elif name == "square":
                    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = [40, 200, 90]
                else:
                    img[(yy // 4) % 2 == 0] = [200, 60, 200]
                Image.fromarray(img.astype("uint8")).save(root / split / name / f"{i}.png")
    return root


def untrained_run(root):
    """A run directory as finetune leaves it, with a seeded random head: what export reads, without training."""
    make_shapes(root / "shapes")
    keras.utils.set_random_seed(0)
    run = rundir.RunDir(str(root / "run"))
    run.write_json(rundir.CONFIG, {"backbone": "efficientnet_lite0", "image_size": SIZE, "num_classes": len(CLASSES)})
    run.write_json(rundir.CLASSES, CLASSES)
    run.save_model(build_classifier("efficientnet_lite0", len(CLASSES), image_size=SIZE))
    return root / "run"


def probe_files(run_dir):
    """The test images next to the run (PNG, several sizes) and two real JPEG photos."""
    data = run_dir.parent / "shapes" / "test"
    pngs = sorted(str(p) for p in data.glob("*/*.png"))
    return pngs + [os.path.join(FIXTURES, "cat.jpg"), os.path.join(FIXTURES, "coffee.jpg")]


def evaluation_pixels(paths):
    """Exactly what `tfl evaluate` feeds the model for these files: the tfl.data pipeline, training=False."""
    ds = decode_files(paths, [0] * len(paths), [False] * len(paths))
    images = next(iter(make_pipeline(ds, SIZE, len(paths), training=False, seed=0)))["image"]
    return images.numpy()


def keras_probabilities(model, images):
    return tf.nn.softmax(model(images, training=False), axis=-1).numpy()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def model(run_dir):
    return rundir.RunDir(str(run_dir), create=False).load_model()


@pytest.fixture(scope="module")
def saved_model_dir(run_dir):
    return export_saved_model(str(run_dir), output=str(run_dir.parent / "saved_models" / "shapes"), top_k=2,
                              log=lambda *_: None)


@pytest.fixture(scope="module")
def served(saved_model_dir, tmp_path_factory):
    """The export as a server gets it: copied elsewhere (so it must be self-contained) and loaded once.

    The copy's labels.txt is edited to upper case, so labels that come out upper case can only come from the
    asset file, not from constants baked into the graph.
    """
    copy = tmp_path_factory.mktemp("deployed") / "7"
    shutil.copytree(saved_model_dir, copy)
    (copy / "assets" / "labels.txt").write_text("".join(c.upper() + "\n" for c in CLASSES), encoding="utf-8")
    return tf.saved_model.load(str(copy)).signatures


def test_saved_model_layout(saved_model_dir):
    base = os.path.dirname(saved_model_dir)
    assert os.listdir(base) == ["1"]  # the first version, and no temp directory left behind
    assert sorted(os.listdir(saved_model_dir)) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    with open(os.path.join(saved_model_dir, "assets", "labels.txt"), encoding="utf-8") as f:
        assert f.read() == "disc\nsquare\nstripes\n"


def test_serving_default_matches_keras_on_evaluation_pixels(served, run_dir, model):
    paths = probe_files(run_dir)
    out = served["serving_default"](image_bytes=tf.constant([pathlib.Path(p).read_bytes() for p in paths]))
    expected = keras_probabilities(model, evaluation_pixels(paths))
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    top2 = np.argsort(-expected, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(out["classes"].numpy(), top2)
    assert out["classes"].dtype == tf.int32
    assert out["labels"].numpy().tolist() == [[CLASSES[i].upper().encode() for i in row] for row in top2]


def test_predict_images_resizes_any_size_as_training_does(served, model):
    rng = np.random.RandomState(1)
    for shape in ((3, 45, 37, 3), (2, 20, 28, 3), (2, SIZE, SIZE, 3)):
        images = rng.uniform(0, 255, shape).astype(np.float32)
        out = served["predict_images"](images=tf.constant(images))
        resized = tf.image.resize(images, [SIZE, SIZE], method="bilinear", antialias=True)
        expected = keras_probabilities(model, resized)
        np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
        assert out["labels"].numpy()[:, 0].tolist() == [CLASSES[i].upper().encode() for i in expected.argmax(1)]
    np.testing.assert_allclose(out["probabilities"].numpy(), keras_probabilities(model, images), atol=1e-5)


def test_saved_model_cli_shows_and_runs_the_signatures(saved_model_dir, model, tmp_path):
    show = subprocess.run(SAVED_MODEL_CLI + ["show", "--all", "--dir", saved_model_dir],
                          capture_output=True, text=True, check=True).stdout
    serving = show.split("signature_def['serving_default']")[1]
    assert "inputs['image_bytes']" in serving and "DT_STRING" in serving
    for output in ("outputs['probabilities']", "outputs['classes']", "outputs['labels']"):
        assert output in serving
    images_sig = show.split("signature_def['predict_images']")[1].split("signature_def[")[0]
    assert "inputs['images']" in images_sig and "shape: (-1, -1, -1, 3)" in images_sig

    images = np.random.RandomState(2).randint(0, 256, (2, 9, 7, 3)).astype(np.float32)
    outdir = tmp_path / "out"
    subprocess.run(SAVED_MODEL_CLI + ["run", "--dir", saved_model_dir, "--tag_set", "serve", "--signature_def",
                                      "predict_images", "--input_exprs", f"images={images.tolist()}",
                                      "--outdir", str(outdir)], capture_output=True, text=True, check=True)
    expected = keras_probabilities(model, tf.image.resize(images, [SIZE, SIZE], antialias=True))
    np.testing.assert_allclose(np.load(outdir / "probabilities.npy"), expected, atol=1e-5)
    labels = np.load(outdir / "labels.npy", allow_pickle=True)
    assert labels.shape == (2, 2) and {label.decode() for label in labels.ravel()} <= set(CLASSES)


def test_existing_version_is_refused(saved_model_dir, run_dir):
    base = os.path.dirname(saved_model_dir)
    with pytest.raises(ValueError, match=r"shapes/1 already exists; pick another --version \(next free: 2\)"):
        export_saved_model(str(run_dir), output=base, version=1)
    assert layout.version_dir(base, None) == os.path.join(base, "2")


def test_versions_count_up_from_the_highest_integer_directory(tmp_path):
    for name in ("1", "3", "notes", ".tmp-4-abcd"):
        (tmp_path / name).mkdir()
    assert layout.version_dir(str(tmp_path), None) == str(tmp_path / "4")
    assert layout.version_dir(str(tmp_path / "new"), None) == str(tmp_path / "new" / "1")
    with pytest.raises(ValueError, match="versions are integers from 1 to"):
        layout.version_dir(str(tmp_path), 0)
    assert layout.default_base("runs/2026-lite0-shapes/") == os.path.join("saved_models", "2026-lite0-shapes")


def test_a_failed_build_leaves_no_version_and_no_temp_dir(tmp_path):
    def build(tmp):
        pathlib.Path(tmp, "half.bin").write_bytes(b"half a model")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError):
        layout.write_version(str(tmp_path / "2"), build)
    assert os.listdir(tmp_path) == []


def test_options_of_the_other_format_and_bad_class_names_are_refused(run_dir):
    with pytest.raises(ValueError, match="--tflite-mode only applies to --format tflite"):
        export_run(str(run_dir), "saved_model", tflite_mode="int8")
    with pytest.raises(ValueError, match="--top-k only applies to --format saved_model"):
        export_run(str(run_dir), "tflite", top_k=3)
    with pytest.raises(ValueError, match=r"class name 'a\\nb' cannot be written one per line"):
        layout.labels_text(["ok", "a\nb"])


def tflite_outputs(path, images):
    """Every output of a TFLite file's serving_default for a batch of images, by name."""
    with warnings.catch_warnings():  # tf.lite.Interpreter announces its move to ai-edge-litert
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    details = runner.get_input_details()["image"]
    assert list(details["shape_signature"]) == [-1, SIZE, SIZE, 3] and details["dtype"] == np.float32
    return runner(image=images)


def tflite_probabilities(path, images):
    return tflite_outputs(path, images)["probabilities"]


@pytest.fixture(scope="module")
def probabilities_model(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tflite_source"))
    write_probabilities_model(model, path)
    return path


# Measured on 38 images of a trained run: max |p_tflite - p_keras| float32 1.5e-6, float16 1.6e-3. int8 and
# the whole export_tflite path (model.tflite + labels.txt): tests/test_cli_export.py.
@pytest.mark.parametrize("mode,atol", [("float32", 1e-5), ("float16", 1e-2)])
def test_tflite_matches_keras(probabilities_model, run_dir, model, mode, atol, tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(convert_saved_model(probabilities_model, mode))
    images = evaluation_pixels(probe_files(run_dir))
    np.testing.assert_allclose(tflite_probabilities(str(path), images), keras_probabilities(model, images), atol=atol)
