"""tfl multitask: label maps and their errors, the shipped Fashion-MNIST map, the loss (weights, left-out classes,
the soft penalty), the two sharing architectures, and a tiny end-to-end run of every arm writing every output."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import tfl.cli as cli
from tfl.data.idx_source import FASHION_MNIST_CLASSES
from tfl.data.pipeline import LABEL
from tfl.recipes import multitask as M
from tfl.training import checkpoint
from tiny_runs import history_rows, image_folder, stop_then_resume

TINY = ["--image-size", "32", "--head-epochs", "2", "--batch-size", "8", "--val-split", "0.25", "--no-tensorboard",
        "--head-hidden", "16"]


def _write(path, value):
    with open(path, "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value))
    return str(path)


# -- label maps ---------------------------------------------------------------------------------------------------
def test_the_shipped_fashion_mnist_map_has_the_ten_classes_and_four_coarse_groups():
    tasks = M.make_tasks(M.read_label_map(M.FASHION_MNIST_TASKS), list(FASHION_MNIST_CLASSES))
    fine, coarse = tasks
    assert fine.name == "fine" and fine.labels == list(FASHION_MNIST_CLASSES)
    np.testing.assert_array_equal(fine.table, np.arange(10))
    assert coarse.labels == ["tops", "bottoms", "footwear", "bags"]
    named = {c: coarse.labels[i] for c, i in zip(FASHION_MNIST_CLASSES, coarse.table)}
    assert named["Trouser"] == "bottoms" and named["Bag"] == "bags"
    assert {named[c] for c in ("Sandal", "Sneaker", "Ankle boot")} == {"footwear"}


def test_a_class_a_task_leaves_out_gets_minus_one(tmp_path):
    path = _write(tmp_path / "t.json", {"shoes": {"a": "x", "b": "y"}})
    (task,) = M.make_tasks(M.read_label_map(path), ["a", "b", "c"])
    assert task.table.tolist() == [0, 1, -1]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected an object"),
    ({"a b": {"x": "y"}}, "letters, digits"),
    ({"t": {"x": [1]}}, "string or integer"),
    ({"t": {}}, "must map class names"),
])
def test_bad_label_maps_are_refused_naming_the_problem(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        M.read_label_map(_write(tmp_path / "t.json", content))


def test_unknown_classes_and_one_label_tasks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'zebra'"):
        M.make_tasks({"t": {"a": 0, "zebra": 1}}, ["a", "b"])
    with pytest.raises(ValueError, match="at least 2"):
        M.make_tasks({"t": {"a": "same", "b": "same"}}, ["a", "b"])


# -- loss and models ----------------------------------------------------------------------------------------------
def _tasks():
    return M.make_tasks({"fine": {"a": "a", "b": "b", "c": "c"}, "ab": {"a": "yes", "b": "no"}}, ["a", "b", "c"])


def test_the_loss_weighs_each_task_and_skips_classes_a_task_leaves_out():
    tasks = _tasks()
    fine = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]], np.float32)
    ab = np.array([[0.3, -0.3], [1.0, 0.0], [5.0, -5.0]], np.float32)
    batch = {LABEL: tf.constant([0, 1, 2])}
    loss = M.MultiTaskLoss(tasks, {"fine": 1.0, "ab": 0.5})(batch, {"fine": tf.constant(fine), "ab": tf.constant(ab)})

    def ce(z, y):
        return -np.log(np.exp(z[y]) / np.exp(z).sum())

    expected = [ce(fine[0], 0) + 0.5 * ce(ab[0], 0), ce(fine[1], 1) + 0.5 * ce(ab[1], 1), ce(fine[2], 2)]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    metrics = M.TaskMetrics(tasks)(batch, {"fine": tf.constant(fine), "ab": tf.constant(ab)})
    assert metrics["fine_accuracy"].numpy().tolist() == [1.0, 1.0, 1.0]
    assert metrics["ab_accuracy"].numpy().tolist() == [1.0, 0.0, 0.0]  # row 2: class c is not in task ab
    assert M.task_accuracy(tasks[1], ab, np.array([0, 1, 2])) == 0.5  # scored over the rows the task maps


def test_hard_sharing_has_one_block_soft_one_per_task_and_the_penalty_is_their_squared_distance():
    tasks = _tasks()
    hard, groups = M.build_block(8, tasks, "hard", (4,), 0.0)
    assert groups == [] and len([layer for layer in hard.layers if "hidden" in layer.name]) == 1
    soft, groups = M.build_block(8, tasks, "soft", (4,), 0.0)
    assert [len(g) for g in groups] == [2]
    assert soft.count_params() - hard.count_params() == 8 * 4 + 4  # one more block
    a, b = groups[0]
    expected = sum(np.sum((va.numpy() - vb.numpy()) ** 2) for va, vb in zip(a.trainable_variables, b.trainable_variables))
    assert float(M.soft_penalty(groups)) == pytest.approx(expected, rel=1e-5)
    batch = {LABEL: tf.constant([0, 1])}
    outputs = soft(tf.zeros((2, 8)))
    plain = M.MultiTaskLoss(tasks, {"fine": 1.0, "ab": 1.0})(batch, outputs).numpy()
    pulled = M.MultiTaskLoss(tasks, {"fine": 1.0, "ab": 1.0}, groups=groups, penalty=0.1)(batch, outputs).numpy()
    np.testing.assert_allclose(pulled - plain, 0.1 * expected, rtol=1e-4)


# -- end to end ------------------------------------------------------------------------------------------------------
def test_a_tiny_run_of_every_arm_writes_every_output(tmp_path):
    data = image_folder(tmp_path / "data", classes=("c0", "c1", "c2"), per_class=12)
    tasks = _write(tmp_path / "tasks.json", {"fine": {"c0": "c0", "c1": "c1", "c2": "c2"},
                                             "odd": {"c0": "no", "c1": "yes", "c2": "no"}})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.cli, ["multitask", "--dataset", data, "--tasks", tasks, "--task-weight", "odd=0.5",
                                          "--soft-penalty", "0.1", *TINY, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["task", "hard", "soft", "single"] and lines[1].startswith("fine")
    written = json.loads(open(out / "multitask.json").read())
    assert [(r["arm"], r["tasks"]) for r in written["runs"]] == [("hard", ["fine", "odd"]), ("soft", ["fine", "odd"]),
                                                                  ("single", ["fine"]), ("single", ["odd"])]
    hard, soft, single_fine, single_odd = written["runs"]
    assert hard["task_weights"] == {"fine": 1.0, "odd": 0.5} and single_odd["task_weights"] == {"odd": 1.0}
    assert soft["trainable_params"] - hard["trainable_params"] == 1280 * 16 + 16  # a second block
    params = {(r["arm"], r["task"]): r["trainable_params"] for r in written["summary"]}
    assert params[("single", "fine")] == single_fine["trainable_params"] + single_odd["trainable_params"]
    for r in written["summary"]:
        assert 0.0 <= r["test_accuracy_mean"] <= 1.0
        assert r["vs_single"] == pytest.approx(r["test_accuracy_mean"] - next(
            s["test_accuracy_mean"] for s in written["summary"] if s["arm"] == "single" and s["task"] == r["task"]))
    with open(out / "multitask.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["task"] for r in rows} == {"fine", "odd"}
    assert os.path.getsize(out / "multitask.png") > 1000
    with open(out / "hard" / "seed0" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2 and {"val_fine_accuracy", "val_odd_accuracy"} <= set(history[0])


def test_user_errors_exit_2_with_one_line(tmp_path):
    data = image_folder(tmp_path / "data", classes=("c0", "c1"), per_class=8)
    tasks = _write(tmp_path / "tasks.json", {"t": {"c0": 0, "c1": 1}})
    runner = CliRunner()
    weight = runner.invoke(cli.cli, ["multitask", "--dataset", data, "--tasks", tasks, "--task-weight", "nope=1", *TINY])
    assert weight.exit_code == 2 and "nope" in weight.output and "Traceback" not in weight.output
    syntax = runner.invoke(cli.cli, ["multitask", "--dataset", data, "--tasks", tasks, "--task-weight", "t", *TINY])
    assert syntax.exit_code == 2 and "TASK=WEIGHT" in syntax.output
    missing = runner.invoke(cli.cli, ["multitask", "--dataset", data, *TINY])
    assert missing.exit_code == 2 and "--tasks is required" in missing.output


# -- resume ----------------------------------------------------------------------------------------------------------
def test_resume_in_the_middle_of_the_soft_sharing_arm_is_exact(tmp_path, monkeypatch):
    """Stopped after the soft arm's first of 3 epochs (a block and a head per task, the penalty pulling the blocks
    together, dropout before them), the rerun restores every task's block and head and their optimizer and ends
    where an uninterrupted run ends."""
    data = image_folder(tmp_path / "data", classes=("c0", "c1", "c2"), per_class=12)
    tasks = _write(tmp_path / "tasks.json", {"fine": {"c0": "c0", "c1": "c1", "c2": "c2"},
                                             "odd": {"c0": "no", "c1": "yes", "c2": "no"}})

    def opts(name):
        return M.MultitaskOptions(dataset=data, tasks=tasks, image_size=32, head_epochs=3, batch_size=8,
                                  val_split=0.25, tensorboard=False, head_hidden=(16,), arms=("soft",),
                                  soft_penalty=0.1, task_weights=(("odd", 0.5),), output_dir=str(tmp_path / name))

    run_dir = os.path.join(tmp_path, "run", "soft", "seed0")
    reference, snapshot, resumed, lines = stop_then_resume(M.multitask, opts, "soft", run_dir, monkeypatch)
    assert snapshot.epoch == 1 and snapshot.state["stage"] == "soft" and not snapshot.state["stage_done"]
    # two blocks and two heads (kernels and biases) and the dropout's seed-generator state
    assert snapshot.state["recipe"]["extra_variables"] == 9
    assert any("resuming after epoch 1" in line for line in lines)
    timing = ("train_seconds", "wall_seconds", "run_dir")
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in reference.items() if k not in timing}
    assert resumed["epochs_run"] == 3
    assert history_rows(run_dir) == history_rows(reference["run_dir"])  # every epoch's per-task accuracies and loss too
    final = [checkpoint.load_latest(os.path.join(d, "checkpoints"), log=lambda *_: None)
             for d in (run_dir, reference["run_dir"])]
    assert final[0].epoch == final[1].epoch == 3
    for name in (k for k in final[1].arrays if k.startswith("recipe.")):  # the blocks and heads after the last epoch
        np.testing.assert_array_equal(final[0].arrays[name], final[1].arrays[name])


def test_a_checkpoint_with_another_count_of_recipe_variables_is_refused_not_misread():
    """A checkpoint from before the dropout's seed state was kept (8 arrays, 9 variables now) names the mismatch."""
    from types import SimpleNamespace

    from tfl.recipes import pooled

    variables = [tf.Variable(np.zeros(2, np.float32)) for _ in range(3)]
    snapshot = checkpoint.Snapshot(4, {"recipe": {"extra_variables": 2}},
                                   {f"recipe.weight{i:05d}": np.ones(2, np.float32) for i in range(2)})
    job = SimpleNamespace(trainer=SimpleNamespace(recipe_state=None), snapshot=snapshot)
    with pytest.raises(checkpoint.ResumeError, match="holds 2 of the recipe's own variables but this run has 3"):
        pooled.keep_in_checkpoints(job, variables)
    assert all(not v.numpy().any() for v in variables)  # nothing was assigned
    snapshot.state["recipe"]["extra_variables"] = 3
    snapshot.arrays["recipe.weight00002"] = np.ones(2, np.float32)
    pooled.keep_in_checkpoints(job, variables)
    assert all(v.numpy().tolist() == [1.0, 1.0] for v in variables)
