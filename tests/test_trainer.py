"""The training loop's bookkeeping: early stopping and restoring the best validation weights."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from tfl.training.trainer import ParamGroup, TrainConfig, Trainer


def test_early_stopping_restores_the_best_epoch():
    # Train labels are the opposite of val labels, so val accuracy falls as training goes on.
    rng = np.random.RandomState(0)
    x = rng.normal(size=(256, 2)).astype("float32")
    val_y = (x[:, 0] > 0).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x, 1 - val_y)).batch(32)
    val = tf.data.Dataset.from_tensor_slices((x, val_y)).batch(64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(optimizer="sgd", schedule="constant",
                                                                            early_stopping=2), log=lambda *_: None)
    trainer.run_stage("head", model, [ParamGroup("head", model.trainable_weights, 0.5)], 10, train, val,
                      steps_per_epoch=8, global_batch=32)
    accuracies = [h.val_accuracy for h in trainer.history]
    assert len(accuracies) == trainer.best_epoch + 2 < 10
    assert not trainer.stopped_early  # by default early stopping ends the stage, not the run
    assert trainer.best_accuracy == max(accuracies)
    trainer.restore_best()
    _, accuracy = trainer.evaluate(val)
    assert accuracy == pytest.approx(trainer.best_accuracy)
    assert accuracy > accuracies[-1]


def test_a_stage_with_nothing_to_train_says_so():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(), log=lambda *_: None)
    data = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), "float32"), np.zeros(4, "int32"))).batch(2)
    with pytest.raises(ValueError, match="stage 'finetune' has nothing to train: every layer is frozen"):
        trainer.run_stage("finetune", model, [ParamGroup("head", [], 0.1)], 1, data, data, 2, 2)


@pytest.mark.parametrize("multi_worker,where", [(False, "after step 2 of epoch 1"),
                                                (True, "after step 3 of epoch 1")])
def test_sigterm_in_a_stage_stops_it_at_a_step_boundary(multi_worker, where):
    """SIGTERM right after step 2 (TFL_FAULT's term-at-step hook, a real signal to this process): one process stops
    before its next step; a worker of a multi-worker run stops after the next step, whose all-reduce carries the
    note to every worker, so all of them stop after that same step."""
    import threading

    from tfl.training import stopping
    from tfl.training.trainer import FaultHook

    assert threading.current_thread() is threading.main_thread()  # (else the signal would end the test process)

    x = np.random.RandomState(0).normal(size=(64, 2)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype("int32"))).batch(8)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    lines = []
    trainer = Trainer(tf.distribute.get_strategy(), model, 2, TrainConfig(), log=lines.append,
                      callbacks=[FaultHook((1, 2), "term-at-step")])
    trainer._multi_worker = multi_worker  # what a MultiWorkerMirroredStrategy sets: only a step's all-reduce stops
    with stopping.sigterm_stops(), pytest.raises(stopping.Terminated):
        trainer.run_stage("head", model, [ParamGroup("head", model.trainable_weights, 0.1)], 2, data, data, 8, 8)
    assert f"SIGTERM{' (on one of the workers)' if multi_worker else ''}: stopped {where}; no epoch had finished, " \
           "so nothing was saved" in lines
    assert trainer.history == []
