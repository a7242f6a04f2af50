"""A custom training loop under a tf.distribute strategy (`strategy.run`).

Keras 3 `Model.fit` does not work under MultiWorkerMirroredStrategy (keras-team/keras#20585), so tfl trains
with its own loop: per-example losses averaged over the global batch, one optimizer per parameter group (each
with its own learning-rate schedule), metrics summed across all replicas of all workers. The loop keeps the best
weights by validation accuracy across all stages and restores them at the end.

Every decision (best epoch, early stopping) is taken on those all-reduced numbers, so all workers take it alike.
With a CheckpointManager the trainer saves after every epoch and `resume` continues from a snapshot exactly:
model and optimizer variables, the schedule's position, best weights, history, and data order (a function of
the epoch, see `epoch_seed`).
"""

from __future__ import annotations

import dataclasses
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

from tfl.training import checkpoint
from tfl.training.schedules import WarmupSchedule

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclasses.dataclass
class TrainConfig:
    optimizer: str = "adam"
    weight_decay: float | None = None  # default 0.01 for adamw, 0 otherwise
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 7
    gamma: float = 0.1
    label_smoothing: float = 0.0
    early_stopping: int | None = None
    jit: bool = False  # XLA-compile the train and eval steps


@dataclasses.dataclass
class ParamGroup:
    name: str  # "backbone" or "head"
    variables: list
    lr: float


@dataclasses.dataclass
class EpochResult:
    stage: str
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: dict
    seconds: float


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
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


class Progress:
    """One line per epoch on a pipe; a live bar on a terminal."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr  # progress on stderr keeps stdout clean for results and --json
        self.tty = self.stream.isatty()
        self.start = time.time()
        self.next_report = 0.25

    def update(self, done: int, loss: float | None = None, acc: float | None = None) -> None:
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
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Trainer:
    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, num_classes: int,
                 cfg: TrainConfig, log: Callable[[str], None] = print,
                 checkpoints: checkpoint.CheckpointManager | None = None):
        self.strategy = strategy
        self.model = model  # the canonical model: evaluated, saved, and where best weights live
        self.num_classes = num_classes
        self.cfg = cfg
        self.log = log
        self.checkpoints = checkpoints  # saves a snapshot after every epoch when set
        self.history: list[EpochResult] = []
        self.best_accuracy = -math.inf
        self.best_weights = None
        self.best_epoch = None
        self.stopped_early = False
        self._eval_steps = {}  # id(model) -> (model, traced step)
        self._finished_stages = set()  # after a resume: stages the snapshot had finished before its own
        self._resume_stage = None  # the snapshot state of the stage a resume continues, until that stage starts
        self._resume_optimizers = None
        self._kill_at = checkpoint.injected_fault("kill-at-step")

    # -- one pass -------------------------------------------------------------------------------------------
    def _per_example_loss(self, labels, logits):
        onehot = tf.one_hot(labels, self.num_classes)
        return keras.losses.categorical_crossentropy(
            onehot, logits, from_logits=True, label_smoothing=self.cfg.label_smoothing
        )

    def _train_step_fn(self, train_model, groups, optimizers, global_batch):
        variables = [v for g in groups for v in g.variables]
        bounds = np.cumsum([0] + [len(g.variables) for g in groups])

        def step(images, labels):
            with tf.GradientTape() as tape:
                logits = train_model(images, training=True)
                per_example = self._per_example_loss(labels, logits)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                if train_model.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(train_model.losses))
            grads = tape.gradient(loss, variables)
            for i, opt in enumerate(optimizers):
                pairs = list(zip(grads[bounds[i]:bounds[i + 1]], variables[bounds[i]:bounds[i + 1]]))
                opt.apply_gradients(pairs)
            return self._sums(labels, logits, per_example)

        return self._distributed(step)

    def _eval_step_fn(self, model):
        def step(images, labels):
            logits = model(images, training=False)
            return self._sums(labels, logits, self._per_example_loss(labels, logits))

        return self._distributed(step)

    @staticmethod
    def _sums(labels, logits, per_example):
        """(loss sum, correct count, example count) of one replica's batch; summed across replicas later."""
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(labels)[0], tf.float32)

    def _distributed(self, step):
        @tf.function(jit_compile=self.cfg.jit)
        def distributed(images, labels):
            results = self.strategy.run(step, args=(images, labels))
            return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

        return distributed

    def _distribute(self, dataset: tf.data.Dataset):
        # DATA sharding: every worker builds the same pipeline and takes its replicas' slices of each global
        # batch, so results do not depend on the worker count. (FILE sharding needs file-based sources.)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return self.strategy.experimental_distribute_dataset(dataset.with_options(options))

    def evaluate(self, dataset: tf.data.Dataset, label: str = "eval", steps: int | None = None,
                 model: keras.Model | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) of `model` (default: the trainer's) over a batched dataset of (images, labels)."""
        model = model or self.model
        if id(model) not in self._eval_steps:
            self._eval_steps[id(model)] = (model, self._eval_step_fn(model))
        eval_step = self._eval_steps[id(model)][1]
        totals = np.zeros(3)
        progress = Progress(steps or 0, f"    {label}") if steps else None
        for i, (images, labels) in enumerate(self._distribute(dataset), 1):
            totals += [float(t) for t in eval_step(images, labels)]
            if progress:
                progress.update(i, totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1))
        if progress:
            progress.close()
        n = max(totals[2], 1.0)
        return totals[0] / n, totals[1] / n

    # -- a stage ----------------------------------------------------------------------------------------------
    def run_stage(self, stage: str, train_model: keras.Model, groups: list[ParamGroup], epochs: int,
                  train_ds: tf.data.Dataset | Callable[[int], tf.data.Dataset], val_ds: tf.data.Dataset,
                  steps_per_epoch: int, global_batch: int, val_steps: int | None = None, warmup: bool = True,
                  eval_model: keras.Model | None = None) -> None:
        """Train `epochs` epochs. `train_ds` is a dataset, or epoch number (1-based, across stages) -> the
        dataset for that epoch. Validation runs `eval_model` (default: the trainer's model) on `val_ds`.
        After a `resume`, a stage finished before the snapshot is skipped and the interrupted one continues."""
        resume = self._resume_stage if self._resume_stage and self._resume_stage["stage"] == stage else None
        first_epoch = resume["stage_epoch"] + 1 if resume else 1
        if epochs <= 0 or self.stopped_early or stage in self._finished_stages or first_epoch > epochs:
            return
        groups = [g for g in groups if g.variables]
        if not groups:
            raise ValueError(f"stage {stage!r} has nothing to train: every layer is frozen")
        cfg = self.cfg
        total = epochs * steps_per_epoch
        with self.strategy.scope():
            schedules, optimizers = [], []
            for g in groups:
                schedule = WarmupSchedule(
                    g.lr, total, int(cfg.warmup_epochs * steps_per_epoch) if warmup else 0,
                    cfg.schedule, cfg.step_size * steps_per_epoch, cfg.gamma,
                )
                opt = make_optimizer(cfg, schedule)
                opt.build(g.variables)
                schedules.append(schedule)
                optimizers.append(opt)
        since_best = 0
        if resume:
            self._load_optimizers(stage, groups, optimizers)
            since_best = resume["since_best"]
            self._resume_stage = self._resume_optimizers = None
        train_step = self._train_step_fn(train_model, groups, optimizers, global_batch)
        n_params = sum(int(np.prod(v.shape)) for g in groups for v in g.variables)
        self.log(f"stage {stage}: {epochs} epoch(s), {steps_per_epoch} steps each, {n_params:,} trainable parameters, "
                 + ", ".join(f"{g.name} lr {g.lr:g}" for g in groups)
                 + (f"; continuing at epoch {first_epoch}" if first_epoch > 1 else ""))
        patience = cfg.early_stopping
        for epoch in range(first_epoch, epochs + 1):
            start = time.time()
            number = len(self.history) + 1
            lrs = {g.name: s.value(int(opt.iterations.numpy())) for g, s, opt in zip(groups, schedules, optimizers)}
            totals = np.zeros(3)
            progress = Progress(steps_per_epoch, f"  {stage} epoch {epoch}/{epochs}")
            data = train_ds(number) if callable(train_ds) else train_ds
            for i, (images, labels) in enumerate(self._distribute(data), 1):
                totals += [float(t) for t in train_step(images, labels)]
                progress.update(i, totals[0] / totals[2], totals[1] / totals[2])
                if self._kill_at == (number, i):
                    os.kill(os.getpid(), signal.SIGKILL)
                if i >= steps_per_epoch:
                    break
            progress.close()
            val_loss, val_acc = self.evaluate(val_ds, "val", val_steps, eval_model)
            result = EpochResult(stage, number, totals[0] / totals[2], totals[1] / totals[2],
                                 val_loss, val_acc, lrs, time.time() - start)
            self.history.append(result)
            improved = val_acc > self.best_accuracy
            if improved:
                self.best_accuracy, self.best_epoch = val_acc, result.epoch
                self.best_weights = [np.array(v.numpy()) for v in self.model.weights]
                since_best = 0
            else:
                since_best += 1
            self.log(self._row(result, improved))
            self.stopped_early = bool(patience and since_best >= patience)
            if self.checkpoints:
                self.checkpoints.save(self._snapshot(stage, epoch, since_best, groups, optimizers))
            if self.stopped_early:
                self.log(f"early stopping: no val_accuracy improvement for {patience} epoch(s)")
                return

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _snapshot(self, stage, stage_epoch, since_best, groups, optimizers) -> checkpoint.Snapshot:
        arrays = {f"model.{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(self.model.variables)}
        for g, opt in zip(groups, optimizers):
            arrays.update({f"opt.{g.name}.{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(opt.variables)})
        best_is_current = self.best_epoch == len(self.history)
        if not best_is_current and self.best_weights is not None:
            arrays.update({f"best.{i:05d}": w for i, w in enumerate(self.best_weights)})
        state = {
            "stage": stage, "stage_epoch": stage_epoch, "since_best": since_best,
            "stopped_early": self.stopped_early, "groups": [g.name for g in groups],
            "best_accuracy": None if self.best_epoch is None else self.best_accuracy,
            "best_epoch": self.best_epoch, "best_is_current": best_is_current,
            "history": [dataclasses.asdict(r) for r in self.history],
            "variables": [[v.path, list(v.shape)] for v in self.model.variables],
        }
        return checkpoint.Snapshot(len(self.history), state, arrays)

    def resume(self, snapshot: checkpoint.Snapshot) -> None:
        """Continue from `snapshot`: model variables, history and best weights now; the interrupted stage's
        optimizer state when `run_stage` starts that stage again."""
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
        self.best_epoch = state["best_epoch"]
        self.best_accuracy = -math.inf if state["best_accuracy"] is None else state["best_accuracy"]
        if state["best_is_current"]:
            self.best_weights = [np.array(v.numpy()) for v in self.model.weights]
        elif self.best_epoch is not None:
            self.best_weights = [arrays[f"best.{i:05d}"] for i in range(len(self.model.weights))]
        self.stopped_early = state["stopped_early"]
        self._finished_stages = {r.stage for r in self.history} - {state["stage"]}
        self._resume_stage = state
        self._resume_optimizers = {k: v for k, v in arrays.items() if k.startswith("opt.")}

    def _load_optimizers(self, stage, groups, optimizers) -> None:
        if [g.name for g in groups] != self._resume_stage["groups"]:
            raise checkpoint.ResumeError(f"stage {stage!r} trains the groups {[g.name for g in groups]} but the "
                                         f"checkpoint has {self._resume_stage['groups']}")
        for g, opt in zip(groups, optimizers):
            names = sorted(k for k in self._resume_optimizers if k.startswith(f"opt.{g.name}."))
            if len(names) != len(opt.variables):
                raise checkpoint.ResumeError(f"the {g.name} optimizer has {len(opt.variables)} variables but the "
                                             f"checkpoint holds {len(names)}")
            for v, name in zip(opt.variables, names):
                v.assign(self._resume_optimizers[name])

    @staticmethod
    def header() -> str:
        return f"{'epoch':>5} {'stage':<9} {'loss':>8} {'acc':>7} {'val_loss':>9} {'val_acc':>8} {'lr':>20} {'time':>7}"

    def _row(self, r: EpochResult, improved: bool) -> str:
        lr = " ".join(f"{v:.2e}" for v in r.lr.values())
        mark = " *" if improved else ""
        return (f"{r.epoch:>5} {r.stage:<9} {r.train_loss:>8.4f} {r.train_accuracy:>7.4f} {r.val_loss:>9.4f} "
                f"{r.val_accuracy:>8.4f} {lr:>20} {r.seconds:>6.1f}s{mark}")

    def restore_best(self) -> None:
        if self.best_weights is not None:
            for variable, value in zip(self.model.weights, self.best_weights):
                variable.assign(value)
            self.log(f"restored the best weights (epoch {self.best_epoch}, val_accuracy {self.best_accuracy:.4f})")
