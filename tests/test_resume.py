"""Crash safety and resume: a run killed by SIGKILL mid-epoch or mid-save continues to exactly the result of an
uninterrupted run; damaged checkpoints fall back with a warning; a changed configuration is refused."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from tfl.cli import cli
from tfl.training import checkpoint
from tiny_runs import TINY, checkpoint_arrays, history, largest_change, run_here, start

TINY = [*TINY, "--batch-size", "4"]  # 6 steps an epoch; head dropout 0.2, so its RNG state must resume too


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """A run that nobody kills, in this process: the same command gives the same files here as in a child process
    (the killed children below are compared with it)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    cache = tmp_path_factory.mktemp("cache-a")
    return out, run_here(["--dataset", data, *TINY, "--output-dir", out], {"TFL_CACHE_DIR": str(cache)})


def finished(uninterrupted):
    out, child = uninterrupted
    assert child.returncode == 0, child.why()
    return out


def test_killed_mid_epoch_and_mid_save_resumes_to_the_uninterrupted_result(data, uninterrupted, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", {"TFL_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--dataset", data, *TINY, "--output-dir", out]

    killed = start(args, {**cache, "TFL_FAULT": "kill-at-step:2:3"})  # epoch 2 = the first fine-tune epoch
    assert killed.returncode == -9, killed.why()
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-0001.npz"

    killed = start(args, {**cache, "TFL_FAULT": "kill-during-save:3"})  # no --resume: the checkpoint is used
    assert killed.returncode == -9, killed.why()
    assert "resuming after epoch 1 (stage head)" in killed.out
    partial = [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]
    assert len(partial) == 1 and partial[0].endswith("ckpt-0003.npz")
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-0002.npz"

    monkeypatch.setenv("TFL_CACHE_DIR", cache["TFL_CACHE_DIR"])
    resumed = CliRunner().invoke(cli, ["finetune", *map(str, args), "--resume"])  # in-process: same numbers
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 2 (stage finetune)" in resumed.output  # mid-stage: optimizer state restored
    assert "partial file from an interrupted run" in resumed.output
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]

    reference = finished(uninterrupted)
    assert len(history(out)) == 3 and history(out) == history(reference)
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["epochs_run"] == expected["epochs_run"] == 3
    assert metrics["test_loss"] == expected["test_loss"]
    final, final_reference = checkpoint_arrays(out, 3), checkpoint_arrays(reference, 3)
    assert final.keys() == final_reference.keys()
    assert all(np.array_equal(final[k], final_reference[k]) for k in final)  # weights, optimizer and RNG state
    assert largest_change(final_reference, checkpoint_arrays(reference, 2)) > 1e-4  # training moved them
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-0002.npz", "ckpt-0003.npz", "latest"]


def test_sigterm_stops_like_ctrl_c_and_the_same_command_resumes_exactly(data, uninterrupted, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption notice), sent by the run to itself after step 3 of epoch 2: the step ends,
    epoch 1's checkpoint stays, the resume hint is printed, exit 143; the same command then ends where an
    uninterrupted run does."""
    out, cache = tmp_path / "run", {"TFL_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--dataset", data, *TINY, "--output-dir", out]
    stopped = start(args, {**cache, "TFL_FAULT": "term-at-step:2:3"}).wait()
    assert stopped.returncode == 143, stopped.why()
    assert "SIGTERM: stopped after step 3 of epoch 2; the checkpoint of epoch 1 is kept" in stopped.out
    assert stopped.err.strip().splitlines()[-1] == (f"Error: stopped by SIGTERM. Run the same command again to resume "
                                                    f"{out} after its last finished epoch.")
    assert "Traceback" not in stopped.err
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-0001.npz"
    assert not (out / "model.keras").exists()

    monkeypatch.setenv("TFL_CACHE_DIR", cache["TFL_CACHE_DIR"])
    resumed = CliRunner().invoke(cli, ["finetune", *map(str, args)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1 (stage head)" in resumed.output
    reference = finished(uninterrupted)
    assert history(out) == history(reference)
    final, final_reference = checkpoint_arrays(out, 3), checkpoint_arrays(reference, 3)
    assert final.keys() == final_reference.keys()
    assert all(np.array_equal(final[k], final_reference[k]) for k in final)


def test_resuming_with_a_changed_class_set_is_refused(uninterrupted, data_3_classes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished(uninterrupted), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    more_classes = data_3_classes
    monkeypatch.setenv("TFL_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["finetune", "--dataset", more_classes, *TINY, "--output-dir", str(run)])
    assert result.exit_code == 2, result.output
    assert f"cannot resume {run}" in result.output
    assert "num_classes: 2 -> 3" in result.output
    assert 'classes: ["circle", "square"] -> ["circle", "dot", "square"]' in result.output
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched


def test_resume_without_a_checkpoint_is_refused(data, tmp_path):
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, *TINY, "--output-dir", str(tmp_path / "new"),
                                      "--resume"])
    assert result.exit_code == 2, result.output
    assert "has no checkpoint to continue from; drop --resume" in result.output
    assert not (tmp_path / "new").exists()  # refused before any work


def _snapshot(epoch):
    return checkpoint.Snapshot(epoch, {"stage": "head"}, {"model.00000": np.full(3, epoch, np.float32)})


def test_checkpoints_keep_two_and_fall_back_past_damage(tmp_path):
    folder = str(tmp_path / "checkpoints")
    manager = checkpoint.CheckpointManager(folder)
    for epoch in (1, 2, 3):
        manager.save(_snapshot(epoch))
    assert sorted(os.listdir(folder)) == ["ckpt-0002.npz", "ckpt-0003.npz", "latest"]
    warnings = []
    assert checkpoint.load_latest(folder, warnings.append).arrays["model.00000"].tolist() == [3, 3, 3]
    assert warnings == []

    with open(os.path.join(folder, "ckpt-0003.npz"), "r+b") as f:  # the latest, truncated
        f.truncate(300)
    snapshot = checkpoint.load_latest(folder, warnings.append)
    assert snapshot.epoch == 2 and snapshot.arrays["model.00000"].tolist() == [2, 2, 2]
    assert len(warnings) == 1 and "ckpt-0003.npz is unreadable" in warnings[0]
    assert "falling back to ckpt-0002.npz" in warnings[0]

    path = os.path.join(folder, "ckpt-0002.npz")
    data = open(path, "rb").read()
    values = np.full(3, 2, np.float32).tobytes()
    with open(path, "wb") as f:  # one flipped value, the length unchanged: the CRC check catches it
        f.write(data.replace(values, np.full(3, 7, np.float32).tobytes()))
    with pytest.raises(checkpoint.ResumeError, match="no readable checkpoint in .*cannot resume"):
        checkpoint.load_latest(folder, warnings.append)


def test_only_the_checkpoint_named_by_latest_counts(tmp_path):
    folder = str(tmp_path / "checkpoints")
    manager = checkpoint.CheckpointManager(folder)
    manager.save(_snapshot(1))
    manager.save(_snapshot(2))
    with open(os.path.join(folder, "latest"), "w") as f:  # as if killed between the file and the pointer
        f.write("ckpt-0001.npz\n")
    assert checkpoint.load_latest(folder).epoch == 1


def test_trainer_resumed_mid_stage_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    import keras
    import tensorflow as tf

    from tfl.training.trainer import ParamGroup, TrainConfig, Trainer, epoch_seed

    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)

    def train(epoch):
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=epoch_seed(0, epoch)).batch(16)

    def run(folder, snapshot=None):
        keras.utils.set_random_seed(0)  # as a rerun of the same command does; tf.data seeds depend on it
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                                  keras.layers.Dropout(0.3), keras.layers.Dense(2, name="logits")])
        trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(), lambda *_: None,
                          checkpoint.CheckpointManager(str(folder)))
        if snapshot:
            for v in model.weights:  # the snapshot must replace every value
                v.assign(rng.normal(size=v.shape).astype(v.dtype))
            trainer.resume(snapshot)
        hidden, logits = model.get_layer("hidden").trainable_weights, model.get_layer("logits").trainable_weights
        trainer.run_stage("head", model, [ParamGroup("head", logits, 0.05)], 2, train, val, 4, 16)
        trainer.run_stage("finetune", model, [ParamGroup("backbone", hidden, 0.01), ParamGroup("head", logits, 0.05)],
                          3, train, val, 4, 16)
        return trainer

    whole = run(tmp_path / "whole")
    snapshot = checkpoint.read(str(tmp_path / "whole" / "ckpt-0004.npz"))  # fine-tune epoch 2 of 3 done
    resumed = run(tmp_path / "resumed", snapshot)  # a fresh dropout RNG too: its state must come back
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in whole.history]
    assert [h.stage for h in resumed.history] == ["head", "head", "finetune", "finetune", "finetune"]
    assert resumed.best_epoch == whole.best_epoch
    for ours, theirs in zip(resumed.model.variables, whole.model.variables, strict=True):
        assert np.array_equal(ours.numpy(), theirs.numpy()), ours.path
    assert os.listdir(tmp_path / "resumed") and sorted(os.listdir(tmp_path / "resumed"))[0] == "ckpt-0005.npz"
