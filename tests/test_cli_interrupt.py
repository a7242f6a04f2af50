"""Ctrl-C during `tfl finetune`: a message saying how to resume (not click's bare "Aborted!"), and the advice works."""

from __future__ import annotations

import os

from tiny_runs import TINY, run_here, start


def test_ctrl_c_says_how_to_resume_and_the_same_command_resumes(data, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", data, *TINY, "--output-dir", out, "--batch-size", "8", "--cache", "off", "--no-tensorboard"]
    env = {"TFL_CACHE_DIR": str(tmp_path / "cache")}
    # A real SIGINT, sent by the run to itself after step 2 of epoch 2 (epoch 1's checkpoint is on disk): the
    # point is fixed, so the outcome does not depend on how fast the machine is.
    child = start(args, {**env, "TFL_FAULT": "interrupt-at-step:2:2"}).wait()
    assert child.returncode == 130, child.why()
    assert "Aborted!" not in child.err and "Traceback" not in child.err
    assert f"interrupted. Run the same command again to resume {out} after its last finished epoch." in child.err

    again = run_here(args, env)  # the same command, in this process
    assert again.returncode == 0, again.why()
    assert "resuming after epoch 1" in again.out + again.err
    assert os.path.isfile(out / "model.keras")


def test_stopped_before_its_first_epoch_was_saved_the_same_command_starts_again(data, tmp_path):
    """SIGTERM in epoch 1 (no checkpoint yet): the run's files are removed, so rerunning the command the message
    gives trains from the start instead of refusing a directory with nothing to resume."""
    out = tmp_path / "run"
    args = ["--dataset", data, *TINY, "--output-dir", out, "--batch-size", "8", "--cache", "off", "--no-tensorboard"]
    env = {"TFL_CACHE_DIR": str(tmp_path / "cache")}
    child = start(args, {**env, "TFL_FAULT": "term-at-step:1:2"}).wait()
    assert child.returncode == 143, child.why()
    assert "no epoch had finished, so nothing was saved" in child.err + child.out
    assert "so the same command starts it again" in child.err + child.out
    assert f"stopped by SIGTERM. Run the same command again to resume {out}" in child.err
    assert not out.exists() or [p.name for p in out.iterdir()] == [".tfl.lock"]

    again = run_here(args, env)  # the same command, in this process
    assert again.returncode == 0, again.why()
    assert "resuming" not in again.out + again.err
    assert os.path.isfile(out / "model.keras")
