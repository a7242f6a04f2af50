"""The step on its device (tfl.training.device): determinism, XLA and the read-back interval are choices by device
kind, recorded in config.json, and none of them changes a CPU run's numbers: the step's sums add up on the device
and come back every --readback-every steps, bit-identical to reading every step."""

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import tfl
from tfl import cli
from tfl.data.pipeline import IMAGE, LABEL
from tfl.errors import UsageError
from tfl.options import JobOptions, check_options
from tfl.training import device, stopping
from tfl.training.trainer import Callback, FaultHook, ParamGroup, TrainConfig, Trainer, TrainingDiverged

TINY = dict(backbone="compact_cnn", weights="none", image_size=32, head_epochs=1, epochs=1, batch_size=8,
            val_split=0.25, freeze_up_to="block2", tensorboard=False, seed=5)


@pytest.fixture
def determinism_restored():
    """A test that turns op determinism off gives the next test in this process what it found."""
    before = device.op_determinism()
    yield
    device.set_op_determinism(before)


# -- the choices --------------------------------------------------------------------------------------------------
def test_auto_takes_the_device_kinds_default_and_a_given_value_wins():
    assert device.device_kind(tf.distribute.get_strategy()) == "cpu"  # these tests run without a GPU
    assert [device.resolve_deterministic(None, k) for k in ("cpu", "gpu", "tpu")] == [True, False, False]
    assert device.resolve_deterministic(False, "cpu") is False and device.resolve_deterministic(True, "gpu") is True
    # XLA: off on a CPU; on for a GPU unless determinism is on (as Keras' jit_compile="auto"); --jit forces it
    assert [device.resolve_jit(None, "cpu", False), device.resolve_jit(None, "gpu", False),
            device.resolve_jit(None, "gpu", True), device.resolve_jit(True, "cpu", True)] == [False, True, False, True]
    assert [device.resolve_readback(None, k) for k in ("cpu", "gpu")] == [1, 50]
    assert device.resolve_readback(7, "gpu") == 7


def test_bad_values_are_usage_errors_naming_the_flag():
    with pytest.raises(UsageError, match="--deterministic 'yes'"):
        check_options(JobOptions(deterministic="yes"))
    with pytest.raises(UsageError, match="--deterministic 'yes': give True"):
        device.resolve_deterministic("yes", "cpu")
    with pytest.raises(UsageError, match="--readback-every 0: must be > 0"):
        check_options(JobOptions(readback_every=0))
    with pytest.raises(UsageError, match="--readback-every 2.5: give a whole number of steps"):
        device.resolve_readback(2.5, "cpu")
    result = CliRunner().invoke(cli.cli, ["finetune", "--readback-every", "0"])
    assert result.exit_code == 2 and "Invalid value for '--readback-every'" in result.output


# -- the totals on the device ---------------------------------------------------------------------------------------
def test_totals_add_up_exactly_as_the_host_added_every_step_before():
    """float32 step sums added in float64 on the device: the same bits as Python's float additions, in order; the
    first non-finite loss and its step are kept."""
    values = np.random.RandomState(1).lognormal(size=(40, 2)).astype("float32") * 1e3
    values[25, 0], values[31, 0] = np.inf, np.nan
    totals = device.Totals()
    running = totals.zeros()
    host = {"loss": 0.0, "examples": 0.0}
    for loss, examples in values:
        running, _ = totals.add(running, {"loss": tf.constant(loss), "examples": tf.constant(examples)})
        host = {"loss": host["loss"] + float(loss), "examples": host["examples"] + float(examples)}
    sums, steps, bad_step, bad_loss = totals.read(running)
    assert sums["examples"] == host["examples"] and steps == 40  # exact, not approximate
    assert np.isnan(sums["loss"]) and (bad_step, bad_loss) == (26, np.inf)


X = np.random.RandomState(0).normal(size=(80, 4)).astype("float32")
Y = (X[:, 0] + X[:, 1] > 0).astype("int32")


class StepLogs(Callback):
    def __init__(self):
        self.logs, self.batch_ends = [], []

    def on_train_step(self, stage, step, logs):
        self.logs.append((stage, step, logs))

    def on_batch_end(self, epoch, step):
        self.batch_ends.append((epoch, step))


def train(readback_every, steps=5, data=None, callbacks=(), epochs=2, lines=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    data = data or tf.data.Dataset.from_tensor_slices({IMAGE: X, LABEL: Y}).batch(16)
    log = lines.append if lines is not None else (lambda *_: None)
    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(readback_every=readback_every), log,
                      callbacks=list(callbacks))
    trainer.run_stage("head", model, [ParamGroup("head", model.trainable_weights, 0.05)], epochs, data, data,
                      steps, 16)
    return trainer


def test_the_read_back_interval_changes_no_number_and_no_step_log():
    """Every step read back (the CPU default) against every 2 steps (a partial last read at step 5) and a larger
    interval than the epoch (the epoch end only): the same history and per-step callback logs, to the last bit."""
    logs = {every: StepLogs() for every in (1, 2, 100)}
    histories = {every: [(r.train, r.val, r.lr) for r in train(every, callbacks=[cb]).history]
                 for every, cb in logs.items()}
    assert histories[1] == histories[2] == histories[100] and len(histories[1]) == 2
    assert logs[1].logs == logs[2].logs == logs[100].logs and len(logs[1].logs) == 10
    assert logs[100].batch_ends == [(e, s) for e in (1, 2) for s in range(1, 6)]


def test_a_non_finite_loss_is_reported_at_its_step_whatever_the_interval():
    x = X.copy()
    x[37] = np.nan  # in step 3 (rows 32-47)
    data = tf.data.Dataset.from_tensor_slices({IMAGE: x, LABEL: Y}).batch(16)
    logs = StepLogs()
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at epoch 1 \(stage head, its epoch 1\), step 3"):
        train(4, data=data, callbacks=[logs])
    assert [step for _, step, _ in logs.logs] == [1, 2]  # the callbacks never see the non-finite step


def test_a_sigterm_on_another_worker_stops_every_worker_at_the_next_read_back():
    """A worker of a multi-worker run learns of another's SIGTERM from the summed totals: with reads every 3 steps,
    a SIGTERM after step 1 stops everyone after step 3 (every worker reads at the same steps)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    data = tf.data.Dataset.from_tensor_slices({IMAGE: X, LABEL: Y}).batch(16)
    lines = []
    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(readback_every=3), lines.append,
                      callbacks=[FaultHook((1, 1), "term-at-step")])
    trainer._multi_worker = True  # what a MultiWorkerMirroredStrategy sets: only the all-reduced note stops
    with stopping.sigterm_stops(), pytest.raises(stopping.Terminated):
        trainer.run_stage("head", model, [ParamGroup("head", model.trainable_weights, 0.1)], 1, data, data, 5, 16)
    assert "SIGTERM (on one of the workers): stopped after step 3 of epoch 1; no epoch had finished, so nothing " \
           "was saved" in lines


def test_batches_reach_the_step_unchanged_through_the_device_prefetch():
    strategy = tf.distribute.get_strategy()
    data = tf.data.Dataset.from_tensor_slices({IMAGE: X, LABEL: Y}).batch(16)
    assert device.prefetch_to_gpu(data, strategy) is data  # a CPU: nothing to copy ahead
    trainer = Trainer(strategy, keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), 2, TrainConfig())
    got = [batch[LABEL].numpy() for batch in trainer._distribute(data)]
    np.testing.assert_array_equal(np.concatenate(got), Y)


# -- a run: config.json and the numbers -----------------------------------------------------------------------------
def test_no_determinism_and_a_read_back_interval_leave_a_seeded_run_unchanged(data, tmp_path, determinism_restored):
    runs = {}
    for name, extra in (("default", {}), ("other", {"deterministic": False, "readback_every": 3})):
        tfl.finetune(dataset=data, output_dir=str(tmp_path / name), **TINY, **extra)
        runs[name] = tmp_path / name
        if name == "other":
            assert not device.op_determinism()  # --no-deterministic really turned it off for the run
    configs = {name: json.loads((path / "config.json").read_text()) for name, path in runs.items()}
    assert {k: configs["default"][k] for k in ("deterministic", "jit", "readback_every")} == {
        "deterministic": True, "jit": False, "readback_every": 1}  # auto on a CPU, recorded as chosen
    assert {k: configs["other"][k] for k in ("deterministic", "jit", "readback_every")} == {
        "deterministic": False, "jit": False, "readback_every": 3}

    def rows(path):
        with open(path / "history.csv") as f:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    assert rows(runs["default"]) == rows(runs["other"]) and len(rows(runs["default"])) == 2
