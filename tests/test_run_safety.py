"""What a careless or concurrent user must not break (issue 10): earlier results, a run another process is writing,
non-finite option values and losses, a full or unusable disk, absurd image sizes."""

import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import click
import pytest
import tensorflow as tf
from click.testing import CliRunner

import keras

import tfl.cli as cli
from tfl import cache
from tfl.job import JobOptions, check_finite
from tfl.recipes.finetune import FinetuneOptions
from tfl.training import rundir
from tfl.training.checkpoint import CheckpointManager
from tfl.training.trainer import ParamGroup, TrainConfig, Trainer, TrainingDiverged

from tiny_runs import ROOT, TINY


def quiet(*_):
    pass


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


# -- earlier results are never replaced -----------------------------------------------------------------------------
def test_a_non_empty_directory_without_a_run_to_resume_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text('{"someone": "else"}')
    (out / "history.csv").write_text("epoch,loss\n1,0.5\n")
    result = invoke("finetune", "--dataset", tmp_path / "no-such-data", "--output-dir", out)
    assert result.exit_code == 2, result.output
    assert "is not empty" in result.output and "--overwrite" in result.output and "another --output-dir" in result.output
    assert (out / "config.json").read_text() == '{"someone": "else"}'
    assert (out / "history.csv").read_text() == "epoch,loss\n1,0.5\n"
    assert sorted(os.listdir(out)) == ["config.json", "history.csv"]  # no lock file left behind either


def test_overwrite_deletes_only_the_earlier_runs_files(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.json", "history.csv", "notes.txt"):
        (out / name).write_text("old")
    removed = rundir.check_reusable(str(out), overwrite=True, has_checkpoint=False)
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoints", "config.json", "history.csv", "metrics.json"]
    assert os.listdir(out) == ["notes.txt"]


def test_a_resumable_run_is_not_refused():
    assert rundir.check_reusable(ROOT, overwrite=False, has_checkpoint=True) == []


def test_resume_and_overwrite_together_are_a_usage_error(tmp_path):
    result = invoke("finetune", "--output-dir", tmp_path, "--resume", "--overwrite")
    assert result.exit_code == 2 and "contradict" in result.output


def test_a_failed_run_removes_the_directory_it_created(tmp_path):
    out = tmp_path / "new"
    result = invoke("finetune", "--dataset", tmp_path / "no-such-data", "--output-dir", out)
    assert result.exit_code == 2
    assert not out.exists()


# -- one run per directory ----------------------------------------------------------------------------------------
HOLD = """
import sys, time
from tfl.training.rundir import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_and_told_who_holds_the_directory(tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke("finetune", "--dataset", tmp_path / "no-such-data", "--output-dir", out)
        assert result.exit_code == 1, result.output
        assert "is in use by another tfl run" in result.output and f"pid {holder.pid}" in result.output
    finally:
        holder.kill()
        holder.wait()
    with rundir.RunLock(str(out)):  # the kernel released the dead holder's lock
        pass


def test_the_lock_is_released_and_its_file_removed(tmp_path):
    with rundir.RunLock(str(tmp_path)):
        assert os.path.exists(tmp_path / rundir.LOCK)
        with pytest.raises(rundir.RunDirInUse, match=f"pid {os.getpid()}"):
            with rundir.RunLock(str(tmp_path)):
                pass
    assert not os.path.exists(tmp_path / rundir.LOCK)
    with rundir.RunLock(str(tmp_path)):
        pass


# -- non-finite numbers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("--lr", "nan"), ("--lr", "inf"), ("--label-smoothing", "nan"),
                                          ("--warmup-epochs", "inf"), ("--backbone-lr", "inf")])
def test_non_finite_option_values_are_usage_errors(tmp_path, option, value):
    result = invoke("finetune", option, value, "--output-dir", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert f"{option} {float(value)}: must be a finite number" in result.output
    assert not (tmp_path / "x").exists()


def test_check_finite_covers_recipe_options():
    check_finite(JobOptions())
    with pytest.raises(ValueError, match="--lr-decay-per-stage nan"):
        check_finite(FinetuneOptions(lr_decay_per_stage=math.nan))


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    x = np.random.RandomState(0).normal(size=(64, 2)).astype("float32")
    x[35] = np.nan  # epoch 1 trains on x[:32]; epochs 2+ on x[32:], whose first batch holds this poisoned example
    y = (x[:, 0] > 0).astype("int32")
    good = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(8)
    bad = tf.data.Dataset.from_tensor_slices((x[32:], y[32:])).batch(8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    folder = str(tmp_path / "checkpoints")
    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(optimizer="sgd", schedule="constant"),
                      log=quiet, checkpoints=CheckpointManager(folder))
    with pytest.raises(TrainingDiverged) as err:
        trainer.run_stage("head", model, [ParamGroup("head", model.trainable_weights, 0.1)], 3,
                          lambda epoch: good if epoch == 1 else bad, good, steps_per_epoch=4, global_batch=8)
    message = str(err.value)
    assert "the loss became nan at epoch 2 (stage head, its epoch 2), step 1" in message
    assert f"the checkpoint of epoch 1 in {folder} is kept" in message
    assert len(trainer.history) == 1 and np.isfinite(trainer.best_value)
    assert all(np.isfinite(w).all() for w in trainer.best_weights)
    assert sorted(n for n in os.listdir(folder) if n.startswith("ckpt-")) == ["ckpt-0001.npz"]


def test_json_files_never_hold_nan(tmp_path):
    run = rundir.RunDir(str(tmp_path))
    run.write_json("metrics.json", {"test_loss": math.nan, "deep": [1.0, math.inf], "ok": 0.5})

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    with open(tmp_path / "metrics.json") as f:
        assert json.load(f, parse_constant=refuse) == {"test_loss": None, "deep": [1.0, None], "ok": 0.5}


# -- the disk ---------------------------------------------------------------------------------------------------------
class FileSizeLimit:
    """A real file-size limit (ulimit -f) for this process: writes past it fail with EFBIG, as on a full disk."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.nbytes, self.old[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.handler)


def fill_with(value):
    def fill(data, labels):
        data[...] = value
        labels[...] = 1
        return {"filled": True}
    return fill


def test_a_cache_entry_that_cannot_be_saved_stays_in_memory(tmp_path):
    logs = []
    store = cache.ArrayCache(str(tmp_path), budget=2**30, log=logs.append)
    with FileSizeLimit(100_000):
        entry = store.build({"kind": "features", "n": 1}, 100, (1000,), np.float32, fill_with(3.0))
    assert entry.path is None and entry.in_memory and float(entry.data[5, 7]) == 3.0
    assert any("could not save the features entry" in line and "memory for this run only" in line for line in logs)
    assert os.listdir(tmp_path) == []  # no half-written temporary directory left


def test_an_entry_bigger_than_memory_is_allocated_up_front_and_refused_cleanly(tmp_path):
    store = cache.ArrayCache(str(tmp_path), budget=0, log=quiet)
    with FileSizeLimit(100_000):
        with pytest.raises(cache.NoRoom, match="features"):
            store.build({"kind": "features", "n": 2}, 100, (1000,), np.float32, fill_with(1.0))
    assert os.listdir(tmp_path) == []


def test_an_entry_bigger_than_the_free_disk_is_not_planned(tmp_path):
    store = cache.ArrayCache(str(tmp_path), budget=0, log=quiet)
    free = store.free_disk()
    assert store.can_store(1000) is None
    why = store.can_store(free + 1)
    assert why and f"the cache directory {tmp_path} has only" in why


def test_os_errors_are_one_line_environment_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("finetune", "--output-dir", blocker / "run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot use {blocker / 'run'}" in result.output
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as err:
            os.write(fd, b"x")
    finally:
        os.close(fd)
    assert err.value.errno == errno.ENOSPC
    err.value.filename = "/runs/x/model.keras"
    assert cli.describe_os_error(err.value) == ("cannot use /runs/x/model.keras: No space left on device; free some "
                                                "space or choose another --output-dir / --cache-dir")
    # The advice names the options the running command has: tfl export writes to --output, inspect nowhere.
    from tfl.cli.core import output_places

    for command, places in (("export", ("--output",)), ("finetune", ("--output-dir", "--cache-dir")),
                            ("inspect", ())):
        with click.Context(cli.cli.commands[command]):
            assert output_places() == places
    assert cli.describe_os_error(err.value, ("--output",)).endswith("free some space or choose another --output")
    assert cli.describe_os_error(err.value, ()).endswith("free some space or write somewhere else")


def test_a_run_on_a_disk_that_fills_up_ends_with_one_line(data, tmp_path):
    out = tmp_path / "run"
    limit = "import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY)); " \
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", limit, os.path.join(ROOT, "cli.py"), "finetune", *TINY,
                           "--batch-size", "8", "--dataset", data, "--output-dir", out, "--cache-dir", tmp_path / "cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot use ") and "File too large" in last
    assert json.load(open(out / "config.json"))["backbone"] == "compact_cnn"  # what was written before is intact


# -- image sizes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,words", [(1, "too small for efficientnet_lite0"), (31, "use at least 32"),
                                        (100000, "at most 2048")])
def test_absurd_image_sizes_are_refused_before_anything_is_allocated(tmp_path, size, words):
    result = invoke("finetune", "--image-size", size, "--output-dir", tmp_path / "x", "--cache-dir", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


def test_a_run_json_file_nested_absurdly_deep_is_refused_by_name(tmp_path):
    run = rundir.RunDir(str(tmp_path))
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="config.json is not a readable tfl run file: it nests"):
        run.read_json("config.json")
    result = invoke("evaluate", "--run", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
