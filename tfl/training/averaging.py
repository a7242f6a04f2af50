"""Weight averaging during training: an exponential moving average of the weights (--ema) and stochastic weight
averaging (--swa-epochs), both validated and kept as the run's model when they beat the trained weights on val.

EMA (timm's ModelEmaV3 with its warm-up, Polyak averaging): after every optimizer step n (1-based, counted across
stages) every weight that can change takes  ema <- d_n ema + (1 - d_n) w  with d_n = min(DECAY, 1 - n^(-2/3))
(timm: 1 - (1 + (n - 1)/gamma)^-power, gamma 1, power 2/3): d_1 = 0, so the average starts as the weights,
early averages follow the weights and later ones slow down to DECAY. The averages are variables of the strategy,
updated inside the train step on every replica (tf.distribute keeps the first replica's value, as all replicas
hold the same weights); BatchNorm's moving statistics are averaged too, as timm does. Every epoch the averaged
weights are validated (history: val_ema_loss, val_ema_accuracy, ...).

SWA (Izmailov et al. 2018, as torch.optim.swa_utils): the weights at the end of each of the last N epochs of the
final stage are averaged uniformly; then the BatchNorm layers that train in that stage get statistics recomputed
on one pass of its train data (the mean of the batches' means and variances); frozen BN layers keep theirs. The
average is validated once, when the final stage ends (history: val_swa_*).

Both are in every checkpoint (the averages, the EMA's update count, the SWA count and result), so a resumed run
continues them exactly. At the end (Job.finish) `choose` keeps whichever of the trained weights (the best epoch),
the EMA and the SWA is best by the run's selection metric, and records all of them in metrics.json.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

WARMUP_GAMMA, WARMUP_POWER = 1.0, 2.0 / 3.0  # timm ModelEmaV3's defaults


def ema_decay(update: int, decay: float, gamma: float = WARMUP_GAMMA, power: float = WARMUP_POWER) -> float:
    """The decay used at update `update` (1-based): timm ModelEmaV3.get_decay with use_warmup."""
    step = max(0, update - 1)
    if step <= 0:
        return 0.0
    return max(min(1.0 - (1.0 + step / gamma) ** -power, decay), 0.0)


def _ema_decay_tensor(update, decay: float):
    step = tf.maximum(tf.cast(update, tf.float32) - 1.0, 0.0)
    warm = 1.0 - tf.pow(1.0 + step / WARMUP_GAMMA, -WARMUP_POWER)
    return tf.where(step > 0, tf.clip_by_value(warm, 0.0, decay), 0.0)


def _floating(variable) -> bool:
    return tf.as_dtype(variable.dtype).is_floating


def training_batch_norms(model: keras.Model, variables) -> list:
    """The BatchNormalization layers of `model` whose scale or offset is among `variables` (what a stage trains):
    the BN layers whose statistics change in that stage."""
    from tfl.freezing import leaf_layers

    ids = {id(v) for v in variables}
    return [layer for layer in leaf_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
            and any(id(w) in ids for w in layer.trainable_weights)]


@dataclasses.dataclass
class EpochContext:
    """What an averager sees at the end of an epoch (Trainer.run_stage)."""

    stage: str
    stage_epoch: int  # 1-based within the stage
    epochs: int  # the stage's epochs
    number: int  # 1-based across stages
    evaluate: Callable[[str], dict]  # label -> the val metrics of the model's current weights
    train_batches: Callable[[], object]  # -> the stage's distributed train batches of this epoch
    train_model: keras.Model
    steps: int  # train batches per epoch
    groups: list  # the stage's ParamGroups
    inputs: Callable  # batch -> what the model is called on (Trainer's inputs hook)


class Averager:
    """What the trainer asks of a weight average (Trainer(averagers=...))."""

    name = ""

    def begin_stage(self, stage: str, train_model: keras.Model, groups: list) -> None:
        """Before the stage's train step is traced."""

    def in_step(self) -> None:
        """Inside the traced train step (replica context), after the optimizers applied their gradients."""

    def after_epoch(self, trainer, ctx: EpochContext) -> dict:
        """After the epoch's validation, before the best epoch is chosen: val metrics of the average to record."""
        return {}

    def end_stage(self, trainer, ctx: EpochContext) -> dict:
        """When the stage is done (its last epoch, or early stopping), before the checkpoint."""
        return {}

    def weights(self) -> list | None:
        """The averaged weights (Trainer model.weights order), None when there is none."""
        return None

    def val(self) -> dict:
        """The average's val metrics (plain names: loss, accuracy, ...), {} when not validated."""
        return {}

    def state(self) -> tuple[dict, dict]:
        return {}, {}

    def load(self, state: dict, arrays: dict) -> None:
        pass


class _Swap:
    """Put `values` into the model's floating weights (by index) and back again."""

    def __init__(self, model: keras.Model, values: dict):
        self.model, self.values = model, values

    def __enter__(self):
        weights = self.model.weights
        self.saved = {i: np.array(weights[i].numpy()) for i in self.values}
        for i, value in self.values.items():
            weights[i].assign(value)
        return self

    def __exit__(self, *exc):
        weights = self.model.weights
        for i, value in self.saved.items():
            weights[i].assign(value)
        return False


class ExponentialAverage(Averager):
    name = "ema"

    def __init__(self, model: keras.Model, decay: float, strategy, log=print):
        self.model, self.decay, self.log = model, float(decay), log
        self.index = [i for i, v in enumerate(model.weights) if _floating(v)]
        only_first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        with strategy.scope():
            self.shadow = {i: tf.Variable(np.asarray(model.weights[i].numpy(), np.float32), trainable=False,
                                          aggregation=only_first, name=f"ema_{i}") for i in self.index}
            self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=only_first, name="ema_updates")
        self._live: list[int] = []
        self._val: dict = {}

    def begin_stage(self, stage, train_model, groups) -> None:
        # Only what the stage can change: its variables and the statistics of its training BN layers.
        changing = [v for g in groups for v in g.variables]
        changing += [w for layer in training_batch_norms(self.model, changing) for w in layer.non_trainable_weights]
        ids = {id(v) for v in changing}
        self._live = [i for i in self.index if id(self.model.weights[i]) in ids]

    def in_step(self) -> None:
        count = self.updates.assign_add(1)
        decay = _ema_decay_tensor(count, self.decay)
        weights = self.model.weights
        for i in self._live:
            shadow = self.shadow[i]
            shadow.assign(decay * shadow + (1.0 - decay) * tf.cast(weights[i].value, tf.float32))

    def _values(self) -> dict:
        return {i: self.shadow[i].numpy() for i in self.index}

    def after_epoch(self, trainer, ctx) -> dict:
        with _Swap(self.model, self._values()):
            self._val = ctx.evaluate("ema val")
        return {f"ema_{k}": v for k, v in self._val.items()}

    def weights(self):
        values = self._values()
        return [values[i] if i in values else np.array(v.numpy()) for i, v in enumerate(self.model.weights)]

    def val(self) -> dict:
        return dict(self._val)

    def state(self):
        arrays = {f"{i:05d}": np.asarray(self.shadow[i].numpy()) for i in self.index}
        return {"updates": int(self.updates.numpy()), "val": self._val}, arrays

    def load(self, state, arrays) -> None:
        for i in self.index:
            self.shadow[i].assign(arrays[f"{i:05d}"])
        self.updates.assign(state["updates"])
        self._val = dict(state["val"])


class StochasticAverage(Averager):
    name = "swa"

    def __init__(self, model: keras.Model, epochs: int, stage: str, strategy, log=print):
        self.model, self.epochs, self.stage, self.strategy, self.log = model, int(epochs), stage, strategy, log
        self.index = [i for i, v in enumerate(model.weights) if _floating(v)]
        self.mean: dict | None = None
        self.count = 0
        self.final: dict | None = None  # the average with recomputed BN statistics, once the stage ended
        self._val: dict = {}
        self.recomputed = 0

    def after_epoch(self, trainer, ctx) -> dict:
        if ctx.stage != self.stage or ctx.stage_epoch <= ctx.epochs - self.epochs:
            return {}
        weights = self.model.weights
        self.count += 1
        current = {i: np.asarray(weights[i].numpy(), np.float64) for i in self.index}
        if self.mean is None:
            self.mean = current
        else:
            for i in self.index:
                self.mean[i] += (current[i] - self.mean[i]) / self.count
        return {}

    def end_stage(self, trainer, ctx) -> dict:
        if ctx.stage != self.stage:
            return {}
        if not self.count:
            self.log(f"swa: stage {ctx.stage} ended after {ctx.stage_epoch} epoch(s), before its last {self.epochs}: "
                     "nothing was averaged")
            return {}
        averaged = {i: m.astype(np.float32) for i, m in self.mean.items()}
        with _Swap(self.model, averaged):
            layers = training_batch_norms(self.model, [v for g in ctx.groups for v in g.variables])
            if layers:
                recompute_batch_norm(self.strategy, ctx.train_model, ctx.inputs, layers, ctx.train_batches(),
                                     ctx.steps)
            self.recomputed = len(layers)
            self.final = {i: np.array(self.model.weights[i].numpy()) for i in self.index}
            self._val = ctx.evaluate("swa val")
        self.log(f"swa: the average of {self.count} epoch(s) of stage {ctx.stage}, BN statistics recomputed for "
                 f"{len(layers)} layer(s): " + ", ".join(f"val_{k} {v:.4f}" for k, v in self._val.items()))
        return {f"swa_{k}": v for k, v in self._val.items()}

    def weights(self):
        if self.final is None:
            return None
        return [self.final[i] if i in self.final else np.array(v.numpy()) for i, v in enumerate(self.model.weights)]

    def val(self) -> dict:
        return dict(self._val)

    def state(self):
        arrays = {f"mean.{i:05d}": m for i, m in (self.mean or {}).items()}
        arrays.update({f"final.{i:05d}": f for i, f in (self.final or {}).items()})
        return {"count": self.count, "val": self._val, "recomputed": self.recomputed}, arrays

    def load(self, state, arrays) -> None:
        self.count, self._val, self.recomputed = state["count"], dict(state["val"]), state["recomputed"]
        self.mean = {i: arrays[f"mean.{i:05d}"] for i in self.index} if self.count else None
        self.final = {i: arrays[f"final.{i:05d}"] for i in self.index} if f"final.{self.index[0]:05d}" in arrays \
            else None


def recompute_batch_norm(strategy, train_model: keras.Model, inputs: Callable, layers: list, batches,
                         steps: int) -> None:
    """torch.optim.swa_utils.update_bn for Keras: each of `layers` gets the mean of the batches' means and
    variances over `steps` batches of `batches` (distributed), the model called in training mode. With momentum 0
    a BN layer's moving statistics are the last batch's after each call; the layers' momentum is restored after."""
    momenta = [layer.momentum for layer in layers]
    stats = [(layer.moving_mean, layer.moving_variance) for layer in layers]
    sums = [[np.zeros(m.shape, np.float64), np.zeros(v.shape, np.float64)] for m, v in stats]
    try:
        for layer in layers:
            layer.momentum = 0.0  # read when the call is traced, below

        @tf.function(autograph=False)
        def forward(batch):
            strategy.run(lambda b: train_model(inputs(b), training=True), args=(batch,))

        seen = 0
        for batch in batches:
            forward(batch)
            for total, (mean, variance) in zip(sums, stats):
                total[0] += mean.numpy()
                total[1] += variance.numpy()
            seen += 1
            if seen >= steps:
                break
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    for (mean, variance), (mean_sum, variance_sum) in zip(stats, sums):
        mean.assign((mean_sum / max(seen, 1)).astype(np.float32))
        variance.assign((variance_sum / max(seen, 1)).astype(np.float32))


def better_than(select: str, value: float, reference: float | None) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if reference is None:
        return True
    return value < reference if select.endswith("loss") else value > reference


def choose(trainer, log=print) -> dict:
    """At the end of a run, after Trainer.restore_best: put the best of the trained weights, the EMA and the SWA
    (by the trainer's selection metric on val) into the model. Returns the record for metrics.json."""
    select = trainer.select
    split, _, key = select.partition("_")
    best = next((r for r in trainer.history if r.epoch == trainer.best_epoch), None)
    trained = {f"val_{k}": round(v, 6) for k, v in (best.val if best else {}).items()
               if not k.startswith(tuple(f"{a.name}_" for a in trainer.averagers))}
    record = {"select": select, "trained": {"epoch": trainer.best_epoch, **trained}}
    best_name, best_value = "trained", trainer.best_value
    for averager in trainer.averagers:
        val = averager.val()
        record[averager.name] = {f"val_{k}": round(v, 6) for k, v in val.items()}
        value = val.get(key) if split == "val" else None
        if averager.weights() is not None and better_than(select, value, best_value):
            best_name, best_value = averager.name, value
    record["saved"] = best_name
    if best_name != "trained":
        averager = next(a for a in trainer.averagers if a.name == best_name)
        for variable, value in zip(trainer.model.weights, averager.weights()):
            variable.assign(value)
        log(f"saving the {best_name.upper()} weights as the model: {select} {best_value:.4f} against "
            f"{trainer.best_value:.4f} of the trained weights (epoch {trainer.best_epoch})")
        trainer.best_value = best_value  # what the saved model scores on val (metrics.json)
    elif trainer.averagers:
        log(f"keeping the trained weights (epoch {trainer.best_epoch}, {select} {best_value:.4f}): "
            + ", ".join(f"{a.name} {a.val().get(key, math.nan):.4f}" for a in trainer.averagers))
    return record


def for_job(opts, model: keras.Model, stages: list, strategy, log=print) -> list:
    """The averagers --ema and --swa-epochs ask for; SWA averages the last of `stages` that trains."""
    from tfl.errors import UsageError

    averagers = []
    if getattr(opts, "ema", None):
        averagers.append(ExponentialAverage(model, opts.ema, strategy, log))
    swa = getattr(opts, "swa_epochs", 0) or 0
    if swa:
        final = next((s for s in reversed(stages) if s.epochs > 0), None)
        if final is None or swa > final.epochs:
            have = f"its final stage {final.name!r} has {final.epochs}" if final else "it trains no epoch"
            raise UsageError(f"--swa-epochs {swa}: {have}; give at most that many (or raise --epochs)")
        averagers.append(StochasticAverage(model, swa, final.name, strategy, log))
    return averagers
