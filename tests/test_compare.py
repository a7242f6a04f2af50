"""tfl compare: every arm trains the same epoch budget its own way; label fractions are seeded, stratified subsets;
compare.json / compare.csv / compare.png say what ran."""

import csv
import hashlib
import json
import os
import statistics

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfl.data import random_subset
from tfl.job import Job, JobOptions
from tfl.recipes import compare as cmp
from tfl.recipes.compare import ARMS, REGISTRY, CompareOptions, compare, format_table
from tfl.training import boundary
from test_finetune_pinned import PINNED

# 24 train (12 per class) / 8 val / 8 test images at 32 px. efficientnet_lite0's embedded weights build offline, so
# "pretrained" and "scratch" really differ. The settings of tests/test_finetune_pinned.py (with seed 3).
TINY = dict(backbone="efficientnet_lite0", weights="default", image_size=32, head_epochs=2, epochs=2, val_split=0.25,
            freeze_up_to="block6", lr=0.003, backbone_lr=0.0003, batch_size=8, tensorboard=False)
E = TINY["head_epochs"] + TINY["epochs"]
# Where pretrained weights don't matter: the random-init compact CNN, about half the time per run.
COMPACT = {**TINY, "backbone": "compact_cnn", "weights": "none", "freeze_up_to": "block2"}


def _quiet(*_):
    pass


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def every_arm(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-arms")
    lines = []
    result = compare(CompareOptions(**TINY, dataset=data, output_dir=str(out), seed=3), log=lines.append)
    return out, result, lines


def test_every_arm_trains_the_same_budget_its_own_way(every_arm):
    out, result, lines = every_arm
    runs = {row["arm"]: row for row in result["runs"]}
    assert list(runs) == list(ARMS)
    history = {arm: _rows(os.path.join(row["run_dir"], "history.csv")) for arm, row in runs.items()}
    config = {arm: _json(os.path.join(row["run_dir"], "config.json")) for arm, row in runs.items()}
    assert {arm: len(rows) for arm, rows in history.items()} == {arm: E for arm in ARMS}
    assert all(runs[arm]["epochs"] == E for arm in ARMS)
    assert {arm: (c["recipe"], c["arm"]) for arm, c in config.items()} == {arm: ("compare", arm) for arm in ARMS}
    assert [r["stage"] for r in history["two_stage"]] == ["head", "head", "finetune", "finetune"]
    assert [r["stage"] for r in history["lp_ft"]] == ["probe", "probe", "finetune", "finetune"]
    # two_stage is tfl finetune's default recipe as is: the pinned run's losses, inside compare.
    for row, (stage, train_loss, val_loss, _, _) in zip(history["two_stage"], PINNED):
        assert (row["stage"], float(row["train_loss"]), float(row["val_loss"])) == (
            stage, pytest.approx(train_loss, rel=1e-4, abs=2e-6), pytest.approx(val_loss, rel=1e-4, abs=2e-6))

    # scratch: random init, everything (batch norm too) at --lr; the others start from the pretrained weights.
    assert config["scratch"]["weights"] == "none" and config["scratch"]["train_bn"] is True
    assert all(config[arm]["weights"] == "default" for arm in ARMS if arm != "scratch")
    assert float(history["scratch"][0]["lr_backbone"]) == pytest.approx(TINY["lr"])

    # linear_probe: only the classifier's variables train, every epoch; the full-training arms train every layer.
    probe_plan = _json(os.path.join(runs["linear_probe"]["run_dir"], "freeze_plan.json"))
    head = [layer for layer in probe_plan["layers"] if not layer["frozen"] and layer["params"]]
    assert head and all(layer["stage"] == "classifier" for layer in head)
    assert runs["linear_probe"]["trainable_params"] == probe_plan["trainable_params"] == sum(l["params"] for l in head)
    assert {r["trainable"] for r in history["linear_probe"]} == {"classifier"}
    everything = probe_plan["trainable_params"] + probe_plan["frozen_params"]
    assert all(runs[arm]["trainable_params"] == everything for arm in ("scratch", "finetune", "lp_ft"))
    assert runs["linear_probe"]["trainable_params"] < runs["two_stage"]["trainable_params"] < everything

    # finetune and lp_ft's second stage: backbone at --backbone-lr, head at --lr; two_stage keeps --freeze-up-to.
    for row in (history["finetune"][0], history["lp_ft"][TINY["head_epochs"]]):
        assert float(row["lr_backbone"]) == pytest.approx(TINY["backbone_lr"])
        assert float(row["lr_head"]) == pytest.approx(TINY["lr"])
        assert row["trainable"].startswith("stem;")
    assert config["two_stage"]["freeze_up_to"] == "block6"
    assert history["two_stage"][-1]["trainable"] == "block7;head;classifier"
    assert [line for line in lines if line.startswith("compare: arm")] == [
        f"compare: arm {i}/5 {arm}, fraction 1, seed 3" for i, arm in enumerate(ARMS, 1)]


def test_compare_files_hold_one_row_per_run_and_a_real_figure(every_arm):
    out, result, _ = every_arm
    saved = _json(out / "compare.json")
    assert saved["runs"] == result["runs"] and saved["summary"] == result["summary"]
    assert saved["settings"]["epoch_budget"] == E and list(saved["settings"]["arms"]) == list(ARMS)
    table = _rows(out / "compare.csv")
    assert tuple(table[0]) == cmp.COLUMNS
    assert [(r["arm"], float(r["label_fraction"]), int(r["seed"])) for r in table] == [(a, 1.0, 3) for a in ARMS]
    assert [float(r["test_accuracy"]) for r in table] == [r["test_accuracy"] for r in result["runs"]]
    assert all(os.path.isfile(os.path.join(r["run_dir"], "model.keras")) for r in table)
    assert [(s["arm"], s["n"], s["test_accuracy_sd"]) for s in result["summary"]] == [(a, 1, None) for a in ARMS]
    _assert_real_png(out / "compare.png")
    text = format_table(result)
    assert len(text.splitlines()) == 1 + len(ARMS) and all(arm in text for arm in ARMS) and "±" in text


def test_fractions_and_seeds_are_summarised_and_a_failing_run_keeps_the_rows_so_far(data, tmp_path, monkeypatch):
    def broken(job):
        raise RuntimeError("broken arm")

    monkeypatch.setitem(REGISTRY, "scratch", cmp.Arm(broken, "fails after setup", {}))  # the second arm breaks
    opts = CompareOptions(**COMPACT, dataset=data, output_dir=str(tmp_path), arms=("linear_probe", "scratch"),
                          label_fractions=(0.5, 1.0), seeds=2, seed=3)
    with pytest.raises(RuntimeError, match="broken arm"):
        compare(opts, log=_quiet)
    saved = _json(tmp_path / "compare.json")
    assert [(r["arm"], r["label_fraction"], r["seed"]) for r in saved["runs"]] == [
        ("linear_probe", 0.5, 3), ("linear_probe", 0.5, 4), ("linear_probe", 1.0, 3), ("linear_probe", 1.0, 4)]
    assert len(_rows(tmp_path / "compare.csv")) == 4
    assert [r["train_examples"] for r in saved["runs"]] == [12, 12, 24, 24]  # 0.5 x 12 per class
    assert [os.path.relpath(r["run_dir"], tmp_path) for r in saved["runs"]][:2] == [
        os.path.join("linear_probe", "frac0.5", "seed3"), os.path.join("linear_probe", "frac0.5", "seed4")]
    for summary in saved["summary"]:
        accuracy = [r["test_accuracy"] for r in saved["runs"] if r["label_fraction"] == summary["label_fraction"]]
        assert summary["n"] == 2
        assert summary["test_accuracy_mean"] == pytest.approx(statistics.mean(accuracy), abs=1e-6)
        assert summary["test_accuracy_sd"] == pytest.approx(statistics.stdev(accuracy), abs=1e-6)


def test_label_fraction_is_a_stratified_seeded_subset():
    labels = np.repeat(np.arange(4), [40, 7, 1, 13])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    counts = np.bincount(labels)
    from tfl.data import stratified_rows

    for fraction in (0.05, 0.1, 0.5, 1.0):
        rows = stratified_rows(labels, fraction, seed=0)
        assert np.array_equal(rows, np.unique(rows))  # sorted, no duplicates
        expected = [max(1, int(fraction * c + 0.5)) for c in counts]  # half up: 6.5 -> 7
        assert np.bincount(labels[rows], minlength=4).tolist() == expected
        assert np.array_equal(rows, stratified_rows(labels, fraction, seed=0))
    assert not np.array_equal(stratified_rows(labels, 0.5, 0), stratified_rows(labels, 0.5, 1))
    assert set(stratified_rows(labels, 0.1, 0)) <= set(stratified_rows(labels, 0.5, 0))  # nested for one seed


def test_job_trains_on_the_label_fraction_and_keys_the_cache_by_its_rows(data):
    def setup(**kw):
        opts = JobOptions(**{**COMPACT, "batch_size": 4}, dataset=data, **kw)
        return Job.setup(opts, _quiet, tf.distribute.get_strategy())

    first, again, other = setup(label_fraction=0.25), setup(label_fraction=0.25), setup(label_fraction=0.25, seed=1)
    labels = np.array([int(label) for _, label in first.train_source])
    assert first.n_train == len(labels) == 6 and np.bincount(labels).tolist() == [3, 3]  # 0.25 x 12 each
    assert np.array_equal(first.train_rows, again.train_rows)
    assert not np.array_equal(first.train_rows, other.train_rows)
    assert np.array_equal(labels, first.splits.train_labels[first.train_rows])
    subset = boundary.for_job(first, []).data_ids["train"]["subset"]
    assert subset == boundary.rows_digest(first.train_rows)
    assert subset != boundary.for_job(other, []).data_ids["train"]["subset"]

    assert setup(label_fraction=1.0).train_rows is None  # every row: the same data (and cache) as no fraction
    limited = setup(limit_train=10)  # --limit-train keys the cache as before: persisted entries stay valid
    kept = np.fromiter(random_subset(tf.data.Dataset.range(24), 24, 10, 0).as_numpy_iterator(), np.int64)
    assert boundary.for_job(limited, []).data_ids["train"]["subset"] == hashlib.sha256(kept.tobytes()).hexdigest()[:16]
    assert boundary.subset_digest(24, 10, 0) == boundary.rows_digest(limited.train_rows)
    both = setup(label_fraction=0.5, limit_train=8)
    assert both.n_train == 8 and set(both.train_rows) <= set(setup(label_fraction=0.5).train_rows)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_0_1_is_refused_naming_it(fraction, data, tmp_path):
    with pytest.raises(ValueError, match=f"--label-fraction {fraction}"):
        compare(CompareOptions(**TINY, dataset=data, output_dir=str(tmp_path), label_fractions=(1.0, fraction)))
    with pytest.raises(ValueError, match=f"--label-fraction {fraction}"):
        Job.setup(JobOptions(**TINY, dataset=data, label_fraction=fraction), _quiet, tf.distribute.get_strategy())
    assert not os.listdir(tmp_path)  # refused before any run started


def test_an_unknown_arm_is_refused_naming_it_and_the_choices(data, tmp_path):
    with pytest.raises(ValueError, match="'bogus'.*scratch, linear_probe, finetune, two_stage, lp_ft"):
        compare(CompareOptions(**TINY, dataset=data, output_dir=str(tmp_path), arms=("scratch", "bogus")))
    assert not os.listdir(tmp_path)


def test_every_registered_arm_describes_itself():
    assert ARMS == ("scratch", "linear_probe", "finetune", "two_stage", "lp_ft") == tuple(REGISTRY)
    assert all(callable(arm.recipe) and arm.description and "\n" not in arm.description for arm in REGISTRY.values())


def test_write_compare_draws_several_fractions_on_a_log_axis(tmp_path):
    from tfl.reporting.figures import write_compare

    summary = [{"arm": arm, "label_fraction": f, "test_accuracy_mean": 0.5 + 0.4 * f * (i + 1) / 3,
                "test_accuracy_sd": None if f == 1.0 else 0.05} for i, arm in enumerate(("a", "b", "c"))
               for f in (0.01, 0.1, 1.0)]
    curves = {arm: [{"epoch": e, "val_accuracy": 0.5 + 0.1 * e} for e in (1, 2, 3)] for arm in ("a", "b", "c")}
    _assert_real_png(write_compare(summary, curves, str(tmp_path / "c.png"), title="t"))


def _assert_real_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20 and image.std() > 5  # drawn on, not blank


def test_a_recipe_other_than_finetune_takes_freeze_up_to_auto(data, tmp_path):
    """--freeze-up-to auto is resolved by tfl advise in the sweep layer, so every recipe takes it, not only finetune:
    the run records the advice and trains at the depth it chose."""
    from click.testing import CliRunner

    from tfl.cli import cli

    out = tmp_path / "auto"
    args = ["compare", "--arms", "two_stage", "--dataset", data, "--backbone", "compact_cnn", "--weights", "none",
            "--image-size", "32", "--val-split", "0.25", "--head-epochs", "1", "--epochs", "1", "--batch-size", "8",
            "--freeze-up-to", "auto", "--proxy-folds", "1", "--no-tensorboard", "--output-dir", out, "--json"]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = out / "two_stage" / "frac1" / "seed0"
    advice = _json(run / "advice.json")
    chosen = advice["resolved"]["freeze_up_to"]
    assert advice["requested"] == "auto" and chosen in advice["proxy"]["depths"]
    assert (advice["proxy"]["head_epochs"], advice["proxy"]["epochs"]) == (1, 1)  # the run's own budget
    assert advice["proxy"]["folds"] == 1  # --proxy-folds reaches the sweep's proxy (auto would cross-validate 8 val)
    config = _json(run / "config.json")
    assert config["freeze_up_to_requested"] == "auto" and config["freeze_up_to"] == chosen
    assert _json(run / "freeze_plan.json")["freeze_up_to"] == chosen
    assert f"--freeze-up-to auto -> {chosen}" in result.output
