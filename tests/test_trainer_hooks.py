"""The open trainer: dict batches reach the loss and metrics hooks, each stage picks, restores and stops by its own
policy, optimizers are kept or rebuilt per group, callbacks see every step, stage and epoch. Tiny Keras models on
numpy data, in-process."""

import math
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfl.data.pipeline import IMAGE, LABEL
from tfl.training import checkpoint
from tfl.training.trainer import (Callback, CrossEntropy, ParamGroup, StagePolicy, TrainConfig, Trainer, accuracy,
                                  history_rows)

N, BATCH = 64, 16
STEPS = N // BATCH
RNG = np.random.RandomState(0)
X = RNG.normal(size=(N, 4)).astype("float32")
Y = (X[:, 0] + X[:, 1] > 0).astype("int32")
X_VAL = RNG.normal(size=(32, 4)).astype("float32")
Y_VAL = (X_VAL[:, 0] + X_VAL[:, 1] > 0).astype("int32")


def batches(x, y, **extra):
    return tf.data.Dataset.from_tensor_slices({IMAGE: x, LABEL: y, **extra}).batch(BATCH)


def val_data(**extra):
    return batches(X_VAL, Y_VAL, **{k: v[: len(X_VAL)] for k, v in extra.items()})


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                             keras.layers.Dense(2, name="logits")])


def make_trainer(model, cfg=None, **kwargs):
    return Trainer(tf.distribute.get_strategy(), model, 2, cfg or TrainConfig(), log=lambda *_: None, **kwargs)


def head(model, lr=0.05):
    return ParamGroup("head", model.get_layer("logits").trainable_weights, lr)


def backbone(model, lr=0.01):
    return ParamGroup("backbone", model.get_layer("hidden").trainable_weights, lr)


def values(model):
    return [np.array(v.numpy()) for v in model.weights]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


class EpochWeights(Callback):
    """The model's weights after every epoch, as the trainer saw them (before a stage-end restore)."""

    def __init__(self, model):
        self.model, self.after = model, {}

    def on_batch_end(self, epoch, step):
        if step == STEPS:
            self.after[epoch] = values(self.model)


# -- dict batches and the loss hook ------------------------------------------------------------------------------
class WeightedLoss:
    """Cross-entropy weighted by the batch's own "w" column; records which columns it was given."""

    def __init__(self):
        self.base, self.columns = CrossEntropy(2), set()

    def __call__(self, batch, logits):
        self.columns |= set(batch)
        return self.base(batch, logits) * tf.cast(batch["w"], tf.float32)


def run_with_weights(w, loss=None):
    model = make_model()
    trainer = make_trainer(model, loss=loss)
    before = values(model)
    trainer.run_stage("train", model, [backbone(model), head(model)], 3, batches(X, Y, w=w), val_data(w=w), STEPS,
                      BATCH)
    return trainer, before, values(model)


def test_an_extra_column_reaches_the_loss_hook_and_zero_weight_changes_nothing():
    loss = WeightedLoss()
    trainer, before, after = run_with_weights(np.zeros(N, "float32"), loss)
    assert loss.columns == {IMAGE, LABEL, "w"}
    assert same(before, after)  # zero loss everywhere: Adam moves nothing
    assert [h.train_loss for h in trainer.history] == [0.0, 0.0, 0.0]
    assert [h.val_loss for h in trainer.history] == [0.0, 0.0, 0.0]
    assert 0.0 < trainer.history[0].train_accuracy < 1.0  # metrics still see the model


def test_unit_weights_give_exactly_the_default_loss():
    weighted, _, weighted_after = run_with_weights(np.ones(N, "float32"), WeightedLoss())
    default, before, default_after = run_with_weights(np.ones(N, "float32"))
    assert [h.train for h in weighted.history] == [h.train for h in default.history]
    assert [h.val for h in weighted.history] == [h.val for h in default.history]
    assert same(weighted_after, default_after)
    assert not same(before, default_after)  # it did train
    assert weighted.history[-1].train_loss < weighted.history[0].train_loss


# -- the metrics hook ---------------------------------------------------------------------------------------------
def label_rate(batch, logits):
    """accuracy plus two metrics whose epoch means are known: the share of label 1, and the mean of column "w"."""
    return {**accuracy(batch, logits), "label_rate": tf.cast(batch[LABEL], tf.float32),
            "w_mean": tf.cast(batch["w"], tf.float32)}


def test_a_metrics_hook_fills_history_and_history_rows():
    w = np.linspace(0, 1, N).astype("float32")
    model = make_model()
    trainer = make_trainer(model, metrics=label_rate)
    trainer.run_stage("train", model, [head(model)], 2, batches(X, Y, w=w), val_data(w=w), STEPS, BATCH)
    for result in trainer.history:
        assert set(result.train) == set(result.val) == {"loss", "accuracy", "label_rate", "w_mean"}
        assert result.train["label_rate"] == pytest.approx(Y.mean(), abs=1e-6)
        assert result.val["label_rate"] == pytest.approx(Y_VAL.mean(), abs=1e-6)
        assert result.train["w_mean"] == pytest.approx(w.mean(), abs=1e-6)
        assert result.val["w_mean"] == pytest.approx(w[: len(X_VAL)].mean(), abs=1e-6)
        assert result.metric("val_w_mean") == result.val["w_mean"]
    rows = history_rows(trainer.history)
    assert list(rows[0]) == ["epoch", "stage", "train_loss", "train_accuracy", "train_label_rate", "train_w_mean",
                             "val_loss", "val_accuracy", "val_label_rate", "val_w_mean", "seconds", "lr_head"]
    assert [r["val_label_rate"] for r in rows] == [round(Y_VAL.mean(), 6)] * 2
    assert [r["train_w_mean"] for r in rows] == [round(trainer.history[0].train["w_mean"], 6)] * 2


def test_selecting_a_metric_the_hooks_do_not_make_names_the_ones_there():
    model = make_model()
    trainer = make_trainer(model, metrics=label_rate, select="val_margin")
    w = np.ones(N, "float32")
    with pytest.raises(ValueError, match="no metric 'val_margin' in the history; it has .*val_label_rate"):
        trainer.run_stage("train", model, [head(model)], 1, batches(X, Y, w=w), val_data(w=w), STEPS, BATCH)


# -- per-stage selection and restore ------------------------------------------------------------------------------
def right_then_wrong(switch):
    """Epoch e trains on the true labels before `switch`, on flipped ones from it on: val loss falls, then rises."""
    return lambda epoch: batches(X, Y if epoch < switch else 1 - Y)


def test_restore_best_goes_back_to_the_stage_best_by_its_own_select():
    model = make_model()
    seen = EpochWeights(model)
    trainer = make_trainer(model, TrainConfig(optimizer="sgd", schedule="constant"), callbacks=[seen])
    groups = [backbone(model, 0.3), head(model, 0.3)]
    # Stage "a": the true labels, then flipped; restores the epoch with the lowest val loss.
    trainer.run_stage("a", model, groups, 5, right_then_wrong(3), val_data(), STEPS, BATCH,
                      policy=StagePolicy(select="val_loss", restore_best=True))
    losses = [h.val_loss for h in trainer.history]
    best = 1 + int(np.argmin(losses))
    assert trainer.stage_best["a"] == {"value": min(losses), "epoch": best}
    assert 1 < best < 5, losses  # not simply the first or the last epoch
    assert same(values(model), seen.after[best])
    assert not same(values(model), seen.after[5])

    # Stage "b" only trains on flipped labels: its best is its own first epoch, though stage a's was lower.
    trainer.run_stage("b", model, groups, 3, right_then_wrong(0), val_data(), STEPS, BATCH,
                      policy=StagePolicy(select="val_loss", restore_best=True))
    b_losses = [h.val_loss for h in trainer.history[5:]]
    assert min(b_losses) > min(losses) and b_losses == sorted(b_losses)
    assert trainer.stage_best["b"] == {"value": b_losses[0], "epoch": 6}
    assert same(values(model), seen.after[6])

    # The run-wide best (val_accuracy, the trainer's select) is still the one restore_best() goes back to.
    accuracies = [h.val_accuracy for h in trainer.history]
    assert trainer.best_epoch == 1 + int(np.argmax(accuracies))
    trainer.restore_best()
    assert same(values(model), seen.after[trainer.best_epoch])


def test_without_restore_best_a_stage_ends_on_its_last_epoch():
    model = make_model()
    seen = EpochWeights(model)
    trainer = make_trainer(model, TrainConfig(optimizer="sgd", schedule="constant"), callbacks=[seen])
    trainer.run_stage("a", model, [backbone(model, 0.3), head(model, 0.3)], 5, right_then_wrong(3), val_data(),
                      STEPS, BATCH, policy=StagePolicy(select="val_loss"))
    assert trainer.stage_best["a"]["epoch"] < 5
    assert same(values(model), seen.after[5])


# -- early stopping -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_run", [False, True])
def test_early_stopping_ends_its_stage_and_only_with_stop_run_the_run(stop_run):
    model = make_model()
    trainer = make_trainer(model, TrainConfig(optimizer="sgd", schedule="constant"))
    trainer.run_stage("a", model, [head(model, 0.3)], 10, right_then_wrong(0), val_data(), STEPS, BATCH,
                      policy=StagePolicy(select="val_loss", early_stopping=2, stop_run=stop_run))
    assert [h.stage for h in trainer.history] == ["a"] * 3  # epoch 1 best, 2 and 3 worse: patience 2 is used up
    assert trainer.stopped_early is stop_run
    trainer.run_stage("b", model, [head(model, 0.3)], 2, right_then_wrong(99), val_data(), STEPS, BATCH)
    assert [h.stage for h in trainer.history] == ["a"] * 3 + ([] if stop_run else ["b"] * 2)
    assert [h.epoch for h in trainer.history] == list(range(1, len(trainer.history) + 1))


def test_the_config_patience_is_every_stages_default_and_a_policy_overrides_it():
    model = make_model()
    trainer = make_trainer(model, TrainConfig(optimizer="sgd", schedule="constant", early_stopping=1))
    trainer.run_stage("a", model, [head(model, 0.3)], 10, right_then_wrong(0), val_data(), STEPS, BATCH,
                      policy=StagePolicy(select="val_loss"))
    trainer.run_stage("b", model, [head(model, 0.3)], 4, right_then_wrong(0), val_data(), STEPS, BATCH,
                      policy=StagePolicy(select="val_loss", early_stopping=3))
    assert [h.stage for h in trainer.history] == ["a"] * 2 + ["b"] * 4  # b's val loss rises: 1 best + 3 worse


# -- keeping optimizers -------------------------------------------------------------------------------------------
def two_stages(keep, trainer=None, model=None):
    model = model or make_model()
    trainer = trainer or make_trainer(model)
    data = batches(X, Y)
    # Stage a's head schedule spans both stages (4 epochs): a kept head optimizer carries on along it.
    trainer.run_stage("a", model, [head(model)], 2, data, val_data(), STEPS, BATCH,
                      policy=StagePolicy(schedule_epochs=4))
    first = trainer._optimizers.get("head")  # None when a resume skipped stage a
    trainer.run_stage("b", model, [backbone(model), head(model)], 2, data, val_data(), STEPS, BATCH,
                      policy=StagePolicy(keep_optimizers=keep))
    return trainer, first


def test_keep_optimizers_reuses_a_group_with_the_same_variables_and_builds_new_groups():
    trainer, first = two_stages(keep=True)
    live, first = trainer._optimizers, first.optimizer
    assert live["head"].optimizer is first
    assert int(first.iterations.numpy()) == 4 * STEPS  # counted on across both stages
    assert int(live["backbone"].optimizer.iterations.numpy()) == 2 * STEPS
    lr = [h.lr for h in trainer.history]
    cosine = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert [r["head"] for r in lr] == pytest.approx(cosine, rel=1e-6)  # one schedule over 4 epochs
    assert [r.get("backbone") for r in lr[2:]] == pytest.approx([0.01, 0.005], rel=1e-6)  # its own, over stage b


def test_without_keep_optimizers_every_group_starts_again():
    trainer, first = two_stages(keep=False)
    live, first = trainer._optimizers, first.optimizer
    assert live["head"].optimizer is not first
    assert int(live["head"].optimizer.iterations.numpy()) == 2 * STEPS
    stage_a = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(2)]  # a's schedule spans 4 epochs
    assert [h.lr["head"] for h in trainer.history] == pytest.approx(stage_a + [0.05, 0.025], rel=1e-6)


def test_a_kept_group_name_with_other_variables_gets_a_new_optimizer():
    trainer, _ = two_stages(keep=True)
    model = trainer.model
    kept = trainer._optimizers["head"].optimizer
    everything = ParamGroup("head", model.trainable_weights, 0.05)
    trainer.run_stage("c", model, [everything], 1, batches(X, Y), val_data(), STEPS, BATCH,
                      policy=StagePolicy(keep_optimizers=True))
    assert trainer._optimizers["head"].optimizer is not kept
    assert int(trainer._optimizers["head"].optimizer.iterations.numpy()) == STEPS


class KeepCheckpoints(Callback):
    """Copies each epoch's checkpoint (saved before on_epoch_end) away from the manager, which keeps two."""

    def __init__(self, folder, keep):
        self.folder, self.keep = folder, keep

    def on_epoch_end(self, result):
        os.makedirs(self.keep, exist_ok=True)
        name = checkpoint.checkpoint_name(result.epoch)
        shutil.copy(os.path.join(self.folder, name), os.path.join(self.keep, name))


@pytest.mark.parametrize("snapshot_epoch", [2, 3])  # after stage a (done), mid stage b
def test_resuming_into_a_keep_optimizers_stage_matches_the_uninterrupted_run(tmp_path, snapshot_epoch):
    model = make_model()
    folder, keep = str(tmp_path / "w"), str(tmp_path / "kept")
    whole = make_trainer(model, checkpoints=checkpoint.CheckpointManager(folder),
                         callbacks=[KeepCheckpoints(folder, keep)])
    whole, _ = two_stages(True, whole, model)
    snapshot = checkpoint.read(os.path.join(keep, checkpoint.checkpoint_name(snapshot_epoch)))
    model = make_model()
    for v in model.weights:
        v.assign(np.full(v.shape, 7.0, v.dtype))
    resumed = make_trainer(model, checkpoints=checkpoint.CheckpointManager(str(tmp_path / "r")))
    resumed.resume(snapshot)
    resumed, _ = two_stages(True, resumed, model)
    assert [(h.stage, h.train, h.val, h.lr) for h in resumed.history] == \
           [(h.stage, h.train, h.val, h.lr) for h in whole.history]
    assert same(values(resumed.model), values(whole.model))
    for name in ("head", "backbone"):
        ours, theirs = resumed._optimizers[name].optimizer, whole._optimizers[name].optimizer
        assert same([v.numpy() for v in ours.variables], [v.numpy() for v in theirs.variables]), name


# -- callbacks ----------------------------------------------------------------------------------------------------
class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_stage_begin(self, stage, info):
        self.events.append(("stage", stage, info))

    def on_train_step(self, stage, step, logs):
        self.events.append(("step", stage, step, logs))

    def on_batch_end(self, epoch, step):
        self.events.append(("batch", epoch, step))

    def on_epoch_end(self, result):
        self.events.append(("epoch", result))

    def on_run_end(self, history):
        self.events.append(("end", history))


class EpochsOnly:
    """A duck-typed callback with only one hook, as TensorBoardCallback is one without subclassing Callback."""

    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, result):
        self.epochs.append(result.epoch)


def test_callbacks_see_stages_global_steps_epochs_and_the_end():
    recorder, duck = Recorder(), EpochsOnly()
    model = make_model()
    trainer = make_trainer(model, callbacks=[recorder, duck])
    data = batches(X, Y)
    trainer.run_stage("a", model, [head(model)], 2, data, val_data(), STEPS, BATCH, trainable=["classifier"])
    trainer.run_stage("b", model, [backbone(model), head(model)], 1, data, val_data(), STEPS, BATCH,
                      trainable=["hidden", "classifier"])
    assert not [e for e in recorder.events if e[0] == "end"]
    trainer.finish()

    kinds = [e[0] for e in recorder.events]
    per_epoch = ["step", "batch"] * STEPS + ["epoch"]
    assert kinds == ["stage"] + per_epoch * 2 + ["stage"] + per_epoch + ["end"]
    stages = [e for e in recorder.events if e[0] == "stage"]
    assert stages[0][1:] == ("a", {"epochs": 2, "steps_per_epoch": STEPS, "groups": {"head": 0.05},
                                   "trainable": ["classifier"], "step": 0, "first_epoch": 1})
    assert stages[1][1:] == ("b", {"epochs": 1, "steps_per_epoch": STEPS, "groups": {"backbone": 0.01, "head": 0.05},
                                   "trainable": ["hidden", "classifier"], "step": 2 * STEPS,
                                   "first_epoch": 1})
    steps = [e for e in recorder.events if e[0] == "step"]
    assert [s[2] for s in steps] == list(range(1, 3 * STEPS + 1))
    assert [s[1] for s in steps] == ["a"] * 2 * STEPS + ["b"] * STEPS
    assert trainer.global_step == 3 * STEPS
    assert set(steps[0][3]) == {"loss", "accuracy", "lr/head"}
    assert set(steps[-1][3]) == {"loss", "accuracy", "lr/head", "lr/backbone"}
    assert steps[0][3]["lr/head"] == pytest.approx(0.05, rel=1e-6)  # the lr the step used
    assert steps[STEPS][3]["lr/head"] == pytest.approx(0.025, rel=1e-6)  # first step of epoch 2: half way down
    for epoch, result in enumerate(trainer.history):  # every batch is full: step means average to the epoch's
        epoch_steps = steps[epoch * STEPS:(epoch + 1) * STEPS]
        assert np.mean([s[3]["loss"] for s in epoch_steps]) == pytest.approx(result.train_loss, rel=1e-5)
        assert np.mean([s[3]["accuracy"] for s in epoch_steps]) == pytest.approx(result.train_accuracy, rel=1e-6)
    assert [e[1:] for e in recorder.events if e[0] == "batch"] == \
           [(epoch, step) for epoch in (1, 2, 3) for step in range(1, STEPS + 1)]
    assert [e[1] for e in recorder.events if e[0] == "epoch"] == trainer.history
    assert recorder.events[-1][1] == trainer.history
    assert duck.epochs == [1, 2, 3]


def test_a_callback_with_only_some_hooks_is_enough():
    duck = EpochsOnly()
    model = make_model()
    trainer = make_trainer(model, callbacks=[duck])
    trainer.run_stage("a", model, [head(model)], 2, batches(X, Y), val_data(), STEPS, BATCH)
    trainer.finish()
    assert duck.epochs == [1, 2]


def test_resuming_where_a_kept_group_name_trains_other_variables_matches_the_uninterrupted_run(tmp_path):
    """Uninterrupted, stage c's "head" (now every variable) gets a new optimizer; a run resumed after stage b must
    not take b's "head" optimizer from the checkpoint for it."""
    def run(trainer, model):
        trainer, _ = two_stages(True, trainer, model)
        trainer.run_stage("c", model, [ParamGroup("head", model.trainable_weights, 0.05)], 2, batches(X, Y),
                          val_data(), STEPS, BATCH, policy=StagePolicy(keep_optimizers=True))
        return trainer

    model = make_model()
    folder, keep = str(tmp_path / "w"), str(tmp_path / "kept")
    whole = run(make_trainer(model, checkpoints=checkpoint.CheckpointManager(folder),
                             callbacks=[KeepCheckpoints(folder, keep)]), model)
    model = make_model()
    resumed = make_trainer(model, checkpoints=checkpoint.CheckpointManager(str(tmp_path / "r")))
    resumed.resume(checkpoint.read(os.path.join(keep, checkpoint.checkpoint_name(4))))  # stage b done
    resumed = run(resumed, model)
    assert [(h.stage, h.train, h.val, h.lr) for h in resumed.history] == \
           [(h.stage, h.train, h.val, h.lr) for h in whole.history]
    assert same(values(resumed.model), values(whole.model))


def policy_run(trainer, model, policy):
    """Stage a on true-then-flipped labels under `policy`, then stage b: what a resume must reproduce."""
    groups = [backbone(model, 0.3), head(model, 0.3)]
    trainer.run_stage("a", model, groups, 5, right_then_wrong(3), val_data(), STEPS, BATCH, policy=policy)
    trainer.run_stage("b", model, groups, 2, right_then_wrong(99), val_data(), STEPS, BATCH)
    return trainer


@pytest.mark.parametrize("policy", [
    StagePolicy(select="val_loss", restore_best=True),
    StagePolicy(select="val_loss", early_stopping=2),
    StagePolicy(select="val_loss", early_stopping=2, stop_run=True),
], ids=["restore_best", "early_stopping", "stop_run"])
def test_a_resume_keeps_the_stage_best_patience_and_stop(tmp_path, policy):
    cfg = TrainConfig(optimizer="sgd", schedule="constant")
    model = make_model()
    folder, keep = str(tmp_path / "w"), str(tmp_path / "kept")
    whole = policy_run(make_trainer(model, cfg, checkpoints=checkpoint.CheckpointManager(folder),
                                    callbacks=[KeepCheckpoints(folder, keep)]), model, policy)
    stages = [h.stage for h in whole.history]
    assert stages.count("b") == (0 if policy.stop_run else 2)
    for epoch in range(1, len(whole.history)):
        model = make_model()
        resumed = make_trainer(model, cfg, checkpoints=checkpoint.CheckpointManager(str(tmp_path / f"r{epoch}")))
        resumed.resume(checkpoint.read(os.path.join(keep, checkpoint.checkpoint_name(epoch))))
        policy_run(resumed, model, policy)
        assert [(h.stage, h.train, h.val) for h in resumed.history] == \
               [(h.stage, h.train, h.val) for h in whole.history], epoch
        assert same(values(resumed.model), values(whole.model)), epoch
        assert (resumed.stage_best, resumed.best_epoch, resumed.stopped_early) == \
               (whole.stage_best, whole.best_epoch, whole.stopped_early), epoch


# -- other model shapes -------------------------------------------------------------------------------------------
def test_a_model_with_dict_outputs_trains_through_its_own_hooks():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, {"logits": keras.layers.Dense(2, name="logits")(hidden),
                                 "score": keras.layers.Dense(1, name="score")(hidden)})
    base = CrossEntropy(2)

    def loss(batch, outputs):  # classification plus a regression of the "w" column
        return base(batch, outputs["logits"]) + tf.square(outputs["score"][:, 0] - batch["w"])

    def metrics(batch, outputs):
        return {**accuracy(batch, outputs["logits"]), "abs_error": tf.abs(outputs["score"][:, 0] - batch["w"])}

    w = X[:, 2].copy()
    trainer = make_trainer(model, loss=loss, metrics=metrics)
    trainer.run_stage("train", model, [ParamGroup("all", model.trainable_weights, 0.05)], 10, batches(X, Y, w=w),
                      val_data(w=X_VAL[:, 2].copy()), STEPS, BATCH)
    first, last = trainer.history[0], trainer.history[-1]
    assert last.val["abs_error"] < 0.7 * first.val["abs_error"]
    assert last.val_accuracy > 0.8 and last.val_loss < first.val_loss


def test_the_models_regularisation_losses_are_trained_too():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="logits", use_bias=False,
                                                                    kernel_regularizer=keras.regularizers.L2(0.5))])
    kernel = model.get_layer("logits").kernel
    before = float(np.sum(np.square(kernel.numpy())))
    trainer = make_trainer(model, TrainConfig(optimizer="sgd", schedule="constant"),
                           loss=lambda batch, logits: tf.zeros_like(logits[:, 0]))  # nothing but the penalty
    trainer.run_stage("train", model, [ParamGroup("head", model.trainable_weights, 0.1)], 1, batches(X, Y), val_data(),
                      STEPS, BATCH)
    assert 0 < float(np.sum(np.square(kernel.numpy()))) < 0.5 * before
