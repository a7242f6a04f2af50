"""What a finished `tfl finetune` run leaves besides the model: curves.png, TensorBoard events that read back to
history.csv, the hparams, and a report that agrees with metrics.json. One tiny two-stage run, in-process."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfl.recipes.finetune import FinetuneOptions, finetune
from tfl.reporting.report import report_run
from tfl.reporting.tensorboard import read_plugin_tags, read_scalars, read_text

CLASSES = ("circle", "square", "dot")  # a big and a small disc: not every test image is easy
HEAD_EPOCHS, EPOCHS = 1, 2
LR, BACKBONE_LR = 0.0005, 0.00005  # slow enough that the test split keeps a mistake or two
# 36 train / 12 val / 12 test images at 32 px, 4 steps an epoch.
TINY = dict(backbone="efficientnet_lite0", weights="default", image_size=32, head_epochs=HEAD_EPOCHS, epochs=EPOCHS,
            val_split=0.25, freeze_up_to="block6", lr=LR, backbone_lr=BACKBONE_LR, batch_size=9, seed=3)
STEPS = 36 // 9


@pytest.fixture(scope="module")
def data(data_3_classes):
    return data_3_classes


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    metrics = finetune(FinetuneOptions(**TINY, dataset=data, output_dir=str(out)), log=lambda *_: None)
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows, metrics


def test_the_run_directory_has_everything_and_no_partial_files(run):
    out, rows, metrics = run
    assert [r["stage"] for r in rows] == ["head"] * HEAD_EPOCHS + ["finetune"] * EPOCHS
    assert metrics["epochs_run"] == HEAD_EPOCHS + EPOCHS
    names = set(os.listdir(out))
    assert {"config.json", "classes.json", "freeze_plan.json", "history.csv", "model.keras", "metrics.json",
            "curves.png", "tensorboard", "checkpoints"} <= names
    assert not [n for folder, _, files in os.walk(out) for n in files if n.startswith(".tmp-")]


def test_curves_png_is_a_real_drawing(run):
    out, _, _ = run
    path = out / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < path.stat().st_size < 2_000_000
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert 1000 <= width <= 2000 and 300 <= height <= 800 and width > 2 * height  # three panels side by side
    not_white = (pixels < 245).any(axis=2)
    assert 0.02 < not_white.mean() < 0.6  # axes, curves and text on a white page, not a blank or filled canvas
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 60
    assert colourful.sum() > 500  # the coloured curves themselves, not only black axes


def test_tensorboard_val_scalars_are_the_history(run):
    out, rows, _ = run
    val = read_scalars(str(out / "tensorboard" / "val"))
    assert sorted(val) == ["epoch/accuracy", "epoch/loss"]
    epochs = list(range(1, len(rows) + 1))
    assert [s for s, _ in val["epoch/accuracy"]] == epochs
    assert [v for _, v in val["epoch/accuracy"]] == pytest.approx([float(r["val_accuracy"]) for r in rows], abs=1e-6)
    assert [v for _, v in val["epoch/loss"]] == pytest.approx([float(r["val_loss"]) for r in rows], abs=1e-6)


def test_tensorboard_train_scalars_cover_every_step_and_every_groups_lr(run):
    out, rows, _ = run
    train = read_scalars(str(out / "tensorboard" / "train"))
    total = len(rows) * STEPS
    assert [s for s, _ in train["step/loss"]] == list(range(1, total + 1))
    assert [s for s, _ in train["step/lr/head"]] == list(range(1, total + 1))
    assert [s for s, _ in train["step/lr/backbone"]] == list(range(HEAD_EPOCHS * STEPS + 1, total + 1))
    for epoch, row in enumerate(rows, 1):  # the epoch's mean loss is the mean of its (equal-sized) steps' losses
        losses = [v for s, v in train["step/loss"] if (epoch - 1) * STEPS < s <= epoch * STEPS]
        assert np.mean(losses) == pytest.approx(float(row["train_loss"]), abs=1e-5)
    assert [v for _, v in train["epoch/loss"]] == pytest.approx([float(r["train_loss"]) for r in rows], abs=1e-6)
    assert [v for _, v in train["epoch/lr/head"]] == pytest.approx([float(r["lr_head"]) for r in rows], rel=1e-6)
    finetune_rows = rows[HEAD_EPOCHS:]
    assert [s for s, _ in train["epoch/lr/backbone"]] == list(range(HEAD_EPOCHS + 1, len(rows) + 1))
    assert [v for _, v in train["epoch/lr/backbone"]] == pytest.approx(
        [float(r["lr_backbone"]) for r in finetune_rows], rel=1e-6)
    # The lr a step used: the first step of each stage at the stage's base rate.
    assert dict(train["step/lr/head"])[1] == pytest.approx(LR, rel=1e-6)
    assert dict(train["step/lr/backbone"])[HEAD_EPOCHS * STEPS + 1] == pytest.approx(BACKBONE_LR, rel=1e-6)


def test_tensorboard_has_the_hparams_plan_stages_and_final_metrics(run):
    out, rows, _ = run
    logdir = str(out / "tensorboard")
    assert {"_hparams_/session_start_info", "_hparams_/experiment"} <= set(read_plugin_tags(logdir)["hparams"])
    text = read_text(logdir)
    assert "freeze_up_to block6" in text["freeze_plan"][0][1]
    assert [step for step, _ in text["stage"]] == [1, HEAD_EPOCHS * STEPS + 1]
    assert "**stage finetune**" in text["stage"][1][1]
    final = read_scalars(logdir)
    assert final["final/val_accuracy"] == [(len(rows), pytest.approx(float(rows[-1]["val_accuracy"]), abs=1e-6))]
    assert final["final/epochs"] == [(len(rows), len(rows))]


def test_without_tensorboard_no_events_are_written(data, tmp_path):
    out = tmp_path / "run"
    opts = FinetuneOptions(**{**TINY, "head_epochs": 1, "epochs": 0}, dataset=data, output_dir=str(out),
                           tensorboard=False)
    finetune(opts, log=lambda *_: None)
    assert (out / "metrics.json").is_file() and (out / "curves.png").is_file()
    assert not (out / "tensorboard").exists()


def test_the_report_agrees_with_metrics_json(run):
    out, _, metrics = run
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved["eval_split"] == "test"
    result = report_run(str(out), log=lambda *_: None)
    assert result["split"] == "test"
    assert result["accuracy"] == saved["test_accuracy"] == metrics["test_accuracy"]
    matrix = np.array(result["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == result["examples"] == 12
    assert np.trace(matrix) / matrix.sum() == pytest.approx(saved["test_accuracy"], abs=1e-6)
    assert result["misclassified"]["total"] == matrix.sum() - np.trace(matrix)
    assert result["loss"] == pytest.approx(saved["test_loss"], abs=1e-5)


def test_a_recipe_with_its_own_loss_and_columns_trains_and_is_scored_as_a_classifier(data, tmp_path):
    # A recipe adds a column to train and val (here: soft targets, all uniform), trains on it with its own loss,
    # and finish() still scores the test split, which lacks the column, with plain cross-entropy and accuracy.
    import tensorflow as tf

    from tfl import job as jobs
    from tfl.freezing import head_only_plan
    from tfl.job import JobOptions, Stage

    seen = []

    def soft_targets(batch, logits):
        seen.append(sorted(batch))
        return tf.nn.softmax_cross_entropy_with_logits(batch["teacher"], logits)

    def recipe(job):
        uniform = {split: {"teacher": np.full((count, len(CLASSES)), 1 / len(CLASSES), np.float32)}
                   for split, count in (("train", job.n_train), ("val", job.splits.num_examples["val"]))}
        stages = [Stage("head", head_only_plan(job.plan), 1, {"head": job.lr})]
        job.prepare(stages, loss=soft_targets, extra=uniform)
        job.train(stages)
        return job.finish()

    opts = {k: v for k, v in TINY.items() if k in {f for f in JobOptions.__dataclass_fields__}}
    metrics = jobs.run(JobOptions(**opts, dataset=data, output_dir=str(tmp_path / "run")), recipe,
                       log=lambda *_: None)
    assert ["features", "label", "teacher"] in seen  # cached pooled features carry the extra column
    with open(tmp_path / "run" / "history.csv") as f:
        (row,) = list(csv.DictReader(f))
    # Cross-entropy against uniform targets is never below log(3) (labels would take it well below in an epoch).
    assert float(row["train_loss"]) >= np.log(len(CLASSES)) - 1e-5
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0  # scored on the labels
