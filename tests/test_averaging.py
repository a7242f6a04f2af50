"""Weight averaging in training (tfl.training.averaging): --ema against a numpy reference with timm's warm-up, SWA's
average and recomputed BatchNorm statistics against numpy, exact resume with both, and the end-of-run choice."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfl.cli import cli
from tfl.errors import UsageError
from tfl.training import averaging, checkpoint
from tfl.training.trainer import Callback, ParamGroup, TrainConfig, Trainer, epoch_seed
from tiny_runs import TINY

RNG = np.random.RandomState(0)
X = RNG.normal(size=(64, 4)).astype("float32")
Y = (X[:, 0] + X[:, 1] > 0).astype("int32")
VAL = tf.data.Dataset.from_tensor_slices((X, Y)).batch(32)


def train(epoch):
    return tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(64, seed=epoch_seed(0, epoch)).batch(16)


def test_ema_decay_is_timms_warmup():
    assert averaging.ema_decay(1, 0.999) == 0.0  # the first update copies the weights
    assert averaging.ema_decay(2, 0.999) == pytest.approx(1 - 2 ** (-2 / 3))
    assert averaging.ema_decay(11, 0.999) == pytest.approx(1 - 11 ** (-2 / 3))
    assert averaging.ema_decay(10 ** 6, 0.999) == 0.999  # capped at DECAY


class Weights(Callback):
    """The model's weights after every step, and at the end of every epoch."""

    def __init__(self, model):
        self.model, self.steps, self.epochs = model, [], {}

    def on_batch_end(self, epoch, step):
        self.steps.append([np.array(w.numpy(), np.float64) for w in self.model.weights])

    def on_epoch_end(self, result):
        self.epochs[result.epoch] = [np.array(w.numpy(), np.float64) for w in self.model.weights]


def test_ema_matches_a_numpy_reference_and_is_validated_every_epoch():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    strategy = tf.distribute.get_strategy()
    ema = averaging.ExponentialAverage(model, 0.9, strategy)
    expected = [np.array(w.numpy(), np.float64) for w in model.weights]
    seen = Weights(model)
    trainer = Trainer(strategy, model, 2, TrainConfig(), lambda *_: None, callbacks=[seen], averagers=[ema])
    trainer.run_stage("all", model, [ParamGroup("all", model.trainable_weights, 0.05)], 2, train, VAL, 4, 16)
    for n, weights in enumerate(seen.steps, 1):
        d = averaging.ema_decay(n, 0.9)
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    assert int(ema.updates.numpy()) == 8
    for got, want in zip(ema.weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected[0], seen.steps[-1][0])  # the average is not the weights
    for variable, want in zip(model.weights, seen.steps[-1]):  # validating it left the model's weights alone
        np.testing.assert_array_equal(variable.numpy(), want)
    history = trainer.history
    assert all({"ema_loss", "ema_accuracy"} <= set(r.val) for r in history)
    assert history[-1].val["ema_accuracy"] == ema.val()["accuracy"]


def _bn_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, name="hidden"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
                              keras.layers.Dropout(0.3), keras.layers.Dense(2, name="logits")])
    return model


def _run(folder, snapshot=None, seen=None):
    keras.utils.set_random_seed(0)
    model = _bn_model()
    if seen:
        seen.model = model
    strategy = tf.distribute.get_strategy()
    averagers = [averaging.ExponentialAverage(model, 0.9, strategy),
                 averaging.StochasticAverage(model, 2, "finetune", strategy)]
    trainer = Trainer(strategy, model, 2, TrainConfig(), lambda *_: None, checkpoint.CheckpointManager(str(folder)),
                      callbacks=[seen] if seen else None, averagers=averagers)
    if snapshot:
        for v in model.weights:  # the snapshot must replace every value
            v.assign(RNG.normal(size=v.shape).astype(v.dtype))
        trainer.resume(snapshot)
    logits = model.get_layer("logits").trainable_weights
    backbone = model.get_layer("hidden").trainable_weights + model.get_layer("bn").trainable_weights
    trainer.run_stage("head", model, [ParamGroup("head", logits, 0.05)], 1, train, VAL, 4, 16)
    trainer.run_stage("finetune", model, [ParamGroup("backbone", backbone, 0.01), ParamGroup("head", logits, 0.05)],
                      3, train, VAL, 4, 16)
    return trainer


def test_swa_averages_the_last_epochs_and_recomputes_batchnorm_and_a_resumed_run_ends_exactly_alike(tmp_path):
    seen = Weights(None)
    whole = _run(tmp_path / "whole", seen=seen)
    model = whole.model
    ema, swa = whole.averagers
    names = [w.path.split("/", 1)[-1] for w in model.weights]  # without the model's name
    mean = [(a + b) / 2 for a, b in zip(seen.epochs[3], seen.epochs[4])]  # the finetune stage's epochs 2 and 3
    final = swa.weights()
    for name, got, want in zip(names, final, mean):
        if "moving" not in name:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    # BN statistics: the mean over the last epoch's batches of their mean and (biased) variance of the BN input,
    # the averaged `hidden` layer's output.
    kernel, bias = (final[names.index(n)] for n in ("hidden/kernel", "hidden/bias"))
    batches = [x @ kernel + bias for x, _ in train(4).as_numpy_iterator()]
    np.testing.assert_allclose(final[names.index("bn/moving_mean")], np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(final[names.index("bn/moving_variance")], np.mean([b.var(0) for b in batches], 0),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(final[names.index("bn/moving_mean")], mean[names.index("bn/moving_mean")])
    assert set(whole.history[-1].val) >= {"swa_loss", "swa_accuracy", "ema_accuracy"}
    assert "swa_accuracy" not in whole.history[-2].val

    snapshot = checkpoint.read(str(tmp_path / "whole" / "ckpt-0003.npz"))  # finetune epoch 2 of 3 done
    assert snapshot.state["averaging"]["swa"]["count"] == 1 and snapshot.state["averaging"]["ema"]["updates"] == 12
    resumed = _run(tmp_path / "resumed", snapshot)
    assert [(r.train, r.val) for r in resumed.history] == [(r.train, r.val) for r in whole.history]
    for ours, theirs in zip(resumed.model.variables, whole.model.variables, strict=True):
        assert np.array_equal(ours.numpy(), theirs.numpy()), ours.path
    for ours, theirs in zip(resumed.averagers, whole.averagers):
        for a, b in zip(ours.weights(), theirs.weights(), strict=True):
            assert np.array_equal(a, b), ours.name

    lines = []
    record = averaging.choose(whole, lines.append)
    assert record["trained"]["epoch"] == whole.best_epoch and "val_accuracy" in record["trained"]
    assert record["ema"]["val_accuracy"] == round(ema.val()["accuracy"], 6)
    assert record["swa"]["val_loss"] == round(swa.val()["loss"], 6)
    assert record["saved"] in ("trained", "ema", "swa") and lines


def test_choose_keeps_the_average_that_wins_on_val():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    class Fixed(averaging.Averager):
        name = "ema"

        def weights(self):
            return [np.full((2, 1), 7.0, np.float32), np.zeros(1, np.float32)]

        def val(self):
            return {"loss": 0.3, "accuracy": 0.9}

    class Result:
        epoch, val = 1, {"loss": 0.5, "accuracy": 0.8}

    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(), averagers=[Fixed()])
    trainer.history, trainer.best_epoch, trainer.best_value = [Result()], 1, 0.8
    record = averaging.choose(trainer, lambda *_: None)
    assert record == {"select": "val_accuracy", "trained": {"epoch": 1, "val_loss": 0.5, "val_accuracy": 0.8},
                      "ema": {"val_loss": 0.3, "val_accuracy": 0.9}, "saved": "ema"}
    assert np.all(model.weights[0].numpy() == 7.0) and trainer.best_value == 0.9


def test_swa_longer_than_the_final_stage_is_a_usage_error():
    class Stage:
        name, epochs = "finetune", 2

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    class Opts:
        ema, swa_epochs = None, 3

    with pytest.raises(UsageError, match="--swa-epochs 3: its final stage 'finetune' has 2"):
        averaging.for_job(Opts(), model, [Stage()], tf.distribute.get_strategy())


@pytest.mark.parametrize("flag, value, message", [
    ("--ema", "1.5", "--ema 1.5: must be in (0, 1)"),
    ("--swa-epochs", "-1", "--swa-epochs -1: must be >= 0"),
    ("--regularize", "l2:0.1", "the kind must be one of l2sp, bss"),
    ("--regularize", "bss:0", "ETA must be > 0"),
])
def test_bad_values_are_one_line_usage_errors(flag, value, message):
    result = CliRunner().invoke(cli, ["finetune", flag, value])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output


def test_finetune_records_ema_swa_and_regularize(data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, *TINY, "--epochs", "1", "--batch-size", "8", "--output-dir",
                                      str(out), "--ema", "0.9", "--swa-epochs", "1", "--regularize", "l2sp:0.01,0.01"])
    assert result.exit_code == 0, result.output
    config, metrics = (json.loads((out / name).read_text()) for name in ("config.json", "metrics.json"))
    assert (config["ema"], config["swa_epochs"], config["regularize"]) == (0.9, 1, "l2sp:0.01,0.01")
    record = metrics["weight_averaging"]
    assert set(record) == {"select", "trained", "ema", "swa", "saved"}
    assert {"val_accuracy", "val_loss"} <= set(record["ema"]) and {"val_accuracy", "val_loss"} <= set(record["swa"])
    assert metrics["val_accuracy"] == max(record["trained"]["val_accuracy"], record["ema"]["val_accuracy"],
                                          record["swa"]["val_accuracy"])
    header = (out / "history.csv").read_text().splitlines()[0]
    assert "val_ema_accuracy" in header and "val_swa_accuracy" in header
    assert "L2-SP, alpha 0.01" in result.output
