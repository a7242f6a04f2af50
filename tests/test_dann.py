"""tfl dann: the gradient-reversal layer and its schedule, the shifts, the loss, the target rows and batches, the
summary's flag, and tiny end-to-end runs (a shifted copy and a target folder) writing every output."""

import csv
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import tfl.cli as cli
from tfl.data.pipeline import LABEL
from tfl.recipes import dann as D
from tiny_runs import history_rows, image_folder, stop_then_resume

TINY = ["--image-size", "32", "--head-epochs", "2", "--batch-size", "8", "--val-split", "0.25", "--no-tensorboard",
        "--domain-hidden", "16", "--head-hidden", "32"]


def _json(path):
    with open(path) as f:
        return json.load(f)


# -- gradient reversal ------------------------------------------------------------------------------------------
def test_gradient_reversal_is_the_identity_forward_and_negates_and_scales_the_gradient():
    x = tf.constant([[1.0, -2.0, 3.0]])
    w = tf.constant([[0.5, 2.0, -1.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = D.reverse_gradient(x, 0.7)
        loss = tf.reduce_sum(y * w)
    np.testing.assert_allclose(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), -0.7 * w.numpy(), rtol=1e-6)


def test_the_layer_reads_its_lambda_variable_on_every_call():
    layer = D.gradient_reversal_layer()
    x = tf.Variable([[1.0, 2.0]])

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, x)

    layer.build((None, 2))
    assert layer.lam.trainable is False
    np.testing.assert_allclose(grad().numpy(), [[0.0, 0.0]])  # starts at 0: no gradient reaches the features
    layer.lam.assign(0.25)
    np.testing.assert_allclose(grad().numpy(), [[-0.25, -0.25]])  # the traced function sees the new value


def test_the_schedule_is_ganins():
    assert D.dann_lambda(0.0) == 0.0
    assert D.dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert D.dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [D.dann_lambda(p / 20) for p in range(21)]
    assert values == sorted(values) and values[-1] < 1.0
    assert D.dann_lambda(2.0) == D.dann_lambda(1.0)  # progress is clipped to [0, 1]


def test_the_callback_sets_lambda_from_the_stage_progress_and_continues_after_a_resume():
    layer = D.gradient_reversal_layer()
    layer.build((None, 2))
    schedule = D.LambdaSchedule(layer, lambda_max=0.5)
    schedule.on_stage_begin("dann", {"epochs": 4, "steps_per_epoch": 5, "step": 10, "first_epoch": 1})
    assert float(layer.lam.numpy()) == 0.0
    schedule.on_train_step("dann", 20, {})  # 10 of the stage's 20 steps done
    assert float(layer.lam.numpy()) == pytest.approx(0.5 * D.dann_lambda(0.5))
    resumed = D.LambdaSchedule(layer, lambda_max=0.5)  # resumed at epoch 3: global step 20, stage started at 10
    resumed.on_stage_begin("dann", {"epochs": 4, "steps_per_epoch": 5, "step": 20, "first_epoch": 3})
    assert resumed.start == 10 and float(layer.lam.numpy()) == pytest.approx(0.5 * D.dann_lambda(0.5))


# -- the target domain ------------------------------------------------------------------------------------------
def test_the_shifts_are_deterministic_pixel_maps():
    image = np.zeros((12, 12, 3), np.uint8)
    image[4:8, 4:8] = 255
    inverted = D.shift_image(image, "invert").numpy()
    assert inverted[0, 0].tolist() == [255, 255, 255] and inverted[5, 5].tolist() == [0, 0, 0]
    tinted = D.shift_image(image, "tint").numpy()
    assert tinted[0, 0].tolist() == list(D.TINT_BACKGROUND) and tinted[5, 5].tolist() == list(D.TINT_FOREGROUND)
    textured = D.shift_image(image, "texture").numpy()
    stripes = D.TEXTURE_MEAN + D.TEXTURE_AMPLITUDE * np.sin(2 * np.pi * np.add.outer(np.arange(12), np.arange(12)) / 6)
    np.testing.assert_array_equal(textured[..., 0], np.maximum(image[..., 0], np.round(stripes)).astype(np.uint8))
    assert textured[5, 5].tolist() == [255, 255, 255]  # the garment stays on top of the stripes
    np.testing.assert_array_equal(D.shift_image(image, "texture").numpy(), textured)
    with pytest.raises(ValueError, match="--target-shift 'blur'"):
        D.shift_image(image, "blur")


def test_target_rows_are_the_rows_the_source_does_not_use_else_its_own():
    rows, note = D.target_rows(100, np.arange(0, 100, 4))  # the source uses 25 rows
    assert len(rows) == 25 and not set(rows) & set(range(0, 100, 4)) and note == ""
    assert list(rows) == sorted(rows)
    np.testing.assert_array_equal(D.target_rows(100, np.arange(0, 100, 4))[0], rows)  # fixed: cached once
    same, note = D.target_rows(100, None, limit=30)
    assert len(same) == 30 and "also uses" in note
    assert len(D.target_rows(100, np.arange(60), limit=10)[0]) == 10


def test_epoch_batches_pair_every_source_batch_with_target_rows_and_interleave_the_domains():
    s, t = D.epoch_rows(20, 6, 4, seed=0, epoch=1)
    assert s.shape == t.shape == (5, 4)
    assert sorted(s.ravel()) == list(range(20)) and set(t.ravel()) == set(range(6))  # the target repeats
    again = D.epoch_rows(20, 6, 4, seed=0, epoch=1)
    np.testing.assert_array_equal(again[0], s)
    assert not np.array_equal(D.epoch_rows(20, 6, 4, seed=0, epoch=2)[0], s)

    class Entry:
        def __init__(self, data, labels):
            self.data, self.labels = data, labels

    source = Entry(np.arange(20, dtype=np.float32)[:, None], np.arange(20, dtype=np.int32))
    target = Entry(100 + np.arange(6, dtype=np.float32)[:, None], np.arange(6, dtype=np.int32))
    batch = next(iter(D.interleaved(source, target, 4, s, t)))
    assert batch["domain"].numpy().tolist() == [0, 1] * 4
    assert batch["features"].numpy()[::2, 0].tolist() == s[0].tolist()
    assert batch["features"].numpy()[1::2, 0].tolist() == (100 + t[0]).tolist()
    val, steps = D.val_batches(source, target, 4)  # 6 rows each: a full batch and a partial one
    sizes = [int(b["domain"].shape[0]) for b in val]
    assert steps == 2 and sizes == [8, 4]


# -- the loss ---------------------------------------------------------------------------------------------------
def test_the_loss_is_twice_the_source_cross_entropy_plus_the_domain_cross_entropy():
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.5, -0.5]], np.float32)
    domain = np.array([[0.3], [-1.0], [2.0], [0.0]], np.float32)
    batch = {LABEL: tf.constant([0, 1, 1, 0]), "domain": tf.constant([0.0, 1.0, 0.0, 1.0])}
    loss = D.DannLoss(2)(batch, {"logits": tf.constant(logits), "domain": tf.constant(domain)}).numpy()

    def ce(z, y):
        return -np.log(np.exp(z[y]) / np.exp(z).sum())

    def bce(z, d):
        p = 1 / (1 + np.exp(-z))
        return -(d * np.log(p) + (1 - d) * np.log(1 - p))

    expected = [2 * ce(logits[0], 0) + bce(0.3, 0), bce(-1.0, 1),  # target rows: no label term
                2 * ce(logits[2], 1) + bce(2.0, 0), bce(0.0, 1)]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    metrics = D.dann_metrics(batch, {"logits": tf.constant(logits), "domain": tf.constant(domain)})
    assert metrics["accuracy"].numpy().tolist() == [2.0, 0.0, 0.0, 0.0]  # hit on source row 0; row 2 ties -> 0
    assert metrics["target_accuracy"].numpy().tolist() == [0.0, 2.0, 0.0, 2.0]
    assert metrics["domain_accuracy"].numpy().tolist() == [0.0, 0.0, 0.0, 0.0]


def test_the_summary_flags_a_seed_where_dann_is_worse():
    runs = [{"arm": "source_only", "seed": 0, "source_test_accuracy": 0.9, "target_test_accuracy": 0.5,
             "val_domain_accuracy": 0.99},
            {"arm": "dann", "seed": 0, "source_test_accuracy": 0.9, "target_test_accuracy": 0.6,
             "val_domain_accuracy": 0.7},
            {"arm": "source_only", "seed": 1, "source_test_accuracy": 0.9, "target_test_accuracy": 0.55,
             "val_domain_accuracy": 0.99},
            {"arm": "dann", "seed": 1, "source_test_accuracy": 0.9, "target_test_accuracy": 0.5,
             "val_domain_accuracy": 0.7}]
    summary = D.summarize(runs)
    assert summary["comparisons"] == [{"seed": 0, "target_gain": 0.1, "dann_worse": False},
                                      {"seed": 1, "target_gain": -0.05, "dann_worse": True}]
    assert summary["summary"]["dann"]["target_test_accuracy_mean"] == pytest.approx(0.55)
    table = D.format_table({"runs": runs, **summary})
    assert "WORSE" in table.splitlines()[4] and "WORSE" not in table.splitlines()[2]


# -- end to end -------------------------------------------------------------------------------------------------
def _logits_kernel(run_dir):
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    return model.get_layer("logits").get_weights()[0]


def test_a_tiny_run_writes_every_output_and_the_reversed_gradient_changes_the_model(tmp_path):
    data = image_folder(tmp_path / "data", classes=("c0", "c1", "c2"), per_class=16)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.cli, ["dann", "--dataset", data, "--target-shift", "texture", "--seeds", "1",
                                          "--limit-train", "20", *TINY, "--output-dir", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = _json(out / "dann.json")
    assert [(r["arm"], r["seed"]) for r in written["runs"]] == [("source_only", 0), ("dann", 0)]
    assert printed["comparisons"] == written["comparisons"]
    by = {r["arm"]: r for r in written["runs"]}
    assert by["source_only"]["final_lambda"] == 0.0
    assert by["dann"]["final_lambda"] == pytest.approx(D.dann_lambda(1.0), abs=1e-6)
    assert by["dann"]["source_train_examples"] == 20 and by["dann"]["target_train_examples"] == 16  # 36 - 20
    for r in written["runs"]:
        assert 0.0 <= r["target_test_accuracy"] <= 1.0 and 0.0 <= r["source_test_accuracy"] <= 1.0
    with open(out / "dann.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["source_only", "dann"]
    assert os.path.getsize(out / "dann.png") > 1000
    with open(out / "dann" / "seed0" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2 and {"val_target_accuracy", "val_domain_accuracy", "lr_domain"} <= set(history[0])
    # Same seed, init and batches: only the reversed gradient differs, so the trained heads differ.
    assert not np.allclose(_logits_kernel(out / "dann" / "seed0"), _logits_kernel(out / "source_only" / "seed0"))


def test_a_target_folder_with_the_same_classes_is_the_target(tmp_path):
    data = image_folder(tmp_path / "data", classes=("c0", "c1"), per_class=16)
    target = image_folder(tmp_path / "target", classes=("c0", "c1"), per_class=8)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.cli, ["dann", "--dataset", data, "--target", target, "--seeds", "1", "--arms",
                                          "dann", *TINY, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "dann" in result.stdout and "target test" in result.stdout
    run = _json(out / "dann.json")["runs"][0]
    assert run["target"] == "target" and run["target_train_examples"] == 12  # 16 train images, 25 % held out


def test_user_errors_exit_2_with_one_line(tmp_path):
    data = image_folder(tmp_path / "data", classes=("c0", "c1"), per_class=8)
    other = image_folder(tmp_path / "other", classes=("a", "b"), per_class=8)
    runner = CliRunner()
    augment = runner.invoke(cli.cli, ["dann", "--dataset", data, "--augment", *TINY])
    assert augment.exit_code == 2 and "--augment" in augment.output and "Traceback" not in augment.output
    shift = runner.invoke(cli.cli, ["dann", "--dataset", data, "--target-shift", "blur", *TINY])
    assert shift.exit_code == 2 and "blur" in shift.output
    classes = runner.invoke(cli.cli, ["dann", "--dataset", data, "--target", other, "--seeds", "1", *TINY,
                                      "--output-dir", str(tmp_path / "o")])
    assert classes.exit_code == 2 and "same classes" in classes.output and "Traceback" not in classes.output


# -- resume -----------------------------------------------------------------------------------------------------
def test_resume_in_the_middle_of_the_dann_arm_is_exact(tmp_path, monkeypatch):
    """Stopped after the DANN arm's first of 3 epochs, the rerun restores the domain classifier and its optimizer,
    continues lambda's schedule from the checkpoint's step, and ends where an uninterrupted run ends."""
    data = image_folder(tmp_path / "data", classes=("c0", "c1", "c2"), per_class=16)

    def opts(name):
        return D.DannOptions(dataset=data, image_size=32, head_epochs=3, batch_size=8, val_split=0.25,
                             tensorboard=False, domain_hidden=16, head_hidden=(32,), seeds=1, arms=("dann",),
                             target_shift="texture", limit_train=20, output_dir=str(tmp_path / name))

    run_dir = os.path.join(tmp_path, "run", "dann", "seed0")
    reference, snapshot, resumed, lines = stop_then_resume(D.dann, opts, "dann", run_dir, monkeypatch)
    assert snapshot.epoch == 1 and snapshot.state["stage"] == "dann" and not snapshot.state["stage_done"]
    assert snapshot.state["recipe"] == {"extra_variables": 4}  # the domain classifier's kernels and biases
    assert snapshot.state["groups"] == ["head", "domain"] and any(k.startswith("opt.domain.") for k in snapshot.arrays)
    assert any("resuming after epoch 1" in line for line in lines)
    timing = ("train_seconds", "wall_seconds", "run_dir")
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in reference.items() if k not in timing}
    assert resumed["epochs_run"] == 3 and resumed["final_lambda"] == round(D.dann_lambda(1.0), 6)
    assert history_rows(run_dir) == history_rows(reference["run_dir"])  # every epoch's domain accuracy and loss too
    np.testing.assert_array_equal(_logits_kernel(run_dir), _logits_kernel(reference["run_dir"]))
