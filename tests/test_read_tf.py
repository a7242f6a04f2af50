"""TF1 Saver, TF2 tf.train.Checkpoint and SavedModel variables, written by TensorFlow itself, read back by name."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfl.checkpoints import CheckpointError, detect_format, read_checkpoint


def _seeded(model: keras.Model) -> keras.Model:
    for i, variable in enumerate(model.weights):
        variable.assign(np.arange(np.prod(variable.shape), dtype=np.float32).reshape(variable.shape) / 3 + i)
    return model


def _functional() -> keras.Model:
    inputs = keras.Input((4,), name="image")
    x = keras.layers.Dense(3, name="hidden1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return _seeded(keras.Model(inputs, keras.layers.Dense(2, name="logits")(x), name="clf"))


def _expected(model: keras.Model) -> dict[str, np.ndarray]:
    return {f"{layer.name}/{w.name}": np.asarray(w) for layer in model.layers for w in layer.weights}


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def tf1_checkpoint(tmp_path_factory):
    """A TF1 graph trained one Adam step: what tf.compat.v1.train.Saver leaves behind."""
    directory = tmp_path_factory.mktemp("tf1")
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = tf.Graph()
    with graph.as_default():
        with tf.compat.v1.variable_scope("hidden1"):
            w = tf.compat.v1.get_variable("weights", initializer=weights)
            b = tf.compat.v1.get_variable("biases", initializer=np.ones(3, np.float32))
        loss = tf.reduce_sum(tf.matmul(tf.ones((1, 2)), w) + b)
        step = tf.compat.v1.train.get_or_create_global_step()
        train = tf.compat.v1.train.AdamOptimizer(0.5).minimize(loss, global_step=step)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(train)
            prefix = tf.compat.v1.train.Saver().save(session, str(directory / "model.ckpt"), global_step=step)
            trained = {"hidden1/weights": session.run(w), "hidden1/biases": session.run(b)}
    return directory, prefix, trained


def test_tf1_names_as_saved_and_optimizer_state_kept_apart(tf1_checkpoint):
    directory, prefix, trained = tf1_checkpoint
    checkpoint = read_checkpoint(prefix)
    assert checkpoint.format == "tf1_checkpoint"
    _assert_same(checkpoint.tensors, trained)
    one_adam_step = np.arange(6).reshape(2, 3) - 0.5
    np.testing.assert_allclose(trained["hidden1/weights"], one_adam_step, atol=1e-5)
    assert sorted(checkpoint.extra) == ["beta1_power", "beta2_power", "global_step", "hidden1/biases/Adam",
                                        "hidden1/biases/Adam_1", "hidden1/weights/Adam", "hidden1/weights/Adam_1"]
    assert int(checkpoint.extra["global_step"]) == 1


def test_tf1_found_by_directory_index_file_or_data_shard(tf1_checkpoint):
    directory, prefix, trained = tf1_checkpoint
    for path in (directory, prefix + ".index", prefix + ".data-00000-of-00001"):
        assert detect_format(path) == "tf1_checkpoint"
        _assert_same(read_checkpoint(path).tensors, trained)


def test_checkpoint_file_pointing_outside_its_directory_is_refused(tf1_checkpoint, tmp_path):
    _, prefix, _ = tf1_checkpoint
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{prefix}"\n')
    with pytest.raises(CheckpointError, match="it points at .*model.ckpt-1, outside the directory"):
        read_checkpoint(tmp_path)


def test_tf2_checkpoint_of_a_keras_model_gets_layer_weight_names(tmp_path):
    """tf.train.Checkpoint(model=...).write: entries are object paths like
    `model/_operations/1/_kernel/.ATTRIBUTES/VARIABLE_VALUE`; the object graph's full_name (`hidden1/kernel`)
    names them."""
    model = _functional()
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    checkpoint = read_checkpoint(prefix)
    assert checkpoint.format == "tf2_checkpoint"
    _assert_same(checkpoint.tensors, _expected(model))
    assert list(checkpoint.extra) == ["_CHECKPOINTABLE_OBJECT_GRAPH"]


def test_tf2_with_an_optimizer_that_tracks_the_model_variables(tmp_path):
    """A built Keras 3 optimizer tracks the model's variables too, and TF files them under the optimizer's path
    (`optimizer/_trainable_variables/0`): they must still come out as the model's weights, slots as extra."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden1"),
                              keras.layers.Dense(2, name="logits")], name="clf")
    _seeded(model)
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer), str(tmp_path), 1)
    manager.save()
    checkpoint = read_checkpoint(tmp_path)  # the directory: its `checkpoint` file names ckpt-1
    assert checkpoint.format == "tf2_checkpoint"
    _assert_same(checkpoint.tensors, _expected(model))  # full names are `clf/hidden1/kernel`: the model part goes
    assert sorted(checkpoint.extra) == sorted(
        ["_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter", "optimizer/_iterations", "optimizer/_learning_rate"]
        + [f"optimizer/_variables/{i}" for i in range(2, 10)])


def test_tf2_variables_without_layer_names_keep_their_object_path(tmp_path):
    module = tf.Module()
    module.a = tf.Variable([1.0, 2.0], name="v")
    module.b = tf.Variable([3.0], name="v")
    module.scale = tf.Variable(5.0, name="model/scale")
    prefix = tf.train.Checkpoint(net=module).write(str(tmp_path / "ckpt"))
    tensors = read_checkpoint(prefix).tensors
    assert sorted(tensors) == ["model/scale", "net/a", "net/b"]
    np.testing.assert_array_equal(tensors["net/b"], [3.0])


@pytest.mark.parametrize("export", ["tf.saved_model.save", "model.export"])
def test_saved_model_variables(tmp_path, export):
    model = _functional()
    directory = str(tmp_path / "saved")
    if export == "model.export":
        model.export(directory, verbose=False)  # tracks every variable twice, as `variables` and `_all_variables`
    else:
        tf.saved_model.save(model, directory)
    assert detect_format(directory) == "saved_model"
    checkpoint = read_checkpoint(directory)
    assert checkpoint.format == "saved_model"
    _assert_same(checkpoint.tensors, _expected(model))


def test_corrupt_index_is_refused(tmp_path):
    prefix = tf.train.Checkpoint(v=tf.Variable([1.0])).write(str(tmp_path / "ckpt"))
    data = prefix + ".data-00000-of-00001"
    os.truncate(data, 2)
    with pytest.raises(CheckpointError, match="cannot read TF checkpoint"):
        read_checkpoint(prefix)
