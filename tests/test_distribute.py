"""Distributed training gives the numbers of one device: MirroredStrategy over 2 logical CPUs, and
MultiWorkerMirroredStrategy with two worker processes on loopback, where only the chief writes."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from tfl.cli import cli
from tiny_runs import checkpoint_arrays, free_ports, history, image_folder, largest_change, run_here, start

TOLERANCE = 1e-6  # float sums in another order; training moves the weights by orders of magnitude more
# Random-init MobileNet, stage 2 trains block5 and the head (tiny_runs.TINY's budget). On the compact CNN the
# reordered sums differ by up to 1.7e-6 after these epochs, and a looser tolerance would check less.
MOBILENET = ["--backbone", "mobilenet", "--weights", "none", "--image-size", "32", "--head-epochs", "1", "--epochs",
             "2", "--val-split", "0.25", "--freeze-up-to", "block4", "--lr", "0.01", "--backbone-lr", "0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Children for 2 logical CPUs and 2 workers, all at once; meanwhile the one-device reference and the TPU
    attempt run in this process.

    The reference trains with global batch 4 at lr 0.02; the distributed runs with 2 replicas x batch 2 at lr
    0.01 x 2 (--scale-lr). Dropout is 0 because each replica draws its own dropout masks."""
    tmp = tmp_path_factory.mktemp("distribute")
    data = image_folder(tmp / "shapes", per_class=15)  # 22 train, 8 val, 6 test: the last test batch is partial
    common = ["--dataset", data, *MOBILENET, "--dropout", "0"]
    scaled = ["--batch-size", "2", "--lr", "0.01", "--backbone-lr", "0.01", "--scale-lr"]
    cache = lambda name: {"TFL_CACHE_DIR": str(tmp / f"cache-{name}")}  # noqa: E731
    hosts = ",".join(f"localhost:{p}" for p in free_ports(2))
    os.makedirs(tmp / "worker-tmp")
    children = {
        "mirrored": start([*common, *scaled, "--strategy", "mirrored", "--devices", "2",
                           "--output-dir", tmp / "mirrored"], cache("mirrored")),
        "chief": start([*common, *scaled, "--strategy", "multi_worker", "--worker-hosts", hosts, "--task-index", "0",
                        "--output-dir", tmp / "chief"], cache("chief")),
        "worker": start([*common, *scaled, "--strategy", "multi_worker", "--worker-hosts", hosts, "--task-index", "1",
                         "--output-dir", tmp / "worker"], {**cache("worker"), "TMPDIR": str(tmp / "worker-tmp")}),
    }
    one = run_here([*common, "--batch-size", "4", "--lr", "0.02", "--backbone-lr", "0.02", "--output-dir", tmp / "one"],
                   cache("one"))
    assert one.returncode == 0, one.why()
    # Looking for a TPU needs no devices set up before TensorFlow starts: here too, without a child's start-up.
    tpu = run_here([*common, "--strategy", "tpu", "--output-dir", tmp / "tpu"])
    return tmp, {**{name: child.wait() for name, child in children.items()}, "tpu": tpu}


def assert_same_training(run, reference):
    ours, theirs = checkpoint_arrays(run, 3), checkpoint_arrays(reference, 3)  # weights and optimizer state
    assert ours.keys() == theirs.keys()
    worst = max(float(np.max(np.abs(ours[k].astype(np.float64) - theirs[k]))) for k in ours)
    assert worst < TOLERANCE
    assert largest_change(theirs, checkpoint_arrays(reference, 2)) > 1000 * TOLERANCE
    # Losses and accuracies are sums over every replica of every worker, so they match one device's.
    for row, expected in zip(history(run), history(reference), strict=True):
        assert [row["stage"], row["lr_head"]] == [expected["stage"], expected["lr_head"]]
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert float(row[key]) == pytest.approx(float(expected[key]), abs=2e-6)
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert ours["test_loss"] == pytest.approx(theirs["test_loss"], abs=2e-6)


def test_mirrored_over_two_logical_cpus_matches_one_device(runs):
    tmp, children = runs
    assert children["mirrored"].returncode == 0, children["mirrored"].why()
    assert "2 replica(s)" in children["mirrored"].out
    config = json.loads((tmp / "mirrored" / "config.json").read_text())
    assert config["replicas"] == 2 and config["global_batch_size"] == 4
    assert_same_training(tmp / "mirrored", tmp / "one")


def test_two_workers_train_like_one_device_and_only_the_chief_writes(runs):
    tmp, children = runs
    for name in ("chief", "worker"):
        assert children[name].returncode == 0, children[name].why()
        assert "2 replica(s)" in children[name].out
    assert sorted(os.listdir(tmp / "chief")) == ["checkpoints", "classes.json", "config.json", "curves.png",
                                                  "freeze_plan.json", "history.csv", "metrics.json", "model.keras",
                                                  "tensorboard"]
    assert_same_training(tmp / "chief", tmp / "one")
    # The worker ran the same steps into a scratch directory, removed at the end; its --output-dir never appeared.
    scratch = str(tmp / "worker-tmp" / "tfl-worker1-")
    assert f"run directory: {scratch}" in children["worker"].out
    assert not [n for n in os.listdir(tmp / "worker-tmp") if n.startswith("tfl-")]
    assert not (tmp / "worker").exists()


def test_tpu_strategy_without_a_tpu_fails_with_one_line(runs):
    tmp, children = runs
    tpu = children["tpu"]
    assert tpu.returncode == 1, tpu.why()
    assert "Error: --strategy tpu: no TPU reachable as 'local'" in tpu.out
    assert "Traceback" not in tpu.out
    assert not (tmp / "tpu").exists()


@pytest.mark.parametrize("args,needle", [
    (["--strategy", "default", "--devices", "2"], "--devices 2 needs --strategy mirrored"),
    (["--task-index", "1"], "--task-index goes with --worker-hosts"),
    (["--strategy", "multi_worker"], "--strategy multi_worker needs the cluster"),
    (["--worker-hosts", "localhost:2222,localhost:2223", "--task-index", "2"],
     "--task-index 2: give this worker's position in --worker-hosts, which lists 2 worker(s): 0..1"),
    (["--worker-hosts", "localhost", "--task-index", "0"], "'localhost' is not HOST:PORT"),
    (["--strategy", "mirrored", "--worker-hosts", "localhost:2222", "--task-index", "0"],
     "does not go with --strategy mirrored"),
])
def test_strategy_usage_errors_exit_2_before_any_work(args, needle, monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = CliRunner().invoke(cli, ["finetune", *args, "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert "TF_CONFIG" not in os.environ
    assert not (tmp_path / "run").exists()


FORM = 'expected the form {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}}'


@pytest.mark.parametrize("tf_config,needle", [
    ('{"cluster": {"worker": "localhost:2222"}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG: \"cluster\"'s 'worker' is \"localhost:2222\", not a list of host:port strings; " + FORM),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG: it has no "cluster"; ' + FORM),
    ('{"cluster": {"worker": ["localhost:2222", "localhost:2223"]}, "task": {"type": "worker", "index": "1"}}',
     'TF_CONFIG: "task"\'s "index" is "1", not an integer; ' + FORM),
    ('{"cluster": {"worker": ["localhost:2222", "localhost:2223"]}, "task": {"type": ["worker"], "index": 1}}',
     'TF_CONFIG: "task"\'s "type" is ["worker"], not a string such as "worker"; ' + FORM),
    ('{"cluster": {"worker": ["localhost:2222", "localhost:2223"]}, "task": {"type": "ps", "index": 0}}',
     'TF_CONFIG: "task"\'s "type" \'ps\' is not in "cluster", which has \'worker\'; ' + FORM),
    ('{"cluster": {"worker": ["localhost:2222", "localhost:2223"]}}', 'no "task" saying which of its workers'),
    ('{"cluster": {"worker": [2222, 2223]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG: \"cluster\"'s 'worker' lists 2222, not a host:port string; " + FORM),
    ('["localhost:2222"]', "TF_CONFIG: it is a JSON list, not an object; " + FORM),
    ('{"cluster": {"worker": ["localhost:2222", "localhost:2223"]}, "task": {"type": "worker", "index": 5}}',
     "TF_CONFIG: task index 5 is beyond its worker list, which has 2 worker(s) (indices 0..1)"),
])
def test_a_malformed_tf_config_is_one_line_naming_it_and_the_expected_form(tf_config, needle, monkeypatch,
                                                                           tmp_path):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    result = CliRunner().invoke(cli, ["finetune", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_more_cpu_replicas_than_cores_are_warned_about(tmp_path):
    from tfl.training.strategy import cpu_cores

    replicas = cpu_cores() + 1
    # A missing dataset stops the run right after the strategy is made: the warning is all this child is for.
    child = start(["--dataset", tmp_path / "missing", "--devices", replicas, "--output-dir", tmp_path / "run"]).wait()
    assert child.returncode == 2, child.why()
    assert (f"warning: --devices {replicas} splits the CPU into {replicas} replicas but this process has "
            f"{cpu_cores()} core(s)") in child.out + child.err


UNEVEN_EVALUATION = """
import json, sys
import keras, numpy as np, tensorflow as tf
from tfl.training import strategy as strategies
from tfl.training.trainer import TrainConfig, Trainer

mirrored = strategies.make_strategy("mirrored", 2)  # 2 logical CPUs, before anything initialises TensorFlow


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, strides=2),  # no empty batches
                             keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3)])


images = np.random.default_rng(0).uniform(0, 1, (9, 8, 8, 3)).astype("float32")
labels = np.arange(9, dtype="int32") % 3
data = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(8)  # 4 a replica: 8, then 1
one = build()
with mirrored.scope():
    two = build()
two.set_weights(one.get_weights())
scores = {name: Trainer(strategy, model, 3, TrainConfig(), log=lambda *_: None).evaluate_all(data)
          for name, strategy, model in (("one", tf.distribute.get_strategy(), one), ("two", mirrored, two))}
json.dump(scores, sys.stdout)
"""


def test_a_last_evaluation_batch_smaller_than_the_replicas_counts_each_example_once(tmp_path):
    """9 examples at 4 a replica on 2 replicas: the last global batch has 1 row, so one replica's share is empty
    unless padded; the padding must not be counted. 2 logical CPUs need a fresh process."""
    import subprocess
    import sys

    from tiny_runs import ROOT, TIMEOUT

    child = subprocess.run([sys.executable, "-c", UNEVEN_EVALUATION], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ROOT}, timeout=TIMEOUT)
    assert child.returncode == 0, child.stderr[-3000:]
    scores = json.loads(child.stdout)
    assert scores["two"]["accuracy"] == scores["one"]["accuracy"]
    assert round(scores["one"]["accuracy"] * 9, 6) % 1 == 0  # a count of the 9 examples
    assert scores["two"]["loss"] == pytest.approx(scores["one"]["loss"], abs=1e-6)
