"""Test-time augmentation: the views against numpy, the keep rule on hand-made logits, and one tiny run calibrated
with `tfl calibrate --tta flip` as a user would (its record checked against numpy); then, with kept TTA written into
its calibration.json by the writer tfl uses, evaluate, predict, report and both exports use the mean of the views'
logits."""

import json
import os
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from tfl import calibration
from tfl.cli import cli
from tfl.data.pipeline import to_model_input
from tfl.errors import UsageError
from tfl.training.rundir import CALIBRATION, RunDir
from tfl.tta import VIEW_NAMES, crop_box, tta_logits, view_logits, views
from test_export import evaluation_pixels, tflite_outputs
from test_export_onnx import run_onnx


# -- the views ------------------------------------------------------------------------------------------------------
def test_flip_mirrors_left_right():
    x = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    identity, flipped = (v.numpy() for v in views(x, "flip"))
    np.testing.assert_array_equal(identity, x)
    np.testing.assert_array_equal(flipped, x[:, :, ::-1, :])
    assert flipped[0, 0, 0, 0] == x[0, 0, 3, 0]  # the last column is now the first
    assert len(views(x, "none")) == 1 and len(views(x, "flip")) == 2


def test_crops_are_the_corners_and_center_at_seven_eighths_resized_as_the_pipeline_does():
    size = 16
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    out = [v.numpy() for v in views(x, "flip+crops")]
    assert len(out) == len(VIEW_NAMES["flip+crops"]) == 7
    assert all(v.shape == x.shape and v.dtype == np.float32 for v in out)
    c, offsets = crop_box(size)
    assert c == 14 and offsets == [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for view, (top, left) in zip(out[2:], offsets):
        # the pipeline's own resize (antialiased) of the numpy crop: equal when enlarging
        expected = to_model_input(tf.constant(x[:, top:top + c, left:left + c, :]), size).numpy()
        np.testing.assert_allclose(view, expected, atol=2e-3)
    # a constant image stays constant in every crop; the corners differ from each other on a random one
    np.testing.assert_allclose(views(np.full((1, size, size, 3), 7.0, np.float32), "flip+crops")[4], 7.0, atol=1e-4)
    assert not np.allclose(out[2], out[5])


def test_tta_logits_are_the_mean_of_the_models_logits_over_the_views():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    x = np.random.default_rng(1).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    expected = (model(x).numpy() + model(x[:, :, ::-1]).numpy()) / 2
    np.testing.assert_allclose(tta_logits(model, x, "flip").numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(tta_logits(model, x, None).numpy(), model(x).numpy(), rtol=1e-6)
    each = view_logits(model, x, "flip+crops").numpy()
    assert each.shape == (7, 4, 3)
    np.testing.assert_allclose(each[0], model(x).numpy(), rtol=1e-5, atol=1e-4)
    with pytest.raises(UsageError, match="--tta 'rotate' is not one of none, flip, flip\\+crops"):
        tta_logits(model, x, "rotate")


# -- the keep rule ----------------------------------------------------------------------------------------------------
LABELS = np.array([0, 1, 0, 1])


def decide(plain, tta):
    return calibration.tta_decision("flip", np.array(plain, float), np.array(tta, float), LABELS)


def test_kept_when_val_accuracy_improves():
    record = decide([[2, 0], [0, 2], [0, 1], [1, 0]], [[2, 0], [0, 2], [1, 0], [1, 0]])  # 2 -> 3 of 4 right
    assert record["kept"] is True and record["mode"] == "flip"
    assert record["val"]["plain"]["accuracy"] == 0.5 and record["val"]["tta"]["accuracy"] == 0.75
    assert "+1 of 4" in record["reason"]


def test_dropped_when_val_accuracy_falls_even_with_a_lower_nll():
    plain = [[9, 0], [0, 9], [9, 0], [0, 1]]  # 4 right, one barely
    tta = [[1, 0], [0, 1], [1, 0], [0.1, 0]]  # 3 right, far less confident: lower NLL is not enough
    record = decide(plain, tta)
    assert record["val"]["tta"]["accuracy"] < record["val"]["plain"]["accuracy"]
    assert record["kept"] is False and "not kept" in record["reason"]


def test_equal_accuracy_falls_back_to_nll_and_a_tie_is_not_kept():
    plain = [[1, 0], [0, 1], [1, 0], [1, 0]]
    sharper = [[3, 0], [0, 3], [3, 0], [1, 0]]  # the same 3 right, lower NLL
    kept = decide(plain, sharper)
    assert kept["kept"] is True and kept["val"]["tta"]["nll"] < kept["val"]["plain"]["nll"]
    assert "accuracy equal" in kept["reason"]
    assert decide(sharper, plain)["kept"] is False  # equal accuracy, higher NLL
    tie = decide(plain, plain)
    assert tie["kept"] is False and "only a lower NLL keeps it" in tie["reason"]


def test_the_reader_returns_the_kept_mode_only(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.tta() is None  # no calibration.json
    run.write_json(CALIBRATION, {"temperature": 1.0})
    assert run.tta() is None
    run.write_json(CALIBRATION, {"temperature": 1.0, "tta": {"mode": "flip+crops", "kept": True}})
    assert run.tta() == "flip+crops"
    run.write_json(CALIBRATION, {"temperature": 1.0, "tta": {"mode": "flip", "kept": False}})
    assert run.tta() is None
    run.write_json(CALIBRATION, {"temperature": 1.0, "tta": {"mode": "mirror", "kept": True}})
    with pytest.raises(UsageError, match="the 'tta' entry is .* run `tfl calibrate"):
        run.tta()


# -- one tiny run where flipping helps on val ------------------------------------------------------------------------
SIZE = 32


def gradient_folder(root) -> str:
    """Class "a": brightness rising left to right; "b": flat grey; noise on both. train/ has a's gradient as it is,
    val/ and test/ have it mirrored (falling), so the two views of an "a" image differ."""
    rng = np.random.RandomState(0)
    ramp = np.linspace(20, 235, SIZE)[None, :, None]
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        for name in ("a", "b"):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                if name == "a":
                    base = ramp if split == "train" else ramp[:, ::-1]
                else:
                    base = np.full((1, SIZE, 1), 128.0)
                img = np.clip(base + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype("uint8")
                Image.fromarray(img).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    folder = gradient_folder(root / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        trained = invoke("finetune", "--dataset", folder, "--backbone", "compact_cnn", "--weights", "none",
                         "--image-size", SIZE, "--head-epochs", 2, "--epochs", 1, "--batch-size", 8, "--lr", 0.01,
                         "--no-tensorboard", "--output-dir", root / "run", "--tta", "flip", "--json")
        assert trained.exit_code == 0, trained.output
        from_finetune = json.loads((root / "run" / CALIBRATION).read_text())
        calibrated = invoke("calibrate", "--run", root / "run", "--tta", "flip", "--json")
        assert calibrated.exit_code == 0, calibrated.output
    run = RunDir(str(root / "run"), create=False)
    model = run.load_model()
    pixels = {}
    for split in ("val", "test"):
        files = sorted(str(p) for p in pathlib.Path(folder).glob(f"{split}/*/*.png"))
        pixels[split] = (files, evaluation_pixels(files), np.array([0 if "/a/" in f else 1 for f in files]))

    def numpy_tta(split):  # the mean of the two views' logits, each view made by numpy
        images = pixels[split][1]
        return (np.asarray(model(images, training=False), np.float64)
                + np.asarray(model(images[:, :, ::-1, :].copy(), training=False), np.float64)) / 2

    record = json.loads(calibrated.stdout)
    # The readers below need kept TTA whatever val decided: the record tfl would write had val kept it (T fitted on
    # the TTA logits, the same decision entry with kept true), through the run directory's own writer.
    kept = calibration.calibrate_logits(numpy_tta("val"), pixels["val"][2], numpy_tta("test"), pixels["test"][2])
    kept["tta"] = {**record["tta"], "kept": True, "reason": "kept by tests/test_tta.py"}
    run.write_json(CALIBRATION, kept)
    return {"root": root, "run": root / "run", "record": record, "kept": kept, "metrics": json.loads(trained.stdout),
            "from_finetune": from_finetune, "model": model, "pixels": pixels,
            "numpy_tta": numpy_tta}


def test_calibrate_records_both_numbers_and_the_decision(tta_run):
    record, (_, images, labels) = tta_run["record"], tta_run["pixels"]["val"]
    tta = record["tta"]
    assert tta["mode"] == "flip" and set(tta["val"]) == {"examples", "plain", "tta"}
    plain_logits = np.asarray(tta_run["model"](images, training=False), np.float64)
    assert tta["val"]["plain"]["accuracy"] == pytest.approx((plain_logits.argmax(1) == labels).mean())
    assert tta["val"]["plain"]["nll"] == pytest.approx(calibration.nll(plain_logits, labels), abs=1e-4)
    averaged = tta_run["numpy_tta"]("val")
    assert tta["val"]["tta"]["accuracy"] == pytest.approx((averaged.argmax(1) == labels).mean())
    assert tta["val"]["tta"]["nll"] == pytest.approx(calibration.nll(averaged, labels), abs=1e-4)
    assert tta["test"]["examples"] == 12 and set(tta["test"]) == {"examples", "plain", "tta"}
    # The decision is the rule applied to those numbers (at equal accuracy, by more than float noise in NLL)...
    plain, averaged = tta["val"]["plain"], tta["val"]["tta"]
    assert averaged["accuracy"] != plain["accuracy"] or abs(averaged["nll"] - plain["nll"]) > 1e-4
    rule = averaged["accuracy"] > plain["accuracy"] or (
        averaged["accuracy"] == plain["accuracy"] and averaged["nll"] < plain["nll"])
    assert tta["kept"] is rule
    # ... and T was fitted on the logits it chose: the record's val "before" scores are theirs
    chosen = averaged if tta["kept"] else plain
    assert record["val"]["before"]["accuracy"] == chosen["accuracy"]
    assert record["val"]["before"]["nll"] == pytest.approx(chosen["nll"], abs=1e-5)
    assert calibration.describe(record).startswith(f"TTA flip {'kept' if rule else 'not kept'}: ")
    assert RunDir(str(tta_run["run"]), create=False).tta() == "flip"  # the kept record the fixture wrote
    # finetune --tta (implying --calibrate) decided the same on the same model, and says so in its metrics
    assert tta_run["from_finetune"]["tta"] == tta
    assert tta_run["metrics"]["tta"] == "flip" and tta_run["metrics"]["tta_kept"] is tta["kept"]
    assert tta_run["metrics"]["temperature"] == record["temperature"]


def test_evaluate_and_report_use_the_mean_of_the_views(tta_run):
    result = invoke("evaluate", "--run", tta_run["run"], "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    _, _, labels = tta_run["pixels"]["test"]
    averaged = tta_run["numpy_tta"]("test")
    t = tta_run["kept"]["temperature"]
    assert scores["tta"] == "flip" and scores["split"] == "test"
    assert scores["accuracy"] == pytest.approx((averaged.argmax(1) == labels).mean())
    assert scores["accuracy"] == tta_run["record"]["tta"]["test"]["tta"]["accuracy"]
    assert scores["loss"] == pytest.approx(calibration.nll(averaged, labels, t), abs=1e-4)
    report = invoke("report", "--run", tta_run["run"], "--json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["tta"] == "flip"
    assert json.loads(report.stdout)["accuracy"] == scores["accuracy"]


def test_predict_and_every_export_serves_the_tta_probabilities(tta_run):
    files, images, _ = tta_run["pixels"]["test"]
    t = tta_run["kept"]["temperature"]
    expected = calibration.softmax(tta_run["numpy_tta"]("test"), t)
    predicted = invoke("predict", "--run", tta_run["run"], "--top-k", 2, "--json", *files)
    assert predicted.exit_code == 0, predicted.output
    rows = json.loads(predicted.stdout)
    probs = np.array([[next(x["prob"] for x in row["top"] if x["index"] == j) for j in range(2)] for row in rows])
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    plain = calibration.softmax(np.asarray(tta_run["model"](images, training=False), np.float64), t)
    assert np.abs(expected - plain).max() > 1e-4  # TTA changed them (by far more than float noise)

    saved = invoke("export", "--run", tta_run["run"], "--output", tta_run["root"] / "sm", "--json")
    assert saved.exit_code == 0, saved.output
    version = tta_run["root"] / "sm" / "1"
    copy = json.loads((version / "assets.extra" / CALIBRATION).read_text())
    assert copy["tta"]["mode"] == "flip" and copy["tta"]["kept"] is True
    signatures = tf.saved_model.load(str(version)).signatures
    for name in ("serving_default", "predict_images"):
        assert set(signatures[name].structured_outputs) == {"probabilities", "classes", "labels"}
    served = signatures["predict_images"](images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(served, probs, atol=1e-5)

    lite = invoke("export", "--run", tta_run["run"], "--format", "tflite", "--output", tta_run["root"] / "lite",
                  "--json")
    assert lite.exit_code == 0, lite.output
    lite_dir = tta_run["root"] / "lite" / "1"
    assert json.loads((lite_dir / CALIBRATION).read_text())["tta"]["mode"] == "flip"
    outputs = tflite_outputs(str(lite_dir / "model.tflite"), images)
    assert set(outputs) == {"probabilities"}
    np.testing.assert_allclose(outputs["probabilities"], probs, atol=1e-5)

    onnx = invoke("export", "--run", tta_run["run"], "--format", "onnx", "--output", tta_run["root"] / "onnx",
                  "--json")
    assert onnx.exit_code == 0, onnx.output
    served = run_onnx(str(tta_run["root"] / "onnx" / "1"), images)
    np.testing.assert_allclose(served["probabilities"], probs, atol=1e-5)
    np.testing.assert_allclose(served["logits"], tta_run["numpy_tta"]("test"), atol=1e-4)  # the mean of the views


def test_calibrating_again_without_tta_drops_it_and_a_bad_mode_exits_2(tta_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tta_run["run"], copy)
    again = invoke("calibrate", "--run", copy, "--json")
    assert again.exit_code == 0, again.output
    assert "tta" not in json.loads(again.stdout) and RunDir(str(copy), create=False).tta() is None
    bad = invoke("calibrate", "--run", copy, "--tta", "mirror")
    assert bad.exit_code == 2 and "'mirror' is not one of 'none', 'flip', 'flip+crops'" in bad.output


def test_flip_and_crops_convert_to_tflite_and_match_tensorflow(tmp_path):
    """The crops' resize is one TFLite has (the antialiased one is not): the float32 flatbuffer computes the same
    probabilities as tta_logits in TensorFlow."""
    from tfl.serving.tflite import convert_saved_model, write_probabilities_model

    inputs = keras.Input((16, 16, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(inputs / 255.0))
    model = keras.Model(inputs, keras.layers.Dense(3)(features))
    x = np.random.default_rng(2).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    write_probabilities_model(model, str(tmp_path), temperature=1.5, tta="flip+crops")
    flatbuffer = convert_saved_model(str(tmp_path), "float32")
    path = tmp_path / "model.tflite"
    path.write_bytes(flatbuffer)
    interpreter = tf.lite.Interpreter(model_path=str(path))
    served = interpreter.get_signature_runner("serving_default")(image=x)["probabilities"]
    expected = calibration.softmax(tta_logits(model, x, "flip+crops").numpy(), 1.5)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert np.abs(expected - calibration.softmax(model(x).numpy(), 1.5)).max() > 1e-4  # the views mattered
