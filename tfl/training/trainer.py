"""A custom training loop under a tf.distribute strategy (`strategy.run`), open to recipes.

Keras 3 `Model.fit` does not work under MultiWorkerMirroredStrategy (keras-team/keras#20585), so tfl trains
with its own loop: per-example losses averaged over the global batch, one optimizer per parameter group (each
with its own learning-rate schedule), metrics summed across all replicas of all workers.

What a recipe changes without copying the loop:
- batches are dicts (tfl.data.pipeline: IMAGE or FEATURES, LABEL, plus any column the recipe adds);
- `loss(batch, outputs) -> per-example loss [B]` and `metrics(batch, outputs) -> {name: per-example value}`
  are hooks (default: cross-entropy with label smoothing on LABEL, or on a mixed batch's soft TARGET, and
  accuracy); the model may output a dict;
- each stage (`Stage`) says which metric selects its best weights, whether they are restored when it ends,
  and whether its early stopping also ends the run; a stage may keep the optimizers of groups that still train
  the same variables (gradual unfreezing: a new group joins, the others keep their moments and schedules);
- callbacks see every step, stage and epoch (TensorBoard, the TFL_FAULT test hook).
- averagers (tfl.training.averaging: --ema, --swa-epochs) update inside the train step, are validated after
  every epoch and travel in every checkpoint.

Every decision (best epoch, early stopping) is taken on all-reduced numbers, so all workers take it alike.
With a CheckpointManager the trainer saves after every epoch and `resume` continues from a snapshot exactly:
model and optimizer variables (every live group's), the schedules' positions, best weights, history, the
recipe's position (stage, epoch in stage) and data order (a function of the epoch, see `epoch_seed`).
"""

from __future__ import annotations

from tfl.errors import Unavailable, UsageError
import dataclasses
import functools
import math
import os
import re
import signal
import sys
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tfl.data.pipeline import FEATURES, IMAGE, LABEL, TARGET
from tfl.training import checkpoint, device, stopping
from tfl.training.averaging import EpochContext
from tfl.training.schedules import WarmupSchedule

from tfl.options import OPTIMIZERS, JobOptions


# The evaluation batches' column marking the rows that only pad a final batch for the replicas (weight 0).
PAD_WEIGHT = "_tfl_pad_weight"
# Every step's all-reduced count of replicas whose process got SIGTERM (tfl.training.stopping): > 0, all stop.
STOP = "_tfl_stop"


class WorkerLost(Unavailable):
    """Another worker of a multi-worker run left it (stopped, crashed, unreachable): this one cannot go on alone."""


def _peer_lost(err: Exception) -> str:
    text = str(err)
    reason = text.partition("aborted by: ")[2] or text
    reason = " ".join(line.strip() for line in reason.strip().splitlines()[:2])[:240]
    return (f"another worker of this multi-worker run stopped or became unreachable ({reason}), so this one stops "
            "too. The chief's checkpoints keep the last finished epoch: start every worker again with the same "
            "command to resume")


class TrainingDiverged(Unavailable):
    """The training loss became NaN or infinite; the run stops at once, its checkpoints hold the last good epoch."""


# The options the trainer reads (--optimizer, --weight-decay (0.01 for adamw when not given, else 0), --schedule,
# --warmup-epochs, --step-size, --gamma, --label-smoothing, --early-stopping (every stage's default patience),
# --jit, --readback-every (None: the device kind's default, tfl.training.device)): JobOptions' fields, with their
# defaults, declared there once.
TRAIN_OPTIONS = ("optimizer", "weight_decay", "schedule", "warmup_epochs", "step_size", "gamma", "label_smoothing",
                 "early_stopping", "jit", "readback_every")


def _from_options(cls, opts, **changes) -> "TrainConfig":
    """The trainer's settings from a command's options (TRAIN_OPTIONS), then `changes` (loss_scale)."""
    return cls(**{name: getattr(opts, name) for name in TRAIN_OPTIONS}, **changes)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(JobOptions)
     if f.name in TRAIN_OPTIONS]
    # float16 compute: every optimizer is a LossScaleOptimizer (dynamic loss scaling); not an option of its own
    + [("loss_scale", bool, dataclasses.field(default=False))],
    namespace={"from_options": classmethod(_from_options),
               "__doc__": "The trainer's settings: TRAIN_OPTIONS of JobOptions, and loss_scale.",
               "__module__": __name__})


@dataclasses.dataclass
class ParamGroup:
    name: str  # e.g. "backbone" and "head", or one per canonical stage
    variables: list
    lr: float


@dataclasses.dataclass
class StagePolicy:
    """How one stage picks and keeps weights. `select`: a history metric, val_* or train_*; "*loss" is minimised,
    anything else maximised. The run-wide best (Trainer.restore_best) always uses the trainer's `select`."""

    select: str = "val_accuracy"
    restore_best: bool = False  # at the end of the stage, go back to its best epoch's weights
    early_stopping: int | None = None  # patience in epochs without improving `select`; None: TrainConfig's
    stop_run: bool = False  # early stopping in this stage also skips every later stage
    keep_optimizers: bool = False  # reuse the optimizer (moments, schedule position) of groups that carry on
    schedule_epochs: int | None = None  # epochs the new groups' schedules span (default: this stage's)
    warmup: bool = True
    # A learning-rate range test (tfl.recipes.lr_find): every group's rate is multiplied by this factor after each
    # step, from its ParamGroup.lr, instead of --schedule and warmup.
    lr_growth: float | None = None


@dataclasses.dataclass
class EpochResult:
    stage: str
    epoch: int
    train: dict  # metric -> value over the epoch's training batches ("loss", "accuracy", ...)
    val: dict
    lr: dict  # group -> learning rate at the epoch's first step
    seconds: float
    trainable: list = dataclasses.field(default_factory=list)  # canonical stages trained, when the recipe says

    @property
    def train_loss(self) -> float:
        return self.train.get("loss", math.nan)

    @property
    def train_accuracy(self) -> float:
        return self.train.get("accuracy", math.nan)

    @property
    def val_loss(self) -> float:
        return self.val.get("loss", math.nan)

    @property
    def val_accuracy(self) -> float:
        return self.val.get("accuracy", math.nan)

    def metric(self, name: str) -> float:
        split, _, key = name.partition("_")
        values = {"train": self.train, "val": self.val}.get(split)
        if values is None or key not in values:
            raise UsageError(f"no metric {name!r} in the history; it has "
                             + ", ".join([f"train_{k}" for k in self.train] + [f"val_{k}" for k in self.val]))
        return values[key]


def better(name: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if name.endswith("loss") else value > best


def epoch_seed(seed: int, epoch: int) -> int:
    """The data seed of epoch `epoch` (1-based, across stages): a resumed epoch sees the same order and
    augmentation as in an uninterrupted run, which a pipeline reshuffling on every pass cannot give."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _unnumbered(path: str) -> str:
    """A variable path without Keras' per-process counters (seed_generator_3 -> seed_generator), which depend
    on how many models the process built before."""
    return re.sub(r"_\d+(?=/|$)", "", path)


def make_optimizer(cfg: TrainConfig, schedule):
    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.01 if cfg.optimizer == "adamw" else 0.0)
    kwargs = {"learning_rate": schedule, "weight_decay": wd or None}
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=0.9, **kwargs)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(**kwargs)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(**kwargs)
    raise UsageError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


# -- hooks --------------------------------------------------------------------------------------------------------
def model_inputs(batch: dict):
    """What the model is called on: cached activations when the batch has them, else the images."""
    return batch[FEATURES] if FEATURES in batch else batch[IMAGE]


def targets(batch: dict, num_classes: int):
    """The label rows a loss trains on: a mixed batch's soft TARGET (tfl.data.mixing), else onehot(LABEL)."""
    return batch[TARGET] if TARGET in batch else tf.one_hot(batch[LABEL], num_classes)


class CrossEntropy:
    """The default loss hook: softmax cross-entropy of logits against batch[LABEL] (or a mixed batch's soft
    batch[TARGET]), with label smoothing and an optional batch["sample_weight"]."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def __call__(self, batch: dict, logits):
        loss = keras.losses.categorical_crossentropy(targets(batch, self.num_classes), logits, from_logits=True,
                                                     label_smoothing=self.label_smoothing)
        return loss * tf.cast(batch["sample_weight"], loss.dtype) if "sample_weight" in batch else loss


def accuracy(batch: dict, logits) -> dict:
    """The default metrics hook: {"accuracy": 1.0 where argmax(logits) == label}."""
    hit = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(batch[LABEL], tf.int32))
    return {"accuracy": tf.cast(hit, tf.float32)}


class Callback:
    """Hooks into the loop; override what you need. All arguments are plain Python values."""

    def on_stage_begin(self, stage: str, info: dict) -> None:
        """info: {"epochs", "steps_per_epoch", "groups": {group: lr}, "trainable": [stages], "step": global steps
        done before this stage (also after a resume), "first_epoch": > 1 when a resume continues the stage}"""

    def on_train_step(self, stage: str, step: int, logs: dict) -> None:
        """step: global step (1-based, across stages); logs: this batch's {"loss", metrics..., "lr/<group>"}"""

    def on_batch_end(self, epoch: int, step: int) -> None:
        """epoch: 1-based across stages; step: within the epoch"""

    def on_epoch_end(self, result: EpochResult) -> None:
        pass

    def on_run_end(self, history: list) -> None:
        pass


class FaultHook(Callback):
    """TFL_FAULT=kill-at-step:N:S / interrupt-at-step:N:S / term-at-step:N:S / crash-at-step:N:S (see
    tfl.training.checkpoint): SIGKILL, SIGINT as Ctrl-C sends it, SIGTERM as a scheduler sends it, or an unexpected
    exception (as a bug would raise), right after step S of epoch N."""

    def __init__(self, at: tuple[int, int], kind: str = "kill-at-step"):
        self.at, self.kind = tuple(at), kind

    def on_batch_end(self, epoch: int, step: int) -> None:
        if (epoch, step) == self.at:
            if self.kind == "interrupt-at-step":
                os.kill(os.getpid(), signal.SIGINT)
            elif self.kind == "term-at-step":
                os.kill(os.getpid(), signal.SIGTERM)
            elif self.kind == "crash-at-step":
                raise RuntimeError(f"TFL_FAULT crash-at-step:{epoch}:{step}, an injected failure")
            else:
                checkpoint.kill_now()


def default_callbacks() -> list[Callback]:
    for kind in ("kill-at-step", "interrupt-at-step", "term-at-step", "crash-at-step"):
        at = checkpoint.injected_fault(kind)
        if at:
            return [FaultHook(at, kind)]
    return []


class Progress:
    """One line per epoch on a pipe; a live bar on a terminal; nothing when Progress.enabled is False
    (tfl.set_progress, TFL_PROGRESS=0)."""

    enabled = os.environ.get("TFL_PROGRESS", "1") != "0"

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr  # progress on stderr keeps stdout clean for results and --json
        self.tty = self.stream.isatty()
        self.start = time.time()
        self.next_report = 0.25

    def update(self, done: int, loss: float | None = None, acc: float | None = None) -> None:
        if not self.enabled:
            return
        frac = done / max(self.total, 1)
        elapsed = time.time() - self.start
        eta = elapsed / max(frac, 1e-9) - elapsed
        metrics = f" loss {loss:.4f} acc {acc:.4f}" if loss is not None else ""
        text = f"{self.label} {done}/{self.total}{metrics} {elapsed:.0f}s eta {eta:.0f}s"
        if self.tty:
            bar = "#" * int(20 * frac)
            self.stream.write(f"\r  [{bar:<20}] {text}")
            self.stream.flush()
        elif frac >= self.next_report or done == self.total:
            self.stream.write(f"  {text}\n")
            self.stream.flush()
            while self.next_report <= frac:
                self.next_report += 0.25

    def close(self) -> None:
        if self.tty and self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _sigterm_deferred(method):
    """SIGTERM during `method` is noted for its steps to act on (tfl.training.stopping), so that no step or
    checkpoint save is cut in half; one noted after the last step stops a single process at the end. A worker whose
    peer left the run (Ctrl-C, a crash, SIGTERM outside the loop) says so in one line instead of reporting
    TensorFlow's aborted collective as a bug."""

    @functools.wraps(method)
    def deferring(self, *args, **kwargs):
        try:
            with stopping.deferred():
                result = method(self, *args, **kwargs)
        except tf.errors.UnavailableError as err:
            if not self._multi_worker:
                raise
            raise WorkerLost(_peer_lost(err)) from None
        if self._stop_now():
            raise self._terminated("at the end of " + ("the stage" if method.__name__ == "run_stage" else
                                                       "the evaluation"))
        return result

    return deferring


@dataclasses.dataclass
class _LiveOptimizer:
    optimizer: keras.optimizers.Optimizer
    schedule: WarmupSchedule
    variables: list  # the variables it was built for: reusable only for exactly these


class Trainer:
    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, num_classes: int,
                 cfg: TrainConfig, log: Callable[[str], None] = print,
                 checkpoints: checkpoint.CheckpointManager | None = None, loss: Callable | None = None,
                 metrics: Callable | None = None, inputs: Callable = model_inputs,
                 callbacks: list[Callback] | None = None, select: str = "val_accuracy", averagers: list | None = None):
        self.strategy = strategy
        self._multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self.model = model  # the canonical model: evaluated, saved, and where best weights live
        self.num_classes = num_classes
        self.cfg = cfg
        self.log = log
        self.checkpoints = checkpoints  # saves a snapshot after every epoch when set
        self.loss_fn = loss or CrossEntropy(num_classes, cfg.label_smoothing)
        self.metrics_fn = metrics or accuracy
        self.inputs_fn = inputs
        self.callbacks = list(callbacks or []) + default_callbacks()
        self.select = select  # the run-wide best epoch, restored by restore_best()
        # Weight averages (tfl.training.averaging: --ema, --swa-epochs), updated in the train step, validated after
        # every epoch and kept in every checkpoint.
        self.averagers = list(averagers or [])
        self.history: list[EpochResult] = []
        self.best_value: float | None = None
        self.best_weights = None
        self.best_epoch = None
        self.stage_best: dict[str, dict] = {}  # stage -> {"value", "epoch"} by that stage's own `select`
        self.stopped_early = False  # a stage with stop_run stopped early: later stages are skipped
        self.global_step = 0
        self._best_is_current = False
        self._stage_best_weights = None  # the running stage's best, kept when its policy restores it
        self._optimizers: dict[str, _LiveOptimizer] = {}
        self._eval_steps = {}  # ids of (model, loss, metrics) -> (those, traced step)
        self._finished_stages = set()  # after a resume: stages the snapshot had finished
        self._resume_stage = None  # the snapshot state of the stage a resume continues, until that stage starts
        self._resume_optimizers = None  # group -> (schedule config, arrays, variables) from the snapshot, used once
        # () -> (JSON-able state, {name: array}) a recipe keeps in every checkpoint (a continual-learning strategy's
        # buffer, old outputs, Fisher); a resumed recipe reads them back as state["recipe"] and arrays "recipe.<name>".
        self.recipe_state: Callable[[], tuple[dict, dict]] | None = None
        # How the step uses its device (tfl.training.device): XLA, and every how many steps its numbers come back.
        kind = device.device_kind(strategy)
        self._jit = device.resolve_jit(cfg.jit, kind, device.op_determinism())
        self._readback_every = device.resolve_readback(cfg.readback_every, kind)
        self._totals_kind = kind

    @property
    def best_accuracy(self) -> float:
        return -math.inf if self.best_value is None else self.best_value

    # -- one pass -------------------------------------------------------------------------------------------
    def _sums(self, batch, outputs, per_example, metrics=None, weight=None):
        """{"loss", each metric: sum over this replica's batch, "examples": its size}; summed across replicas.
        `weight` [B]: 1 for a real row, 0 for a row that only pads the batch (evaluation); such rows count nowhere."""
        values = {"loss": per_example, **(metrics or self.metrics_fn)(batch, outputs)}
        if weight is None:
            sums = {k: tf.reduce_sum(tf.cast(v, tf.float32)) for k, v in values.items()}
            sums["examples"] = tf.cast(tf.shape(per_example)[0], tf.float32)
            return sums
        sums = {k: tf.reduce_sum(_weighted(tf.cast(v, tf.float32), weight)) for k, v in values.items()}
        sums["examples"] = tf.reduce_sum(weight)
        return sums

    def _train_step_fn(self, train_model, groups, optimizers, global_batch):
        variables = [v for g in groups for v in g.variables]
        bounds = np.cumsum([0] + [len(g.variables) for g in groups])

        def step(batch):
            with tf.GradientTape(persistent=self.cfg.loss_scale) as tape:
                outputs = train_model(self.inputs_fn(batch), training=True)
                per_example = self.loss_fn(batch, outputs)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                if train_model.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(train_model.losses))
                # float16: each group's optimizer scales the loss by its own dynamic scale and unscales (or skips
                # a step whose gradients overflowed) in apply, so each group takes the gradient of its own scaled loss.
                scaled = [opt.scale_loss(loss) for opt in optimizers] if self.cfg.loss_scale else None
            grads = [] if scaled else tape.gradient(loss, variables)
            for i, opt in enumerate(optimizers):
                group = variables[bounds[i]:bounds[i + 1]]
                gradients = tape.gradient(scaled[i], group) if scaled else grads[bounds[i]:bounds[i + 1]]
                opt.apply_gradients(list(zip(gradients, group)))
            for averager in self.averagers:
                averager.in_step()
            return self._sums(batch, outputs, per_example)

        return self._distributed(step)

    def _eval_step_fn(self, model, loss, metrics):
        def step(batch):
            batch = dict(batch)
            weight = batch.pop(PAD_WEIGHT, None)  # (the hooks see the batch as the data made it)
            outputs = model(self.inputs_fn(batch), training=False)
            return self._sums(batch, outputs, loss(batch, outputs), metrics, weight)

        return self._distributed(step)

    def _distributed(self, step):
        """The step on every replica, its sums all-reduced and added to the running `totals` on the device
        (device.Totals); `stop` (1.0: this process got SIGTERM) is summed with them, so every worker learns at the
        same read-back that one of them was asked to stop. Returns (new totals, this step's sums); the function's
        `totals` attribute reads them.

        Traced without AutoGraph, as Keras traces its own train step: the step, the model and every recipe's hooks
        branch on Python values only (tensor-dependent branches use tf.cond / ops.where), and converting all of
        them cost a fifth of each trace (0.4 s of a tiny run's 2.2 s of tracing)."""
        def with_stop(batch, stop):
            return {**step(batch), STOP: tf.identity(stop)}

        totals = device.Totals(self._totals_kind)

        @tf.function(jit_compile=self._jit, autograph=False)
        def distributed(batch, stop, running):
            results = self.strategy.run(with_stop, args=(batch, stop))
            sums = {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in results.items()}
            return totals.add(running, sums)

        distributed.totals = totals
        return distributed

    def _step(self, step, batch, running):
        """Run one step, adding its sums to `running` (on the device; None: the first step of a pass): returns the
        new running totals and this step's sums, neither read back."""
        if running is None:
            running = step.totals.zeros()
        return step(batch, tf.constant(float(stopping.requested())), running)

    @staticmethod
    def _read(step, running) -> tuple[dict, bool, int, float]:
        """Read the running totals back: ({"loss", metrics..., "examples"}, whether any worker got SIGTERM, the
        pass's first step whose loss was not finite (0: none), that loss)."""
        sums, _, bad_step, bad_loss = step.totals.read(running)
        return sums, sums.pop(STOP) > 0, bad_step, bad_loss

    def _terminated(self, where: str, progress=None) -> stopping.Terminated:
        """The exception that stops the run after SIGTERM (see tfl.training.stopping), after a line saying where."""
        if progress:
            progress.close()
        kept = (f"the checkpoint of epoch {len(self.history)} is kept"
                if self.checkpoints and self.history else "no epoch had finished, so nothing was saved")
        self.log(f"SIGTERM{' (on one of the workers)' if self._multi_worker else ''}: stopped {where}; {kept}")
        return stopping.Terminated(where)

    def _stop_now(self) -> bool:
        """A single process stops as soon as SIGTERM is noted; workers only at a step all of them take."""
        return stopping.requested() and not self._multi_worker

    def _distribute(self, dataset: tf.data.Dataset):
        # DATA sharding: every worker builds the same pipeline and takes its replicas' slices of each global
        # batch, so results do not depend on the worker count. (FILE sharding needs file-based sources.)
        dataset = _as_dicts(dataset)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        # Batches prefetched into the replicas' device memory (a no-op on a CPU).
        return self.strategy.experimental_distribute_dataset(
            device.prefetch_to_gpu(dataset.with_options(options), self.strategy), device.input_options())

    def _distribute_padded(self, dataset: tf.data.Dataset):
        """Evaluation batches for every replica, however small the last batch: each global batch is padded (by
        repeating its own rows) to a multiple of the replicas and split evenly, the padding marked PAD_WEIGHT 0.

        tf.distribute splits a final batch smaller than the replicas into empty per-replica batches, which a
        convolution cannot take ("Incompatible shapes: [0,3,3,512]"). Padding with a sample weight of 0 is the usual
        remedy; the weight keeps every example counted exactly once. Every worker iterates the same pipeline
        and keeps its own replicas' slices (as DATA sharding does). One replica: the batches as they are."""
        dataset = _as_dicts(dataset)
        replicas = self.strategy.num_replicas_in_sync
        if replicas == 1:
            return self._distribute(dataset)

        def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            local = context.num_replicas_in_sync // context.num_input_pipelines
            first = context.input_pipeline_id * local

            def split(batch):
                rows = tf.shape(tf.nest.flatten(batch)[0])[0]
                per_replica = (rows + replicas - 1) // replicas
                index = tf.range(per_replica * replicas)
                real = index < rows
                mine = tf.reshape(tf.where(real, index, index % rows), [replicas, per_replica])[first:first + local]
                padded = tf.nest.map_structure(lambda column: tf.gather(column, mine), batch)
                padded[PAD_WEIGHT] = tf.cast(tf.reshape(real, [replicas, per_replica])[first:first + local],
                                             tf.float32)
                return padded

            return dataset.map(split).unbatch()  # one element per local replica and step

        return self.strategy.distribute_datasets_from_function(per_worker, device.input_options())

    @_sigterm_deferred
    def evaluate_all(self, dataset: tf.data.Dataset, label: str = "eval", steps: int | None = None,
                     model: keras.Model | None = None, loss: Callable | None = None,
                     metrics: Callable | None = None) -> dict:
        """{"loss", metrics...}: means of `model` (default: the trainer's) over a dataset of dict batches, with the
        trainer's hooks or the `loss` / `metrics` given (e.g. plain classification scores on a test split that
        lacks a recipe's extra columns)."""
        model, loss, metrics = model or self.model, loss or self.loss_fn, metrics or self.metrics_fn
        key = (id(model), id(loss), id(metrics))
        if key not in self._eval_steps:  # the objects are kept with the step, so their ids stay theirs
            self._eval_steps[key] = (model, loss, metrics, self._eval_step_fn(model, loss, metrics))
        eval_step = self._eval_steps[key][-1]
        running, totals, read = None, {}, 0
        progress = Progress(steps or 0, f"    {label}") if steps else None
        for i, batch in enumerate(self._distribute_padded(dataset), 1):
            if self._stop_now():
                raise self._terminated(f"during the {label} evaluation", progress)
            running, _ = self._step(eval_step, batch, running)
            if i % self._readback_every == 0:
                totals, stop, _, _ = self._read(eval_step, running)
                read = i
                if stop:
                    raise self._terminated(f"during the {label} evaluation", progress)
                if progress:
                    progress.update(i, *_loss_and_accuracy(totals))
        if running is not None and read != i:
            totals, stop, _, _ = self._read(eval_step, running)
            if stop:
                raise self._terminated(f"during the {label} evaluation", progress)
            if progress:
                progress.update(i, *_loss_and_accuracy(totals))
        if progress:
            progress.close()
        return _means(totals)

    def evaluate(self, dataset: tf.data.Dataset, label: str = "eval", steps: int | None = None,
                 model: keras.Model | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) of `model` (default: the trainer's) over a dataset of dict batches."""
        result = self.evaluate_all(dataset, label, steps, model)
        return result["loss"], result.get("accuracy", math.nan)

    # -- a stage ----------------------------------------------------------------------------------------------
    @_sigterm_deferred
    def run_stage(self, stage: str, train_model: keras.Model, groups: list[ParamGroup], epochs: int,
                  train_ds: tf.data.Dataset | Callable[[int], tf.data.Dataset], val_ds: tf.data.Dataset,
                  steps_per_epoch: int, global_batch: int, val_steps: int | None = None,
                  eval_model: keras.Model | None = None, policy: StagePolicy | None = None,
                  trainable: list | None = None) -> None:
        """Train `epochs` epochs. `train_ds` is a dataset, or epoch number (1-based, across stages) -> the
        dataset for that epoch. Validation runs `eval_model` (default: the trainer's model) on `val_ds`.
        `trainable`: what the history records as trained in this stage (canonical stage names).
        After a `resume`, a stage finished before the snapshot is skipped and the interrupted one continues."""
        policy = policy or StagePolicy()
        resume = self._resume_stage if self._resume_stage and self._resume_stage["stage"] == stage else None
        first_epoch = resume["stage_epoch"] + 1 if resume else 1
        if epochs <= 0 or self.stopped_early or stage in self._finished_stages or first_epoch > epochs:
            return
        groups = [g for g in groups if g.variables]
        if not groups:
            raise UsageError(f"stage {stage!r} has nothing to train: every layer is frozen")
        live = self._optimizers_for(stage, groups, epochs, steps_per_epoch, policy, resume)
        optimizers = [live[g.name].optimizer for g in groups]
        since_best = resume["since_best"] if resume else 0
        if not resume:
            self.stage_best.pop(stage, None)
            self._stage_best_weights = None
        self._resume_stage = self._resume_optimizers = None
        for averager in self.averagers:
            averager.begin_stage(stage, train_model, groups)
        train_step = self._train_step_fn(train_model, groups, optimizers, global_batch)
        n_params = sum(int(np.prod(v.shape)) for g in groups for v in g.variables)
        self.log(f"stage {stage}: {epochs} epoch(s), {steps_per_epoch} steps each, {n_params:,} trainable parameters, "
                 + ", ".join(f"{g.name} lr {g.lr:g}" for g in groups)
                 + (f"; continuing at epoch {first_epoch}" if first_epoch > 1 else ""))
        self._emit("on_stage_begin", stage, {"epochs": epochs, "steps_per_epoch": steps_per_epoch,
                                             "groups": {g.name: g.lr for g in groups},
                                             "trainable": list(trainable or []), "step": self.global_step,
                                             "first_epoch": first_epoch})
        # Callbacks may be duck-typed (as _emit allows): one without on_train_step wants no per-step logs.
        step_logs = any(getattr(type(cb), "on_train_step", Callback.on_train_step) is not Callback.on_train_step
                        for cb in self.callbacks)
        patience = policy.early_stopping if policy.early_stopping is not None else self.cfg.early_stopping
        for epoch in range(first_epoch, epochs + 1):
            start = time.time()
            number = len(self.history) + 1
            first_step = {g.name: int(live[g.name].optimizer.iterations.numpy()) for g in groups}
            lrs = {g.name: live[g.name].schedule.value(first_step[g.name]) for g in groups}
            # The epoch's per-step rates in one call per group: evaluating the schedule step by step cost more
            # than a cached head step.
            step_lrs = {g.name: live[g.name].schedule.values(first_step[g.name], steps_per_epoch)
                        for g in groups} if step_logs else {}
            progress = Progress(steps_per_epoch, f"  {stage} epoch {epoch}/{epochs}")
            data = train_ds(number) if callable(train_ds) else train_ds
            self._best_is_current = False
            # The step's numbers add up on the device and come back every --readback-every steps and at the end of
            # the epoch (tfl.training.device); the callbacks' per-step logs wait for the next read too.
            running, totals, pending, done, read_at = None, {}, [], 0, 0
            where = (stage, number, epoch)
            for i, batch in enumerate(self._distribute(data), 1):
                if self._stop_now():
                    raise self._terminated(f"after step {i - 1} of epoch {number}" if i > 1 else
                                           f"before epoch {number}", progress)
                running, sums = self._step(train_step, batch, running)
                self.global_step, done = self.global_step + 1, i
                if step_logs:
                    pending.append((i, self.global_step, sums))
                if i % self._readback_every == 0 or i >= steps_per_epoch:
                    totals, read_at = self._read_train(train_step, running, pending, i, where, step_lrs, progress), i
                self._emit("on_batch_end", number, i)
                if i >= steps_per_epoch:
                    break
            if done != read_at:  # the data ended before steps_per_epoch
                totals = self._read_train(train_step, running, pending, done, where, step_lrs, progress)
            progress.close()
            val = self.evaluate_all(val_ds, "val", val_steps, eval_model)
            averaging = self._averaging_context(stage, epoch, epochs, number, val_ds, val_steps, eval_model, train_ds,
                                                train_model, steps_per_epoch, groups)
            for averager in self.averagers:
                val.update(averager.after_epoch(self, averaging))
            result = EpochResult(stage, number, _means(totals), val, lrs, time.time() - start, list(trainable or []))
            self.history.append(result)
            improved = better(self.select, result.metric(self.select), self.best_value)
            if improved:
                self.best_value, self.best_epoch = result.metric(self.select), result.epoch
                self.best_weights = self._current_weights()
                self._best_is_current = True
            value = result.metric(policy.select)
            if better(policy.select, value, self.stage_best.get(stage, {}).get("value")):
                self.stage_best[stage] = {"value": value, "epoch": result.epoch}
                if policy.restore_best:
                    self._stage_best_weights = self.best_weights if improved else self._current_weights()
                since_best = 0
            else:
                since_best += 1
            self.log(self._row(result, improved))
            stopped = bool(patience and since_best >= patience)
            done = stopped or epoch == epochs
            if stopped:
                self.log(f"early stopping: no {policy.select} improvement for {patience} epoch(s) in stage {stage}"
                         + ("; the run ends here" if policy.stop_run else ""))
                self.stopped_early = policy.stop_run
            if done and policy.restore_best and self._stage_best_weights is not None:
                self._assign(self._stage_best_weights)
                self._best_is_current = self.stage_best[stage]["epoch"] == self.best_epoch
                self.log(f"stage {stage}: restored its best weights (epoch {self.stage_best[stage]['epoch']}, "
                         f"{policy.select} {self.stage_best[stage]['value']:.4f})")
            if done:
                for averager in self.averagers:
                    result.val.update(averager.end_stage(self, averaging))
            if self.checkpoints:
                self.checkpoints.save(self._snapshot(stage, epoch, since_best, done, groups, live))
            self._emit("on_epoch_end", result)
            if done:
                break
        self._stage_best_weights = None

    def _averaging_context(self, stage, epoch, epochs, number, val_ds, val_steps, eval_model, train_ds, train_model,
                           steps_per_epoch, groups):
        return EpochContext(
            stage, epoch, epochs, number,
            evaluate=lambda label: self.evaluate_all(val_ds, label, val_steps, eval_model),
            train_batches=lambda: self._distribute(train_ds(number) if callable(train_ds) else train_ds),
            train_model=train_model, steps=steps_per_epoch, groups=groups, inputs=self.inputs_fn)

    def _read_train(self, train_step, running, pending: list, i: int, where: tuple, step_lrs: dict, progress) -> dict:
        """Read the epoch's running totals back after its step `i`: stop for a SIGTERM on any worker or a loss that
        was not finite (at the step where it first was), hand the callbacks the logs of the steps since the last read
        (`pending`: (step in the epoch, global step, its sums)), move the progress line; returns the totals."""
        stage, number, epoch = where
        totals, stop, bad_step, bad_loss = self._read(train_step, running)
        if stop:
            raise self._terminated(f"after step {i} of epoch {number}", progress)
        for at, global_step, sums in pending:
            if bad_step and at >= bad_step:
                break
            logs = _means(train_step.totals.sums(sums))
            logs.pop(STOP)
            logs.update({f"lr/{name}": float(values[at - 1]) for name, values in step_lrs.items()})
            self._emit("on_train_step", stage, global_step, logs)
        pending.clear()
        if bad_step:
            progress.close()
            raise TrainingDiverged(self._diverged(stage, number, epoch, bad_step, bad_loss))
        progress.update(i, *_loss_and_accuracy(totals))
        return totals

    def _diverged(self, stage: str, number: int, stage_epoch: int, step: int, loss: float) -> str:
        kept = (f"the checkpoint of epoch {len(self.history)} in {self.checkpoints.folder} is kept (the last good "
                "one)" if self.checkpoints and self.history else "no epoch had finished, so nothing was saved")
        return (f"training stopped: the loss became {loss} at epoch {number} (stage {stage}, its epoch {stage_epoch}), "
                f"step {step}; {kept}. Lower --lr (or --backbone-lr), check the data, and start over with "
                "--overwrite or another --output-dir")

    def _optimizers_for(self, stage, groups, epochs, steps_per_epoch, policy, resume) -> dict:
        """One optimizer per group: the live one when the policy keeps optimizers and the group trains the same
        variables; after a resume, rebuilt from the snapshot (same schedule, same state); else new."""
        cfg, saved = self.cfg, self._resume_optimizers or {}
        if resume and [g.name for g in groups] != resume["groups"]:
            raise checkpoint.ResumeError(f"stage {stage!r} trains the groups {[g.name for g in groups]} but the "
                                         f"checkpoint has {resume['groups']}")
        span = (policy.schedule_epochs or epochs) * steps_per_epoch
        warmup = int(cfg.warmup_epochs * steps_per_epoch) if policy.warmup else 0
        live = {}
        with self.strategy.scope():
            for g in groups:
                kept = self._optimizers.get(g.name) if policy.keep_optimizers else None
                if kept is not None and _same_variables(kept.variables, g.variables):
                    live[g.name] = kept
                    continue
                # As in an uninterrupted run, a finished stage's optimizer carries on only for the same variables.
                carried = g.name in saved and (resume is not None or (
                    policy.keep_optimizers and saved[g.name][2] in (None, self._variable_indices(g.variables))))
                if carried:
                    schedule = WarmupSchedule(**saved[g.name][0])
                elif policy.lr_growth:  # "step" with a step of one optimizer step: lr x growth^step
                    schedule = WarmupSchedule(g.lr, span, 0, "step", 1, policy.lr_growth)
                else:
                    schedule = WarmupSchedule(g.lr, span, warmup, cfg.schedule, cfg.step_size * steps_per_epoch,
                                              cfg.gamma)
                opt = make_optimizer(cfg, schedule)
                if cfg.loss_scale:
                    opt = keras.optimizers.LossScaleOptimizer(opt)
                opt.build(g.variables)
                if carried:
                    arrays = saved[g.name][1]
                    if len(arrays) != len(opt.variables):
                        raise checkpoint.ResumeError(f"the {g.name} optimizer has {len(opt.variables)} variables but "
                                                     f"the checkpoint holds {len(arrays)}")
                    for v, value in zip(opt.variables, arrays):
                        v.assign(value)
                live[g.name] = _LiveOptimizer(opt, schedule, list(g.variables))
        self._optimizers = live
        return live

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method(*args)

    def finish(self) -> None:
        """Tell the callbacks the run is over (TensorBoard closes its files)."""
        self._emit("on_run_end", list(self.history))

    def _variable_indices(self, variables) -> list:
        """Where `variables` sit in the model's variables: which ones a group trains, comparable across processes."""
        index = {id(v): i for i, v in enumerate(self.model.variables)}
        return [index.get(id(v), -1) for v in variables]

    def _current_weights(self) -> list:
        return [np.array(v.numpy()) for v in self.model.weights]

    def _assign(self, values) -> None:
        for variable, value in zip(self.model.weights, values):
            variable.assign(value)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _snapshot(self, stage, stage_epoch, since_best, done, groups, live) -> checkpoint.Snapshot:
        arrays = {f"model.{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(self.model.variables)}
        for g in groups:
            opt = live[g.name].optimizer
            arrays.update({f"opt.{g.name}.{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(opt.variables)})
        if not self._best_is_current and self.best_weights is not None:
            arrays.update({f"best.{i:05d}": w for i, w in enumerate(self.best_weights)})
        if not done and self._stage_best_weights is not None:
            arrays.update({f"stagebest.{i:05d}": w for i, w in enumerate(self._stage_best_weights)})
        state = {
            "stage": stage, "stage_epoch": stage_epoch, "since_best": since_best, "stage_done": done,
            "stopped_early": self.stopped_early, "groups": [g.name for g in groups],
            "schedules": {g.name: live[g.name].schedule.get_config() for g in groups},
            "group_variables": {g.name: self._variable_indices(g.variables) for g in groups},
            "best_value": self.best_value, "best_epoch": self.best_epoch, "best_is_current": self._best_is_current,
            "stage_best": self.stage_best, "global_step": self.global_step,
            "history": [dataclasses.asdict(r) for r in self.history],
            "variables": [[v.path, list(v.shape)] for v in self.model.variables],
        }
        if self.averagers:
            state["averaging"] = {}
            for averager in self.averagers:
                state["averaging"][averager.name], averaged = averager.state()
                arrays.update({f"avg.{averager.name}.{name}": value for name, value in averaged.items()})
        if self.recipe_state is not None:
            recipe, recipe_arrays = self.recipe_state()
            state["recipe"] = recipe
            arrays.update({f"recipe.{name}": np.asarray(value) for name, value in recipe_arrays.items()})
        return checkpoint.Snapshot(len(self.history), state, arrays)

    def resume(self, snapshot: checkpoint.Snapshot) -> None:
        """Continue from `snapshot`: model variables, history, best weights and the recipe's position now; the
        optimizers of the groups that carry on when `run_stage` starts the next (or the interrupted) stage."""
        state, arrays = snapshot.state, snapshot.arrays
        saved = [(_unnumbered(path), tuple(shape)) for path, shape in state["variables"]]
        current = [(_unnumbered(v.path), tuple(v.shape)) for v in self.model.variables]
        if saved != current:
            diff = next(((a, b) for a, b in zip(saved, current) if a != b), (len(saved), len(current)))
            raise checkpoint.ResumeError(f"the checkpoint of epoch {snapshot.epoch} does not fit this model "
                                         f"(checkpoint {diff[0]} vs model {diff[1]})")
        for i, v in enumerate(self.model.variables):
            v.assign(arrays[f"model.{i:05d}"])
        self.history = [EpochResult(**r) for r in state["history"]]
        self.best_epoch, self.best_value = state["best_epoch"], state["best_value"]
        self._best_is_current = state["best_is_current"]
        if self._best_is_current:
            self.best_weights = self._current_weights()
        elif self.best_epoch is not None:
            self.best_weights = [arrays[f"best.{i:05d}"] for i in range(len(self.model.weights))]
        if f"stagebest.{0:05d}" in arrays:
            self._stage_best_weights = [arrays[f"stagebest.{i:05d}"] for i in range(len(self.model.weights))]
        self.stage_best = state["stage_best"]
        for averager in self.averagers:
            prefix = f"avg.{averager.name}."
            averager.load(state["averaging"][averager.name],
                          {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        self.stopped_early = state["stopped_early"]
        self.global_step = state["global_step"]
        unfinished = set() if state["stage_done"] else {state["stage"]}
        self._finished_stages = {r.stage for r in self.history} - unfinished
        self._resume_stage = None if state["stage_done"] else state
        self._resume_optimizers = {
            g: (state["schedules"][g], [arrays[k] for k in sorted(k for k in arrays if k.startswith(f"opt.{g}."))],
                state.get("group_variables", {}).get(g))
            for g in state["groups"]}

    @staticmethod
    def header() -> str:
        return f"{'epoch':>5} {'stage':<9} {'loss':>8} {'acc':>7} {'val_loss':>9} {'val_acc':>8} {'lr':>20} {'time':>7}"

    def _row(self, r: EpochResult, improved: bool) -> str:
        lr = " ".join(f"{v:.2e}" for v in r.lr.values())
        mark = " *" if improved else ""
        return (f"{r.epoch:>5} {r.stage:<9} {r.train_loss:>8.4f} {r.train_accuracy:>7.4f} {r.val_loss:>9.4f} "
                f"{r.val_accuracy:>8.4f} {lr:>20} {r.seconds:>6.1f}s{mark}")

    def restore_best(self) -> None:
        """Go back to the run-wide best epoch's weights (by the trainer's `select`)."""
        if self.best_weights is not None:
            self._assign(self.best_weights)
            self._best_is_current = True
            self.log(f"restored the best weights (epoch {self.best_epoch}, {self.select} {self.best_value:.4f})")


def history_rows(history: list[EpochResult]) -> list[dict]:
    """history.csv: one row per epoch; a learning-rate column per group ("" where it did not train), every
    metric the hooks produced, and the canonical stages trained (";"-joined) when the recipe said."""
    groups = list(dict.fromkeys(g for r in history for g in r.lr))
    rows = []
    for r in history:
        row = {"epoch": r.epoch, "stage": r.stage}
        row.update({f"train_{k}": round(v, 6) for k, v in r.train.items()})
        row.update({f"val_{k}": round(v, 6) for k, v in r.val.items()})
        row["seconds"] = round(r.seconds, 2)
        row.update({f"lr_{g}": r.lr.get(g, "") for g in groups})
        if any(h.trainable for h in history):
            row["trainable"] = ";".join(r.trainable)
        rows.append(row)
    # A metric of some epochs only (val_swa_*: the final stage's last) is blank in the others.
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k, "") for k in columns} for row in rows]


def _as_dicts(dataset: tf.data.Dataset) -> tf.data.Dataset:
    if isinstance(dataset.element_spec, tuple) and len(dataset.element_spec) == 2:  # Keras-style (x, y)
        return dataset.map(lambda x, y: {IMAGE: x, LABEL: y})
    return dataset


def _weighted(values, weight):
    """values [B, ...] times weight [B]; a value without a batch axis is left as it is."""
    rank = values.shape.rank
    if rank == 0:
        return values
    shape = [-1] + [1] * (rank - 1) if rank is not None else tf.concat([[-1], tf.ones([tf.rank(values) - 1],
                                                                                       tf.int32)], 0)
    return values * tf.reshape(weight, shape)


def _same_variables(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _means(totals: dict) -> dict:
    n = max(totals.get("examples", 0.0), 1.0)
    return {k: v / n for k, v in totals.items() if k != "examples"}


def _loss_and_accuracy(totals: dict) -> tuple:
    n = max(totals.get("examples", 0.0), 1.0)
    return totals.get("loss", 0.0) / n, totals.get("accuracy", math.nan) / n
