"""Ctrl-C during `tfl finetune`: a message saying how to resume (not click's bare "Aborted!"), and the advice works."""

from __future__ import annotations

import os
import signal
import time

from tiny_runs import TIMEOUT, TINY, image_folder, start


def test_ctrl_c_says_how_to_resume_and_the_same_command_resumes(tmp_path):
    data = image_folder(tmp_path / "data")
    out = tmp_path / "run"
    # Enough epochs that the run is still training when the first checkpoint appears (no speed is asserted).
    args = ["--dataset", data, *TINY, "--epochs", "8", "--output-dir", out, "--batch-size", "8",
            "--cache", "off", "--no-tensorboard"]
    env = {"TFL_CACHE_DIR": str(tmp_path / "cache")}
    child = start(args, env)
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / "latest").exists() and child.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.proc.poll() is None, child.wait().why()
    child.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    child.wait()
    assert child.returncode == 130, child.why()
    assert "Aborted!" not in child.err and "Traceback" not in child.err
    assert f"interrupted. Run the same command again to resume {out} after its last finished epoch." in child.err

    again = start(args, env).wait()
    assert again.returncode == 0, again.why()
    assert "resuming after epoch" in again.out + again.err
    assert os.path.isfile(out / "model.keras")
