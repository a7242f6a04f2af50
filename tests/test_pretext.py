"""`tfl pretext`: the rotation and NT-Xent hooks against numpy, the views, and real tiny runs: the pretext run
ignores the labels, backbone.keras holds its backbone and a fine-tune restores it, the tables and the errors."""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfl.cli import cli
from tfl.data.pipeline import IMAGE, LABEL
from tfl.recipes import pretext as p

# 24 train / 8 val / 8 test images at 32 px; random-init compact_cnn (3 steps an epoch at batch 8).
TINY = ["--backbone", "compact_cnn", "--weights", "none", "--image-size", "32", "--head-epochs", "0", "--epochs", "1",
        "--pretext-epochs", "2", "--val-split", "0.25", "--batch-size", "8", "--no-tensorboard"]


def invoke(*args):
    return CliRunner().invoke(cli, ["pretext", *map(str, args)])


def run_json(*args):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{\n"):])


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# -- the hooks ------------------------------------------------------------------------------------------------------
def test_rotations_are_quarter_turns_in_order():
    images = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    out = p.rotate_batch(tf.constant(images)).numpy()
    assert out.shape == (8, 3, 3, 1)
    for k in range(4):
        np.testing.assert_array_equal(out[2 * k:2 * k + 2], np.rot90(images, k, axes=(1, 2)))


def test_rotation_loss_and_accuracy_are_the_hand_computation():
    rng = np.random.RandomState(0)
    logits = rng.normal(0, 2, (4 * 3, 4)).astype(np.float32)  # rotation-major: copies k*B .. k*B + B - 1
    batch = {IMAGE: tf.zeros([3, 8, 8, 3]), LABEL: tf.constant([9, 9, 9])}  # the labels play no part
    rotation = p.Rotation()
    loss = rotation.loss(batch, tf.constant(logits)).numpy()
    ce = -log_softmax(logits.astype(np.float64))[np.arange(12), np.repeat(np.arange(4), 3)]
    assert loss.shape == (3,)
    np.testing.assert_allclose(loss, ce.reshape(4, 3).mean(0), rtol=1e-5)
    hits = (logits.argmax(-1) == np.repeat(np.arange(4), 3)).reshape(4, 3).mean(0)
    np.testing.assert_allclose(rotation.metrics(batch, tf.constant(logits))["accuracy"].numpy(), hits)


def nt_xent(z, t):
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    sim = z @ z.T / t
    np.fill_diagonal(sim, -np.inf)
    positive = np.concatenate([np.arange(n2 // 2, n2), np.arange(n2 // 2)])
    ce = -log_softmax(sim)[np.arange(n2), positive]
    return (ce[: n2 // 2] + ce[n2 // 2:]) / 2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_is_the_hand_computation(t):
    z = np.random.RandomState(1).normal(0, 1, (10, 6))
    simclr = p.SimCLR(6, t)
    loss = simclr.loss({}, tf.constant(z, tf.float32)).numpy()
    assert loss.shape == (5,)
    np.testing.assert_allclose(loss, nt_xent(z, t), rtol=1e-4)


def test_nt_xent_finds_identical_partners():
    """Views embedded exactly alike (and far from the others) are found, with a lower loss than random ones."""
    base = np.eye(4, 8) * 3
    aligned = np.concatenate([base, base]).astype(np.float32)
    simclr = p.SimCLR(8, 0.5)
    assert simclr.metrics({}, tf.constant(aligned))["accuracy"].numpy().tolist() == [1.0] * 4
    shuffled = np.concatenate([base, base[::-1]]).astype(np.float32)
    assert simclr.metrics({}, tf.constant(shuffled))["accuracy"].numpy().tolist() == [0.0] * 4
    assert simclr.loss({}, tf.constant(aligned)).numpy().max() < simclr.loss({}, tf.constant(shuffled)).numpy().min()


def test_views_differ_stay_in_range_and_keep_the_shape():
    tf.random.set_seed(0)
    images = tf.constant(np.random.RandomState(2).randint(0, 256, (4, 16, 16, 3)).astype(np.float32))
    simclr = p.SimCLR(8, 0.5)
    views = simclr.inputs({IMAGE: images}).numpy()
    assert views.shape == (8, 16, 16, 3)
    assert views.min() >= 0 and views.max() <= 255
    assert np.abs(views[:4] - views[4:]).mean() > 1.0  # the two views of an image are not the same picture


# -- real runs ------------------------------------------------------------------------------------------------------
def test_rotation_pretext_then_finetunes(data, tmp_path):
    out = str(tmp_path / "out")
    result = run_json("--dataset", data, *TINY, "--label-fraction", "0.5,1", "--output-dir", out)
    # The pretext run: a normal run directory over rotation targets, trained on images whatever their labels.
    run = os.path.join(out, "pretext")
    with open(os.path.join(run, "classes.json")) as f:
        assert json.load(f) == list(p.ROTATIONS)
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["recipe"] == "pretext" and config["objective"] == "rotation" and config["cache"] == "off"
    assert config["epochs"] == 2 and config["num_examples"]["train"] == 24  # every train image, labels unused
    pretext_model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    assert pretext_model.outputs[0].shape[-1] == 4
    assert result["pretext"]["objective"] == "rotation" and 0.0 <= result["pretext"]["test_accuracy"] <= 1.0

    # backbone.keras is exactly the pretext run's backbone ...
    from tfl.models import backbone_of

    backbone = keras.saving.load_model(os.path.join(out, p.BACKBONE_FILE), compile=False)
    inner = backbone_of(pretext_model)
    assert [w.path for w in backbone.weights] == [w.path for w in inner.weights]
    for a, b in zip(backbone.weights, inner.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # ... and the pretext arm started from all of it: every backbone tensor loaded, only the new logits not.
    for fraction in ("0.5", "1"):
        with open(os.path.join(out, f"frac{fraction}", "pretext", "restore_report.json")) as f:
            report = json.load(f)
        assert report["counts"]["loaded"] == len(inner.weights) and report["counts"]["problems"] == 0
        assert not os.path.exists(os.path.join(out, f"frac{fraction}", "baseline", "restore_report.json"))

    # The tables: one row per (fraction, arm), the figure, and the CSV agreeing with the JSON.
    assert [(r["label_fraction"], r["arm"]) for r in result["runs"]] == [
        (0.5, "baseline"), (0.5, "pretext"), (1.0, "baseline"), (1.0, "pretext")]
    assert [r["train_examples"] for r in result["runs"]] == [12, 12, 24, 24]
    with open(os.path.join(out, p.PRETEXT_CSV)) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test_accuracy"]) for r in rows] == [r["test_accuracy"] for r in result["runs"]]
    assert os.path.getsize(os.path.join(out, p.PRETEXT_PNG)) > 0
    table = p.format_table(result)
    assert "random init + pretext" in table and "rotation" in table


def test_simclr_pretext_only_and_finetune_from_its_backbone(data, tmp_path):
    out = str(tmp_path / "simclr")
    result = run_json("--dataset", data, *TINY, "--objective", "simclr", "--projection-dim", "16",
                      "--temperature", "0.2", "--no-finetune", "--output-dir", out)
    assert result["runs"] == [] and result["pretext"]["objective"] == "simclr"
    with open(os.path.join(out, "pretext", "history.csv")) as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2 and all(0.0 <= float(r["train_accuracy"]) <= 1.0 for r in history)
    model = keras.saving.load_model(os.path.join(out, "pretext", "model.keras"), compile=False)
    assert model.outputs[0].shape[-1] == 16 and model.get_layer("head_hidden1").units == p.SIMCLR_HIDDEN[0]
    assert os.path.getsize(os.path.join(out, p.PRETEXT_PNG)) > 0
    # The documented hand-over: tfl finetune --init-from backbone.keras.
    run = str(tmp_path / "finetune")
    finetune = CliRunner().invoke(cli, ["finetune", "--dataset", data, "--backbone", "compact_cnn", "--weights", "none",
                                        "--init-from", os.path.join(out, p.BACKBONE_FILE), "--freeze-up-to", "none",
                                        "--image-size", "32",
                                        "--head-epochs", "1", "--epochs", "0", "--val-split", "0.25",
                                        "--batch-size", "8", "--no-tensorboard", "--output-dir", run])
    assert finetune.exit_code == 0, finetune.output
    with open(os.path.join(run, "restore_report.json")) as f:
        assert json.load(f)["counts"]["problems"] == 0


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0.2"], "--temperature"),
    (["--label-fraction", "0"], "label"),
    (["--init-from", "x.keras"], "--init-from"),
    (["--objective", "simclr", "--pretext-epochs", "0"], "--pretext-epochs"),
])
def test_bad_options_exit_2_with_one_line(data, tmp_path, args, message):
    result = invoke("--dataset", data, *TINY, *args, "--output-dir", str(tmp_path / "bad"))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "bad" / "pretext")
