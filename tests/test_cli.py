"""The CLI as a user drives it: exit codes, one-line errors, JSON shapes, and a tiny end-to-end run."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfl.cli import cli

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def test_backbones_lists_the_registry():
    result = run("backbones", "--json")
    assert result.exit_code == 0
    names = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"efficientnet_lite0", "resnet50", "vgg16", "mobilenet_v2", "efficientnet_b0"} <= set(names)
    assert names["efficientnet_lite0"]["default_weights"] == "imagenet"
    assert names["resnet50"]["stages"] == ["stem", "block1", "block2", "block3", "block4", "head"]


def test_inspect_json_freezes_exactly_block1_to_block3_of_vgg16():
    result = run("inspect", "vgg16", "--freeze-up-to", "block3", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert set(plan) >= {"backbone", "layers", "trainable_params", "frozen_params"}
    frozen = {l["name"] for l in plan["layers"] if l["frozen"] and l["params"]}
    assert frozen == {"block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
                      "block3_conv1", "block3_conv2", "block3_conv3"}
    assert plan["frozen_params"] == sum(l["params"] for l in plan["layers"] if l["frozen"])
    assert plan["trainable_params"] + plan["frozen_params"] == sum(l["params"] for l in plan["layers"])


def test_inspect_rules_follow_command_line_order():
    first = json.loads(run("inspect", "efficientnet_lite0", "--freeze", "block1.*", "--unfreeze", "block1a_bn", "--json").stdout)
    second = json.loads(run("inspect", "efficientnet_lite0", "--unfreeze", "block1a_bn", "--freeze", "block1.*", "--json").stdout)
    state = lambda plan: {l["name"]: l["frozen"] for l in plan["layers"]}["block1a_bn"]  # noqa: E731
    assert state(first) is False and state(second) is True


@pytest.mark.parametrize("args,needle", [
    (["inspect", "vgg16", "--freeze-up-to", "block9"], "'block9' is not a stage"),
    (["inspect", "nosuchnet"], "unknown backbone 'nosuchnet'"),
    (["inspect", "vgg16", "--freeze", "block["], "not a valid regular expression"),
    (["finetune", "--backbone", "nosuchnet"], "unknown backbone 'nosuchnet'"),
    (["finetune", "--epochs", "-1"], "Invalid value for '--epochs'"),
    (["finetune", "--freeze-mode", "sideways"], "Invalid value for '--freeze-mode'"),
    (["predict", os.path.join(FIXTURES, "cat.jpg")], "exactly one of --run DIR"),
    (["finetune", "--unfreeze-every", "2"], "--unfreeze-every: this shapes gradual unfreezing; add --unfreeze-mode gradual"),
    (["finetune", "--unfreeze-mode", "gradual", "--unfreeze-schedule", "head:x"], "'head:x' is not STAGE:EPOCHS"),
    (["finetune", "--unfreeze-mode", "gradual", "--lr-decay-per-stage", "0.5"], "--lr-decay-per-stage 0.5: must be >= 1"),
    (["compare", "--arms", "scratch,nosucharm"], "--arms 'nosucharm': choose from scratch, linear_probe"),
    (["compare", "--label-fraction", "0.1,2"], "--label-fraction 2.0: must be in (0, 1]"),
    (["report", "--run", "/nonexistent/run"], "no such run directory"),
    (["report", "--run", ".", "--split", "holdout"], "Invalid value for '--split'"),
])
def test_usage_errors_exit_2_with_one_clear_line(args, needle):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_predict_backbone_gives_imagenet_labels_for_real_photos():
    result = run("predict", "--backbone", "efficientnet_lite0", "--json", "--top-k", "3",
                 os.path.join(FIXTURES, "cat.jpg"), os.path.join(FIXTURES, "coffee.jpg"))
    assert result.exit_code == 0, result.output
    cat, coffee = json.loads(result.stdout)
    assert cat["top"][0]["label"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert coffee["top"][0]["label"] in {"espresso", "cup", "coffee mug"}
    assert len(cat["top"]) == 3 and cat["top"][0]["prob"] >= cat["top"][1]["prob"]
    assert set(cat["top"][0]) == {"index", "label", "prob"}


def _image_folder(root, classes=("circle", "square"), per_class=12, size=40):
    """Two visually distinct classes: bright disc vs dark square, with noise."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                img = rng.randint(0, 60, (size, size, 3))
                if c == 0:
                    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = 230
                else:
                    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = [40, 200, 90]
                Image.fromarray(img.astype("uint8")).save(root / split / name / f"{i}.png")
    return root


def test_finetune_evaluate_predict_end_to_end(tmp_path):
    data = _image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    result = run("finetune", "--dataset", str(data), "--image-size", "64", "--head-epochs", "2", "--epochs", "1",
                 "--batch-size", "8", "--freeze-up-to", "block5", "--val-split", "0.25", "--lr", "0.01",
                 "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    for name in ("config.json", "history.csv", "model.keras", "classes.json", "metrics.json", "freeze_plan.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"test_accuracy", "test_loss", "val_accuracy", "epochs_run", "train_seconds"}
    assert metrics["epochs_run"] == 3
    assert metrics["test_accuracy"] >= 0.9  # the shapes are easy for an ImageNet backbone
    assert json.loads((out / "classes.json").read_text()) == ["circle", "square"]
    config = json.loads((out / "config.json").read_text())
    assert config["freeze_up_to"] == "block5" and config["seed"] == 0 and "tensorflow" in config["versions"]
    assert "test accuracy" in result.output

    result = run("evaluate", "--run", str(out), "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)

    image = data / "test" / "circle" / "0.png"
    result = run("predict", "--run", str(out), "--json", str(image))
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)[0]["top"]
    assert top[0]["label"] == "circle" and len(top) == 2


def test_report_and_compare_from_the_command_line(tmp_path):
    data = _image_folder(tmp_path / "shapes")
    common = ["--dataset", str(data), "--image-size", "32", "--batch-size", "8", "--val-split", "0.25",
              "--head-epochs", "1", "--epochs", "1", "--no-tensorboard"]
    # the random-init compact CNN: what is checked does not need pretrained weights, and it trains in about half the time
    result = run("compare", "--backbone", "compact_cnn", "--weights", "none", "--freeze-up-to", "block2",
                 "--arms", "linear_probe,two_stage", "--label-fraction", "0.5,1", *common,
                 "--output-dir", str(tmp_path / "cmp"), "--json")
    assert result.exit_code == 0, result.output
    compared = json.loads(result.stdout)
    assert [(r["arm"], r["label_fraction"]) for r in compared["runs"]] == [
        ("linear_probe", 0.5), ("linear_probe", 1.0), ("two_stage", 0.5), ("two_stage", 1.0)]
    assert {r["epochs"] for r in compared["runs"]} == {2}  # one budget for every arm
    assert [r["train_examples"] for r in compared["runs"]] == [10, 18, 10, 18]  # 0.5 x 9 = 4.5 -> 5 a class
    for name in ("compare.json", "compare.csv", "compare.png"):
        assert (tmp_path / "cmp" / name).is_file(), name
    arm_run = tmp_path / "cmp" / "two_stage" / "frac1" / "seed0"
    assert not (arm_run / "tensorboard").exists()  # --no-tensorboard reached every arm

    result = run("report", "--run", str(arm_run), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    metrics = json.loads((arm_run / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert sum(map(sum, report["confusion_matrix"])) == report["examples"] == 12
    assert (arm_run / "report" / "confusion_matrix.png").is_file()


def test_bad_freeze_mode_plan_fails_before_any_training(tmp_path):
    data = _image_folder(tmp_path / "shapes", per_class=4)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--dataset", str(data), "--image-size", "32", "--batch-size", "2",
                                      "--freeze-mode", "stop_gradient", "--freeze-up-to", "none",
                                      "--freeze", "block2.*", "--output-dir", str(out)])
    assert result.exit_code == 2
    assert "prefix-shaped" in result.output
    assert "stage head" not in result.output  # nothing trained
    assert not out.exists()  # and no run directory left behind


def test_freeze_up_to_none_freezes_nothing():
    plan = json.loads(run("inspect", "efficientnet_lite0", "--freeze-up-to", "none", "--json").stdout)
    assert plan["frozen_params"] == 0 and not any(l["frozen"] for l in plan["layers"])
