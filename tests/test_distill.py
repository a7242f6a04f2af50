"""`tfl distill`: the loss against numpy and Keras' own LogitsDistillation, cached teacher logits against online
ones, a Born-Again chain, the class check, students as run directories, and an exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfl.cli import cli
from tfl.cache import ArrayCache, default_cache_dir
from tfl.data.pipeline import IMAGE, LABEL
from tfl.recipes import distill as d
from tiny_runs import ROOT, TIMEOUT, checkpoint_arrays, history

# 24 train / 8 val / 8 test images at 32 px; a random-init compact_cnn everywhere (3 steps an epoch at batch 8).
TINY = ["--image-size", "32", "--head-epochs", "0", "--epochs", "2", "--val-split", "0.25", "--batch-size", "8",
        "--no-tensorboard"]

FAST = ["--throughput-seconds", "0.01"]


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A real `tfl finetune` run directory: compact_cnn trained from scratch on the shapes."""
    out = str(tmp_path_factory.mktemp("teacher") / "run")
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, "--backbone", "compact_cnn", "--weights", "none",
                                      "--freeze-up-to", "none", *TINY, "--output-dir", out])
    assert result.exit_code == 0, result.output
    return out


def run_distill(*args):
    result = CliRunner().invoke(cli, ["distill", *map(str, args), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{\n"):])


# -- the loss -------------------------------------------------------------------------------------------------------
def numpy_loss(student, teacher, labels, t, alpha):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ce = -log_softmax(student)[np.arange(len(labels)), labels]
    p_t = np.exp(log_softmax(teacher / t))
    kl = (p_t * (log_softmax(teacher / t) - log_softmax(student / t))).sum(-1)
    return alpha * ce + (1 - alpha) * t * t * kl


@pytest.mark.parametrize("t,alpha", [(1.0, 0.5), (4.0, 0.1), (2.5, 0.0), (8.0, 1.0)])
def test_the_loss_is_the_hand_computation(t, alpha):
    rng = np.random.RandomState(int(t * 10))
    student, teacher = rng.normal(0, 3, (6, 5)).astype(np.float32), rng.normal(0, 3, (6, 5)).astype(np.float32)
    labels = rng.randint(0, 5, 6).astype(np.int32)
    loss = d.DistillationLoss(5, t, alpha)({LABEL: tf.constant(labels), d.TEACHER_COLUMN: tf.constant(teacher)},
                                           tf.constant(student))
    assert loss.dtype == tf.float32 and loss.shape == (6,)
    np.testing.assert_allclose(loss.numpy(), numpy_loss(student.astype(np.float64), teacher.astype(np.float64),
                                                        labels, t, alpha), rtol=1e-5, atol=1e-6)
    # Identical logits: the soft term vanishes and only alpha * CE is left.
    same = d.DistillationLoss(5, t, alpha)({LABEL: tf.constant(labels), d.TEACHER_COLUMN: tf.constant(student)},
                                           tf.constant(student))
    np.testing.assert_allclose(same.numpy(), numpy_loss(student, student, labels, t, 1.0) * alpha, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("t,alpha", [(3.0, 0.5), (4.0, 0.1), (1.0, 0.0)])
def test_the_loss_is_keras_logits_distillation(t, alpha):
    from keras.distillation import LogitsDistillation

    rng = np.random.RandomState(7)
    student, teacher = rng.normal(0, 2, (16, 10)).astype(np.float32), rng.normal(0, 2, (16, 10)).astype(np.float32)
    labels = rng.randint(0, 10, 16)
    ours = d.DistillationLoss(10, t, alpha)({LABEL: tf.constant(labels), d.TEACHER_COLUMN: tf.constant(teacher)},
                                            tf.constant(student))
    # A KLDivergence instance: Keras 3.15 softmaxes only then (its default, the string "kl_divergence", resolves to
    # the plain function and reaches the branch that applies the loss to the scaled logits themselves).
    kl = LogitsDistillation(temperature=t, loss=keras.losses.KLDivergence())
    soft = float(kl.compute_loss(tf.constant(teacher), tf.constant(student)))
    hard = float(np.mean(keras.losses.sparse_categorical_crossentropy(labels, student, from_logits=True)))
    # keras.distillation.Distiller: student_loss_weight * student loss + (1 - weight) * distillation loss
    assert float(tf.reduce_mean(ours)) == pytest.approx(alpha * hard + (1 - alpha) * soft, rel=1e-5)


def test_the_compact_cnn_is_a_small_random_init_student():
    from tfl import models
    from tfl.backbones import registry

    spec = registry.get("compact_cnn")
    model = models.build_classifier("compact_cnn", 10, 32, "default")  # "default" = its only choice: random init
    assert 100_000 <= model.count_params() <= 500_000
    assert spec.stage_names == ["stem", "block1", "block2", "block3", "head"]
    with pytest.raises(ValueError, match="compact_cnn has no pretrained weights"):
        models.build_classifier("compact_cnn", 10, 32, "some.pth")


# -- runs -----------------------------------------------------------------------------------------------------------
def distill_args(data, teacher):
    return ["--teacher", teacher, "--dataset", data, *TINY, *FAST, "--epochs", "3"]


@pytest.fixture(scope="module")
def distilled(data, teacher, tmp_path_factory):
    """An uninterrupted distillation: the student and its labels-only baseline."""
    out = tmp_path_factory.mktemp("distilled") / "run"
    result = CliRunner().invoke(cli, ["distill", *distill_args(data, teacher), "--output-dir", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout[result.stdout.index("{\n"):])


def test_students_are_run_directories_and_cached_logits_equal_online_ones(data, teacher, distilled, tmp_path):
    out, result = distilled
    rows = {row["role"]: row for row in result["models"]}
    assert list(rows) == ["teacher", "student", "labels_only"]
    for row in rows.values():
        assert row["params"] > 0 and row["file_bytes"] > 0
        assert row["images_per_second_batch1"] > 0 and row["images_per_second_batch64"] > 0
    assert (out / "distill.png").stat().st_size > 0
    with open(out / "distill.csv") as f:
        assert f.readline().strip().split(",") == list(d.COLUMNS)
    student = json.loads((out / "student" / "config.json").read_text())
    assert (student["role"], student["teacher"], student["temperature"], student["alpha"]) == (
        "student", teacher, 4.0, 0.1)
    assert json.loads((out / "labels_only" / "config.json").read_text())["teacher"] is None
    assert "val_agreement" in history(out / "student")[0] and "val_agreement" not in history(out / "labels_only")[0]

    evaluated = CliRunner().invoke(cli, ["evaluate", "--run", str(out / "student"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == rows["student"]["test_accuracy"]

    png = sorted(pathlib.Path(data, "test", "circle").glob("*.png"))[0]
    predicted = CliRunner().invoke(cli, ["predict", str(png), "--run", str(out / "student"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert {t["label"] for t in json.loads(predicted.stdout)[0]["top"]} == {"circle", "square"}

    # The cached entry holds what the teacher computes per batch, row for row.
    loaded = d.load_teacher(teacher)
    cache = ArrayCache(default_cache_dir(), 2**30)
    fn = d.forward(loaded.model)
    from tfl import data as tfl_data
    from tfl.data.pipeline import ImageStore, index_order

    splits = tfl_data.load_dataset(data, val_split=0.25, seed=0)
    store = ImageStore.from_dataset(splits.val, 32)
    key = d.teacher_key(loaded.digest(), 32, {"dataset": splits.fingerprint, "split": "val", "subset": None})
    cached = cache.lookup(key)
    assert cached is not None and cached.data.shape == (8, 2)
    online = np.concatenate([fn(b[IMAGE]).numpy() for b in store.batches(index_order(8, 3, False, 0))])
    np.testing.assert_allclose(cached.data, online, rtol=1e-5, atol=1e-5)

    # A run with the teacher on every batch trains to the same numbers as one from the cached logits.
    again = run_distill(*distill_args(data, teacher), "--no-baseline", "--teacher-logits", "online",
                        "--output-dir", tmp_path / "online")
    assert again["members"][0]["teacher_logits"] == "online"
    for a, b in zip(history(out / "student"), history(tmp_path / "online" / "student")):
        for key in ("train_loss", "train_agreement", "val_loss", "val_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5)


def test_a_born_again_chain_feeds_each_generation_the_previous_ones_outputs(data, teacher, tmp_path):
    out = tmp_path / "ban"
    result = run_distill("--teacher", teacher, "--dataset", data, *TINY, "--born-again", "2", "--no-baseline",
                         "--output-dir", out)
    assert [row["role"] for row in result["models"]] == ["teacher", "generation1", "generation2", "ensemble"]
    configs = [json.loads((out / f"generation{k}" / "config.json").read_text()) for k in (1, 2)]
    assert configs[0]["teacher"] == teacher and configs[1]["teacher"] == str(out / "generation1")
    assert [c["seed"] for c in configs] == [0, 0] and all(c["backbone"] == "compact_cnn" for c in configs)
    generation1 = d.load_teacher(str(out / "generation1"))
    assert configs[1]["teacher_digest"] == generation1.digest() != configs[0]["teacher_digest"]
    # generation 2 trained on generation 1's logits of its train rows
    from tfl import data as tfl_data

    splits = tfl_data.load_dataset(data, val_split=0.25, seed=0)
    expected, _ = d.predict_logits(generation1.model, splits.train, 24, 8)
    key = d.teacher_key(generation1.digest(), 32, {"dataset": splits.fingerprint, "split": "train", "subset": None})
    entry = ArrayCache(default_cache_dir(), 2**30).lookup(key)
    assert entry is not None
    np.testing.assert_allclose(entry.data, expected, rtol=1e-5, atol=1e-5)
    ensemble = result["models"][-1]
    assert ensemble["params"] == 2 * result["models"][1]["params"]


def test_a_teacher_with_other_classes_is_refused_naming_the_difference(data, teacher, data_3_classes, tmp_path):
    more = data_3_classes
    result = CliRunner().invoke(cli, ["distill", "--teacher", teacher, "--dataset", more, *TINY,
                                      "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "other classes" in result.output and "the data's only: dot" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "student" / "config.json").exists()

    # A .keras file: classes.json beside it is checked too.
    folder = tmp_path / "file"
    folder.mkdir()
    shutil.copy(os.path.join(teacher, "model.keras"), folder / "teacher.keras")
    (folder / "classes.json").write_text(json.dumps(["circle", "triangle"]))
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(folder / "teacher.keras"), "--dataset", data, *TINY,
                                      "--output-dir", str(tmp_path / "out2")])
    assert result.exit_code == 2, result.output
    assert "the teacher's only: triangle; the data's only: square" in result.output
    # Without classes.json only the class count can be checked, and the architecture comes from the model.
    os.remove(folder / "classes.json")
    bare = d.load_teacher(str(folder / "teacher.keras"))
    assert bare.classes is None and bare.backbone == "compact_cnn" and bare.image_size == 32
    assert "only its class count (2) was checked" in d.check_classes(bare, ["circle", "square"], data)
    with pytest.raises(ValueError, match="outputs 2 classes but --dataset"):
        d.check_classes(bare, ["circle", "square", "dot"], data)


@pytest.mark.parametrize("args,message", [
    (["--teacher-logits", "cached", "--augment"], "--teacher-logits cached cannot be used with --augment"),
    (["--born-again", "1", "--student", "efficientnet_lite0"], "born-again generations have the teacher's"),
    (["--student", "nosuchnet"], "unknown backbone 'nosuchnet'"),
    (["--head-epochs", "0", "--epochs", "0"], "nothing to train"),
])
def test_bad_options_are_one_line_errors(teacher, args, message):
    result = CliRunner().invoke(cli, ["distill", "--teacher", teacher, *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_killed_distillation_resumes_to_the_uninterrupted_result(data, teacher, distilled, tmp_path, monkeypatch):
    args, out = distill_args(data, teacher), tmp_path / "run"
    cache = str(tmp_path / "cache")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "TFL_FAULT")}
    killed = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "distill", *args, "--output-dir", str(out)],
                            cwd=ROOT, env={**env, "TFL_CACHE_DIR": cache, "TFL_FAULT": "kill-at-step:2:2"},
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "student" / "checkpoints" / "latest").read_text().strip() == "ckpt-0001.npz"

    monkeypatch.setenv("TFL_CACHE_DIR", cache)
    resumed = CliRunner().invoke(cli, ["distill", *args, "--output-dir", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1" in resumed.output
    assert "reused from an earlier run" in resumed.output  # the killed run's teacher pass
    reference = distilled[0]
    for member in ("student", "labels_only"):
        assert len(history(out / member)) == 3 and history(out / member) == history(reference / member)
        final, expected = checkpoint_arrays(out / member, 3), checkpoint_arrays(reference / member, 3)
        assert final.keys() == expected.keys() and all(np.array_equal(final[k], expected[k]) for k in final)
