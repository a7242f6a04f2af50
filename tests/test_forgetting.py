"""tfl forgetting: the metrics against hand-computed matrices, task splits, the replay buffer, task-IL masking, a
tiny end-to-end run writing every output, and resume inside a task sequence (in-process: a callback stops the run
after a chosen epoch's checkpoint, then the same command continues it)."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import tfl.cli as cli
from tfl.data.pipeline import FEATURES, LABEL
from tfl.recipes import forgetting as fg
from tfl.recipes import forgetting_metrics as M
from tfl.recipes.forgetting import (ClassBalancedBuffer, ForgettingOptions, forgetting, masked_accuracy,
                                    parse_tasks, row_masks, task_masks)
from tfl.training import checkpoint, trainer as trainer_module
from tiny_runs import image_folder

# 6 classes (3 tasks of 2), 12 train / 4 val / 4 test images each at 32 px; Lite0's embedded ImageNet weights.
CLASSES = ("c0", "c1", "c2", "c3", "c4", "c5")
TINY = dict(backbone="efficientnet_lite0", image_size=32, epochs=2, val_split=0.25, batch_size=8, lr=0.01,
            tensorboard=False, memory=6, ewc_lambda=100.0)
EPOCHS = 3 * TINY["epochs"]
# Where no run is compared with the pretrained `every_strategy`: the compact CNN from random weights, whose runs take
# about half of Lite0's time. (On its random features replay remembers nothing of task 1 either, so the test of
# naive against replay keeps Lite0.)
COMPACT = {**TINY, "backbone": "compact_cnn", "weights": "none"}


def _json(path):
    with open(path) as f:
        return json.load(f)


def _latest(run_dir):
    return checkpoint.load_latest(os.path.join(run_dir, "checkpoints"), log=lambda *_: None)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# -- metrics ---------------------------------------------------------------------------------------------------------
# After task 3 the model improved task 2 (0.5 -> 0.7): Chaudhry's forgetting of task 2 is then negative.
R = [[0.9, 0.1, 0.0],
     [0.4, 0.8, 0.2],
     [0.3, 0.5, 0.7]]


def test_acc_is_the_mean_of_the_last_row():
    assert M.acc(R) == pytest.approx((0.3 + 0.5 + 0.7) / 3)


def test_average_incremental_accuracy_averages_the_seen_tasks_after_each_task():
    assert M.average_incremental(R) == pytest.approx((0.9 + (0.4 + 0.8) / 2 + (0.3 + 0.5 + 0.7) / 3) / 3)


def test_bwt_is_lopez_paz_and_ranzato():
    assert M.bwt(R) == pytest.approx(((0.3 - 0.9) + (0.5 - 0.8)) / 2)


def test_forgetting_is_chaudhry_max_over_earlier_rows():
    # task 1: best 0.9 (after task 1) -> 0.3; task 2: best 0.8 -> 0.5
    assert M.per_task_forgetting(R) == pytest.approx([0.6, 0.3])
    assert M.forgetting(R) == pytest.approx(0.45)
    # The best earlier accuracy, not the first one (Avalanche's): task 1 peaks after task 2 here.
    later_peak = [[0.5, 0.0, 0.0], [0.8, 0.9, 0.0], [0.2, 0.9, 0.9]]
    assert M.per_task_forgetting(later_peak) == pytest.approx([0.6, 0.0])
    assert M.bwt(later_peak) == pytest.approx(((0.2 - 0.5) + (0.9 - 0.9)) / 2)
    # Improving an old task at the last step gives negative forgetting (Mammoth's would clip it at 0).
    improved = [[0.6, 0.0], [0.7, 0.9]]
    assert M.per_task_forgetting(improved) == pytest.approx([-0.1])


def test_min_old_accuracy_is_the_worst_entry_below_the_diagonal():
    assert M.min_old_accuracy(R) == pytest.approx(0.3)
    assert M.min_old_accuracy([[0.9, 0.0], [0.85, 0.9]]) == pytest.approx(0.85)


def test_one_task_has_nothing_old_and_bad_matrices_are_refused():
    summary = M.summary([[0.8]])
    assert summary == {"acc": 0.8, "average_incremental_accuracy": 0.8, "bwt": None, "forgetting": None,
                       "per_task_forgetting": [], "min_old_accuracy": None}
    with pytest.raises(ValueError, match="square"):
        M.acc([[0.1, 0.2]])


# -- tasks -----------------------------------------------------------------------------------------------------------
NAMES = [f"n{i}" for i in range(10)]


def test_default_tasks_are_consecutive_pairs():
    assert parse_tasks(None, NAMES) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert parse_tasks(None, NAMES[:5]) == [(0, 1), (2, 3), (4,)]


def test_tasks_by_index_or_name_in_any_order():
    assert parse_tasks("0,1;2,3;4,5", NAMES) == [(0, 1), (2, 3), (4, 5)]
    assert parse_tasks(" 9, n3 ; 1 ", NAMES) == [(9, 3), (1,)]


@pytest.mark.parametrize("text, message", [
    ("0,1;1,2", r"class '1' is in task 1 and task 2"),
    ("0,0", r"class '0' is in task 1 twice"),
    ("0,1;;2", r"task 2 has an empty class"),
    ("0,", r"task 1 has an empty class"),
    ("0,10", r"'10' is not a class of this dataset; use an index 0..9"),
    ("0,shoe", r"'shoe' is not a class"),
    ("3;n3", r"class 3 \(n3\) is named twice"),
])
def test_bad_task_splits_are_refused_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tasks(text, NAMES)


def test_the_cli_refuses_a_bad_split_with_exit_2_before_loading_anything():
    result = CliRunner().invoke(cli.cli, ["forgetting", "--tasks", "0,1;1,2"])
    assert result.exit_code == 2
    assert "--tasks '0,1;1,2': class '1' is in task 1 and task 2" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli.cli, ["forgetting", "--strategies", "naive,replay2"])
    assert result.exit_code == 2 and "--strategies 'replay2': choose from" in result.output


def test_the_cli_refuses_an_unknown_class_of_the_dataset_with_exit_2(data, tmp_path):
    args = ["forgetting", "--dataset", data, "--tasks", "0,1;2,7", "--backbone", "mobilenet", "--weights", "none",
            "--image-size", "32", "--batch-size", "8", "--output-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 2, result.output
    assert "'7' is not a class of this dataset; use an index 0..5" in result.output
    assert not os.path.exists(tmp_path / "out" / "naive" / "config.json")  # refused before the run directory


# -- the replay buffer -------------------------------------------------------------------------------------------------
def test_buffer_is_class_balanced_and_within_memory():
    labels = np.repeat(np.arange(6), 50)
    buffer = ClassBalancedBuffer(memory=20, seed=0)
    buffer.add(np.flatnonzero(labels < 2), labels)
    first = buffer.rows()
    assert len(first) == 20 and np.bincount(labels[first], minlength=6).tolist() == [10, 10, 0, 0, 0, 0]
    buffer.add(np.flatnonzero((labels >= 2) & (labels < 4)), labels)
    second = buffer.rows()
    assert len(second) == 20 and np.bincount(labels[second], minlength=6).tolist() == [5, 5, 5, 5, 0, 0]
    assert set(second[labels[second] < 2]) <= set(first)  # shrinking keeps a prefix: the old rows kept stay
    buffer.add(np.flatnonzero(labels >= 4), labels)
    third = buffer.rows()
    counts = np.bincount(labels[third], minlength=6)
    assert len(third) == 20 and counts.tolist() == [4, 4, 3, 3, 3, 3]  # 20 // 6 = 3, the first 2 classes get one more
    assert len(set(third.tolist())) == 20


def test_buffer_never_holds_more_than_a_class_has_and_round_trips_its_state():
    labels = np.array([0] * 3 + [1] * 40)
    buffer = ClassBalancedBuffer(memory=30, seed=1)
    buffer.add(np.arange(len(labels)), labels)
    assert buffer.quota() == {0: 3, 1: 15}
    state, arrays = buffer.state()
    again = ClassBalancedBuffer(memory=30, seed=1)
    again.load(json.loads(json.dumps(state)), arrays)
    assert np.array_equal(again.rows(), buffer.rows())


# -- masking -----------------------------------------------------------------------------------------------------------
def test_task_il_masks_each_row_to_its_own_task_and_class_il_to_the_seen_classes():
    tasks = [(0, 1), (2, 3)]
    own, seen = task_masks(tasks, 5)  # class 4 is in no task
    task_of = np.array([0, 0, 1, 1, -1])
    labels = np.array([0, 3, 4])
    assert row_masks("task-il", labels, task_of, own, seen[1]).tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0],
                                                                          [0, 0, 0, 0, 0]]
    assert row_masks("class-il", labels, task_of, own, seen[0]).tolist() == [[1, 1, 0, 0, 0]] * 3
    # Class 0 is right within task 1's classes, but class 2 (another task) has the largest logit overall.
    logits = tf.constant([[2.0, 1.0, 5.0, 0.0, 9.0], [0.0, 0.0, 1.0, 3.0, 0.0]])
    batch_labels = np.array([0, 3])
    task_il = {LABEL: batch_labels, "mask": row_masks("task-il", batch_labels, task_of, own, seen[1])}
    class_il = {LABEL: batch_labels, "mask": row_masks("class-il", batch_labels, task_of, own, seen[1])}
    assert masked_accuracy(task_il, logits)["accuracy"].numpy().tolist() == [1.0, 1.0]
    assert masked_accuracy(class_il, logits)["accuracy"].numpy().tolist() == [0.0, 1.0]
    # Masked classes get exactly zero probability, so their logits never matter for the loss either.
    loss = fg.MaskedCrossEntropy()(task_il, logits).numpy()
    assert loss[0] == pytest.approx(-np.log(np.exp(2) / (np.exp(2) + np.exp(1))))


def test_the_ewc_fisher_is_the_mean_squared_per_example_gradient():
    import keras

    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(10, 4)).astype(np.float32), np.array([0, 1, 2, 0, 1, 0, 0, 1, 2, 1])
    mask = np.tile(np.array([1, 1, 0], np.float32), (10, 1))  # class 2 masked out (its rows' labels too)
    labels = np.where(labels == 2, 0, labels)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    batches = [{FEATURES: x[i: i + 4], LABEL: labels[i: i + 4], "mask": mask[i: i + 4]} for i in (0, 4, 8)]
    kernel, bias = fg.diagonal_fisher(model, model.trainable_variables, batches)
    logits = x @ model.weights[0].numpy() + model.weights[1].numpy()
    logits[:, 2] = -np.inf
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = np.eye(3)[labels] - p  # d log p_y / d logits
    assert np.allclose(bias, np.mean(delta ** 2, axis=0), atol=1e-6)
    assert np.allclose(kernel, np.mean(np.einsum("bi,bj->bij", x, delta) ** 2, axis=0), atol=1e-6)
    assert np.all(kernel[:, 2] == 0) and bias[2] == 0  # a masked class has no gradient


# -- end to end ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("forgetting-data"), classes=CLASSES, per_class=16)


@pytest.fixture(scope="module")
def every_strategy(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting")
    lines = []
    result = forgetting(ForgettingOptions(**TINY, dataset=data, output_dir=str(out)), log=lines.append)
    return out, result, lines


def test_every_strategy_writes_its_matrix_metrics_and_figures(every_strategy):
    out, result, lines = every_strategy
    for name in (fg.FORGETTING_JSON, fg.FORGETTING_CSV, fg.MATRIX_CSV, fg.FORGETTING_PNG, fg.CURVES_PNG):
        assert os.path.getsize(out / name) > 0, name
    saved = _json(out / fg.FORGETTING_JSON)
    runs = {run["strategy"]: run for run in saved["strategies"]}
    assert list(runs) == ["naive", "replay", "lwf", "ewc", "joint"]
    for name, run in runs.items():
        assert run["tasks"] == [[0, 1], [2, 3], [4, 5]]
        history = _rows(os.path.join(run["run_dir"], "history.csv"))
        if name == "joint":
            assert len(run["R"]) == 1 and len(run["R"][0]) == 3 and run["metrics"]["bwt"] is None
            assert run["metrics"]["acc"] == pytest.approx(np.mean(run["R"][0]), abs=1e-6)
            assert [r["stage"] for r in history] == ["task1"] * 2
            continue
        assert np.shape(run["R"]) == (3, 3)
        assert run["metrics"] == M.summary(run["R"])
        # class-IL: a task not yet trained has its classes masked out, so nothing of it is ever right.
        assert [run["R"][i][j] for i in range(3) for j in range(i + 1, 3)] == [0.0] * 3
        assert [r["stage"] for r in history] == ["task1", "task1", "task2", "task2", "task3", "task3"]
        assert os.path.exists(os.path.join(run["run_dir"], "model.keras"))
        assert _json(os.path.join(run["run_dir"], "config.json"))["continual_strategy"] == name
    table = _rows(out / fg.FORGETTING_CSV)
    assert [row["strategy"] for row in table] == list(runs)
    assert float(table[0]["acc"]) == pytest.approx(runs["naive"]["metrics"]["acc"])
    assert len(_rows(out / fg.MATRIX_CSV)) == 4 * 9 + 3
    # Naive sequential training on disjoint classes forgets the first task completely here; replay does not.
    assert runs["naive"]["R"][2][0] == 0.0 and runs["replay"]["R"][2][0] > 0.0
    assert any("+ 6 of 6 buffer rows in every batch" in line for line in lines)
    assert "naive" in fg.format_table(result) and "ACC" in fg.format_table(result)


def test_every_strategy_starts_from_the_same_model_and_differs_only_from_task_2(every_strategy):
    _, result, _ = every_strategy
    runs = {run["strategy"]: run for run in result["strategies"]}
    first = {name: _rows(os.path.join(run["run_dir"], "history.csv"))[0] for name, run in runs.items()}
    # Task 1 has no past: naive, replay, lwf and ewc train it identically.
    assert len({(row["train_loss"], row["val_loss"]) for name, row in first.items() if name != "joint"}) == 1
    assert runs["naive"]["R"][0] == runs["replay"]["R"][0] == runs["lwf"]["R"][0] == runs["ewc"]["R"][0]
    # From task 2 on each strategy's loss has its own terms (replayed rows, distillation, the penalty).
    naive = _rows(os.path.join(runs["naive"]["run_dir"], "history.csv"))
    for name in ("replay", "lwf", "ewc"):
        rows = _rows(os.path.join(runs[name]["run_dir"], "history.csv"))
        assert rows[1]["train_loss"] == naive[1]["train_loss"], name
        assert rows[2]["train_loss"] != naive[2]["train_loss"], name
        if name != "replay":  # distillation and penalty only add to the cross-entropy
            assert float(rows[2]["train_loss"]) > float(naive[2]["train_loss"]), name


class Stop(Exception):
    pass


class StopAt(trainer_module.Callback):
    """Ends the run right after the checkpoint of the first epoch in `pending` was written, as a crash there would
    (each stop is used once: the next run goes on to the next one)."""

    def __init__(self, pending: list):
        self.pending = pending

    def on_epoch_end(self, result):
        if self.pending and result.epoch == self.pending[0]:
            self.pending.pop(0)
            raise Stop(result.epoch)


@pytest.mark.parametrize("strategy", ["replay", "lwf", "ewc"])
def test_resume_inside_the_sequence_is_exact(every_strategy, data, tmp_path, monkeypatch, strategy):
    """Stopped at the end of task 1 (a task boundary: R and the strategy's state are still to be made) and in the
    middle of task 2 (the buffer / recorded logits / Fisher come from the checkpoint), the run ends exactly as the
    uninterrupted one: same R, same history, bit-identical weights."""
    from tiny_runs import checkpoint_arrays, history, largest_change

    reference = next(run for run in every_strategy[1]["strategies"] if run["strategy"] == strategy)
    opts = ForgettingOptions(**TINY, dataset=data, output_dir=str(tmp_path), strategies=(strategy,))
    pending, seen, lines = [2, 3], [], []
    monkeypatch.setattr(trainer_module, "default_callbacks", lambda: [StopAt(pending)])
    for _ in range(2):
        with pytest.raises(Stop):
            forgetting(opts, log=lines.append)
        seen.append(_latest(os.path.join(tmp_path, strategy)).state["recipe"])
    assert [s["done"] for s in seen] == [0, 1] and [len(s["R"]) for s in seen] == [0, 1]
    if strategy == "replay":
        assert _latest(os.path.join(tmp_path, strategy)).state["recipe"]["buffer"] == {"classes": [0, 1]}
    result = forgetting(opts, log=lines.append)
    assert sum("resuming after epoch" in line for line in lines) == 2
    run = result["strategies"][0]
    assert run["R"] == reference["R"]
    assert history(run["run_dir"]) == history(reference["run_dir"])
    assert largest_change(checkpoint_arrays(run["run_dir"], EPOCHS), checkpoint_arrays(reference["run_dir"], EPOCHS)) == 0


def test_a_run_killed_inside_task_2_resumes_to_the_uninterrupted_result(every_strategy, data, tmp_path):
    """`tfl forgetting` SIGKILLed mid-epoch in replay's second task (a child process); the same command into the
    same --output-dir continues replay from its last checkpoint (inside task 2: the buffer comes from it), then
    runs ewc: forgetting.json ends as the uninterrupted run's, and so do every history and final checkpoint."""
    from tiny_runs import checkpoint_arrays, history, start

    out = tmp_path / "out"
    args = ["--dataset", data, "--strategies", "replay,ewc", "--backbone", TINY["backbone"], "--image-size", "32",
            "--epochs", "2", "--val-split", "0.25", "--batch-size", "8", "--lr", "0.01", "--memory", "6",
            "--ewc-lambda", "100", "--no-tensorboard", "--output-dir", out]
    killed = start(args, {"TFL_FAULT": "kill-at-step:4:2"}, command="forgetting")  # task 2's second epoch
    assert killed.returncode == -9, killed.why()
    assert (out / "replay" / "checkpoints" / "latest").read_text().strip() == "ckpt-0003.npz"
    assert not (out / "ewc").exists() and not (out / fg.FORGETTING_JSON).exists()

    resumed = CliRunner().invoke(cli.cli, ["forgetting", *map(str, args), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 3" in resumed.output and "Traceback" not in resumed.output
    saved = _json(out / fg.FORGETTING_JSON)
    reference = {run["strategy"]: run for run in every_strategy[1]["strategies"]}
    assert [run["strategy"] for run in saved["strategies"]] == ["replay", "ewc"]
    for run in saved["strategies"]:
        want = reference[run["strategy"]]
        assert (run["tasks"], run["R"], run["metrics"]) == (want["tasks"], want["R"], want["metrics"]), \
            run["strategy"]
        assert history(run["run_dir"]) == history(want["run_dir"])
        final, expected = checkpoint_arrays(run["run_dir"], EPOCHS), checkpoint_arrays(want["run_dir"], EPOCHS)
        assert final.keys() == expected.keys()
        assert all(np.array_equal(final[k], expected[k]) for k in final), run["strategy"]
    expected_rows = {row["strategy"]: row for row in _rows(every_strategy[0] / fg.FORGETTING_CSV)}
    assert [row["acc"] for row in _rows(out / fg.FORGETTING_CSV)] == [expected_rows[s]["acc"] for s in
                                                                      ("replay", "ewc")]


def test_task_il_and_finetuning_above_the_freeze_boundary(data, tmp_path):
    """task-IL with the layers above block2 training (on cached block2 activations): the masks, LwF per old task,
    the Fisher over backbone and head variables."""
    opts = ForgettingOptions(**{**COMPACT, "epochs": 1}, dataset=data, output_dir=str(tmp_path), scenario="task-il",
                             strategies=("lwf", "ewc"), finetune=True, freeze_up_to="block2", backbone_lr=0.001)
    result = forgetting(opts, log=lambda *_: None)
    for run in result["strategies"]:
        assert np.shape(run["R"]) == (3, 3)
        # task-IL: a task not yet trained is still scored within its own pair of classes (not 0 by the mask).
        assert all(0.0 <= v <= 1.0 for row in run["R"] for v in row)
        assert min(run["R"][i][i] for i in range(3)) >= 0.5
    config = _json(os.path.join(result["strategies"][0]["run_dir"], "config.json"))
    assert config["finetune"] is True and config["stages"][0]["trainable_params"] > 256 * 6 + 6  # more than the head
    arrays = _latest(os.path.join(tmp_path, "ewc")).arrays
    assert len([k for k in arrays if k.startswith("recipe.fisher.")]) > 2  # head kernel, bias and backbone weights


def test_training_on_images_when_nothing_is_cached(data, tmp_path):
    opts = ForgettingOptions(**{**COMPACT, "epochs": 1}, dataset=data, output_dir=str(tmp_path), tasks="0,1;2,3",
                             strategies=("replay",), cache="off")
    lines = []
    run = forgetting(opts, log=lines.append)["strategies"][0]
    assert not any(line.startswith("cache: pooled") for line in lines)
    assert np.shape(run["R"]) == (2, 2) and run["R"][0][1] == 0.0 and run["tasks"] == [[0, 1], [2, 3]]


def test_task_il_on_a_frozen_backbone_cannot_forget(data, tmp_path):
    """Masked logits give no gradient to other tasks' output weights, and nothing else trains: every old task keeps
    exactly the accuracy it had when its task ended."""
    opts = ForgettingOptions(**{**COMPACT, "epochs": 1}, dataset=data, output_dir=str(tmp_path), scenario="task-il",
                             strategies=("naive",))
    R = forgetting(opts, log=lambda *_: None)["strategies"][0]["R"]
    assert [R[i][j] for i in range(3) for j in range(i)] == [R[j][j] for i in range(3) for j in range(i)]
    assert M.bwt(R) == 0.0 and M.forgetting(R) == 0.0
