"""The TF1 reuse scenario: train a dense net the TF1 way, then reuse hidden1-3 in a new Keras net.

The old net is written as the TF1 tutorials did (tf.Graph, name scopes, tf.Variable `weights`/`biases`, a
Session, AdamOptimizer, tf.compat.v1.train.Saver). The new one keeps hidden1-3, replaces hidden4 and the
logits, freezes hidden1-2 and trains the rest with tfl's Trainer.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfl.checkpoints.restore import RestoreError, restore
from tfl.freezing import freeze_layers
from tfl.training.trainer import ParamGroup, TrainConfig, Trainer

FEATURES = 20
OLD_SIZES, OLD_CLASSES = (32, 32, 16, 16, 16), 5
NEW_HIDDEN4, NEW_CLASSES = 8, 3
TF1_NAMES = [(r"(.*)/weights", r"\1/kernel"), (r"(.*)/biases", r"\1/bias")]


def _task(classes, seed, n=256):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(FEATURES, classes)), axis=1).astype("int32")
    return x, y


def train_tf1(path: str, steps: int = 30) -> str:
    """Five hidden layers and logits, trained a few Adam steps and saved with a TF1 Saver; returns the prefix."""
    x_train, y_train = _task(OLD_CLASSES, seed=1)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        images = tf.compat.v1.placeholder(tf.float32, [None, FEATURES], name="images")
        labels = tf.compat.v1.placeholder(tf.int32, [None], name="labels")
        x, width = images, FEATURES
        for i, units in enumerate(OLD_SIZES + (OLD_CLASSES,), start=1):
            last = i == len(OLD_SIZES) + 1
            with tf.name_scope("logits" if last else f"hidden{i}"):
                weights = tf.Variable(tf.random.truncated_normal([width, units], stddev=1.0 / math.sqrt(width)),
                                      name="weights")
                biases = tf.Variable(tf.zeros([units]), name="biases")
                x = tf.matmul(x, weights) + biases
                if not last:
                    x = tf.nn.relu(x)
            width = units
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=x))
        global_step = tf.compat.v1.train.get_or_create_global_step()
        train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=global_step)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for step in range(steps):
                batch = slice(step * 32 % 256, step * 32 % 256 + 32)
                sess.run(train_op, {images: x_train[batch], labels: y_train[batch]})
            return saver.save(sess, path, global_step=global_step)


def new_net() -> keras.Model:
    inputs = keras.Input((FEATURES,), name="features")
    x = inputs
    for i, units in enumerate(OLD_SIZES[:3] + (NEW_HIDDEN4,), start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"hidden{i}")(x)
    return keras.Model(inputs, keras.layers.Dense(NEW_CLASSES, name="logits")(x), name="new_net")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_tf1(str(tmp_path_factory.mktemp("tf1") / "model.ckpt"))


def _values(model, layers):
    return {f"{name}/{w.name}": np.array(w.numpy()) for name in layers for w in model.get_layer(name).weights}


def test_reuse_hidden123_freeze_hidden12_train_the_rest(checkpoint):
    saved = tf.train.load_checkpoint(checkpoint)
    keras.utils.set_random_seed(0)
    model = new_net()
    report = restore(model, checkpoint, include=["hidden[123]"], rename=TF1_NAMES)

    # Restored values are the checkpoint's, bit for bit.
    assert sorted(report.loaded) == sorted((f"hidden{i}/{k}", f"hidden{i}/{w}") for i in (1, 2, 3)
                                          for k, w in (("kernel", "weights"), ("bias", "biases")))
    for i in (1, 2, 3):
        layer = model.get_layer(f"hidden{i}")
        assert np.array_equal(layer.kernel.numpy(), saved.get_tensor(f"hidden{i}/weights"))
        assert np.array_equal(layer.bias.numpy(), saved.get_tensor(f"hidden{i}/biases"))
    # The new layers are reported as not selected; the old net's extra layers and Adam's slots too.
    skipped = dict(report.skipped)
    for name in ("hidden4/kernel", "hidden4/bias", "logits/kernel", "logits/bias"):
        assert skipped[name] == "not selected"
    assert skipped["hidden5/weights (as hidden5/kernel)"] == "not selected; only in source"
    assert {"hidden1/weights/Adam", "hidden1/weights/Adam_1", "beta1_power", "global_step"} <= set(report.ignored)
    assert report.problems() == [] and report.matched_by["hidden1/kernel"] == "hidden[123]"

    # Freeze hidden1-2, train hidden3, hidden4 and the logits on a new 3-class task with tfl's Trainer.
    assert freeze_layers(model, [("freeze", "hidden[12]")]) == ["hidden1", "hidden2"]
    before = _values(model, ["hidden1", "hidden2", "hidden3", "hidden4", "logits"])
    x, y = _task(NEW_CLASSES, seed=2)
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=0).repeat().batch(32)
    val = tf.data.Dataset.from_tensor_slices(_task(NEW_CLASSES, seed=2, n=64)).batch(64)
    trainer = Trainer(tf.distribute.get_strategy(), model, NEW_CLASSES, TrainConfig(schedule="constant"),
                      log=lambda *_: None)
    trainer.run_stage("reuse", model, [ParamGroup("head", model.trainable_weights, 0.01)], 2, train, val,
                      steps_per_epoch=8, global_batch=32)
    after = _values(model, ["hidden1", "hidden2", "hidden3", "hidden4", "logits"])
    for name in before:
        frozen = name.startswith(("hidden1/", "hidden2/"))
        assert np.array_equal(before[name], after[name]) == frozen, name
    assert trainer.history[-1].train_loss < trainer.history[0].train_loss


def test_reusing_a_layer_whose_shape_changed_fails_and_changes_nothing(checkpoint):
    model = new_net()
    before = _values(model, ["hidden1", "hidden4"])
    with pytest.raises(RestoreError) as caught:
        restore(model, checkpoint, include=["hidden[1234]"], rename=TF1_NAMES)
    message = str(caught.value)
    assert ("shape mismatch: hidden4/kernel (model (16, 8), source (16, 16)), "
            "hidden4/bias (model (8,), source (16,)).") in message
    assert "nothing was restored" in message and "\n" not in message
    after = _values(model, ["hidden1", "hidden4"])
    assert all(np.array_equal(before[k], after[k]) for k in before)  # all or nothing


def test_tf1_names_without_rename_are_each_listed(checkpoint):
    with pytest.raises(RestoreError) as caught:
        restore(new_net(), checkpoint, include=["hidden[123]"])
    problems = caught.value.report.problems()
    assert sorted(problems) == sorted([f"missing in source: hidden{i}/{w}" for i in (1, 2, 3) for w in ("kernel", "bias")]
                                      + [f"unexpected in source: hidden{i}/{w}" for i in (1, 2, 3)
                                         for w in ("weights", "biases")])
