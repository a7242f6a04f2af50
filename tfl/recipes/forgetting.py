"""`tfl forgetting`: catastrophic forgetting, measured and mitigated.

The dataset's classes are split into tasks (default: consecutive pairs (0,1), (2,3), ...; --tasks "0,1;2,3" for
any split). Each strategy gets the same fresh model (same backbone, weights, seed and budget) and trains the tasks
one after another, each on its own classes' training rows only, --epochs epochs per task. After every task it is
tested on every task's test rows, seen or not: R[i][j] = accuracy on task j after training task i. The metrics of
R are in tfl.recipes.forgetting_metrics (formulas, and which of Avalanche's and Mammoth's definitions each follows).

Scenarios (the model always has one output per dataset class):
  class-il  one classifier over every class seen so far: the logits of classes of tasks not yet trained are masked
            out (set to -1e9) in training and at test time, which is the same as a head that grows by a task's
            classes when that task starts. A test row counts as right when its class wins among all seen classes,
            so R[i][j] is 0 for every j > i by construction.
  task-il   the task is known: every row's logits are masked to its own task's classes, in training (replayed rows
            to theirs) and at test time (a multi-head model sharing one Dense layer).

Strategies:
  naive   sequential fine-tuning, cross-entropy on the current task only.
  joint   every task's training rows at once, --epochs epochs (each row seen as often as in a sequential run): the
          upper bound. Its R is one row (tested once, after training on everything); only ACC is defined.
  replay  a class-balanced buffer of at most --memory training rows of past tasks (ClassBalancedBuffer); every
          batch is --batch-size current-task rows plus min(--batch-size, buffer size) buffer rows drawn without
          replacement, the loss averaged over both (experience replay as Mammoth's er: a second minibatch from
          the buffer joins every batch). The buffer is updated when a task ends.
  lwf     Learning without Forgetting (Li & Hoiem 2016): when a task ends, the model's logits on the next task's
          training rows are recorded (inference mode); the next task's loss adds
          lwf_alpha * temperature^2 * KL(softmax(old / T) || softmax(new / T)) over the old classes (class-IL: one
          softmax over every old class; task-IL: one per old task).
  ewc     Elastic Weight Consolidation (Kirkpatrick et al. 2017), online form with gamma = 1 (Schwarz et al. 2018):
          after task k the diagonal empirical Fisher F_k = mean over up to FISHER_SAMPLES of the task's training rows
          of (d log p(y|x) / d theta)^2 (masked logits, true labels) is added to F, theta* is set to the weights
          then, and later tasks add ewc_lambda / 2 * sum F (theta - theta*)^2 to the loss (validation loss too).

Frozen backbone (default): every task trains the head on pooled features cached once (tfl.training.boundary;
one backbone pass over train, val and test for the whole run, reused by every strategy and later runs).
--finetune: every task also trains the layers above --freeze-up-to (on their cached boundary activations when
possible), the backbone at --backbone-lr.

Each strategy is a run directory <output_dir>/<strategy>/ (config.json, history.csv with one stage per task,
checkpoints, model.keras with the weights after the last task, forgetting.json). A run interrupted anywhere
resumes exactly: the checkpoint after every epoch holds, besides the trainer's state, the task index, R so far
and the strategy's state (buffer rows, recorded logits, Fisher and anchor weights). <output_dir> gets
forgetting.json (per strategy: tasks, R, metrics, seconds), forgetting.csv (one row per strategy),
accuracy_matrix.csv (one row per R entry), forgetting.png (a heatmap of R per strategy) and accuracy_curves.png
(each task's accuracy as tasks are added), rewritten after every strategy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import ClassVar

import numpy as np

from tfl.errors import UsageError
from tfl.job import Job, JobOptions, Stage
from tfl.options import (CL_SCENARIOS, CL_STRATEGIES, MIXING, SWEEP_RUN, ProxyOptions, check_options as check_fields,
                         option)
from tfl.recipes import forgetting_metrics as cl_metrics, sweep
from tfl.reporting import table
from tfl.reporting.table import Column

FORGETTING_JSON, FORGETTING_CSV, MATRIX_CSV = "forgetting.json", "forgetting.csv", "accuracy_matrix.csv"
FORGETTING_PNG, CURVES_PNG = "forgetting.png", "accuracy_curves.png"
COLUMNS = ("strategy", "scenario", "tasks", "acc", "average_incremental_accuracy", "bwt", "forgetting",
           "min_old_accuracy", "train_seconds", "wall_seconds", "run_dir")
FISHER_SAMPLES = 1024  # rows of a finished task the EWC Fisher is estimated on
FISHER_BATCH = 32  # examples whose per-example gradients are computed at once
MASKED = -1e9  # the logit of a class outside the mask: exp() of it is exactly 0


# -- options ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ForgettingOptions(JobOptions, ProxyOptions):
    unused: ClassVar = ("head_epochs", "label_smoothing", *MIXING, *SWEEP_RUN)
    option_help: ClassVar = {"output_dir": (
        "Where forgetting.json/.csv/.png, accuracy_curves.png and every strategy's run directory (<strategy>/) go "
        "(default: runs/<time>-forgetting-<dataset>). Run again with the same directory to continue an interrupted "
        "run exactly."), "epochs": "Epochs per task."}

    tasks: str | None = option(None, metavar="C,C;C,C;...", help=(
        "The task split: classes (indices or names) separated by ',', tasks by ';', e.g. '0,1;2,3;4,5'. A class "
        "may be in one task only; classes in no task are left out.  [default: consecutive pairs (0,1), (2,3), ...]"))
    scenario: str = option("class-il", choices=CL_SCENARIOS, help=(
        "class-il: one classifier over every class seen so far (unseen classes' logits masked out, as a head that "
        "grows per task). task-il: the task is known, every row's logits are masked to its task's classes, in "
        "training and at test time."))
    strategies: tuple[str, ...] = option(CL_STRATEGIES, choices=CL_STRATEGIES, metavar="S[,S]", help=(
        "naive: sequential fine-tuning. replay: a class-balanced buffer of --memory past examples mixed into every "
        "batch. lwf: Learning without Forgetting, the previous model's outputs on old classes distilled. ewc: "
        "diagonal-Fisher penalty (online). joint: all tasks at once, the upper bound."))
    memory: int = option(500, check="positive", metavar="M", help=(
        "replay: at most M training examples of past tasks, equally many per class."))
    lwf_alpha: float = option(1.0, check="non_negative", help="lwf: weight of the distillation term.")
    temperature: float = option(2.0, check="positive", help=(
        "lwf: softmax temperature of the distillation (Li & Hoiem used 2)."))
    ewc_lambda: float = option(1000.0, check="non_negative", help=(
        "ewc: strength of the penalty lambda/2 * sum F (theta - theta*)^2."))
    finetune: bool = option(False, flag="--finetune/--frozen-backbone", help=(
        "--finetune: every task also trains the layers above --freeze-up-to, the backbone at --backbone-lr. "
        "Default: the backbone stays frozen and every task trains the head on pooled features cached once for the "
        "whole run."))


SWEEP_ONLY = ("strategies",)  # ForgettingOptions' own field: which strategies run, not what one run trains


def strategy_run(opts: ForgettingOptions, number: int, strategy: str, out: str) -> sweep.Run:
    return sweep.Run(f"strategy {number}/{len(dict.fromkeys(opts.strategies))} {strategy} ({opts.scenario})",
                     sweep.derive(opts, output_dir=os.path.join(out, strategy)), sequence(strategy),
                     {"recipe": "forgetting", "continual_strategy": strategy}, SWEEP_ONLY)


def check_options(opts: ForgettingOptions) -> None:
    """The options that need no data, checked before anything is loaded."""
    check_fields(opts)
    if opts.tasks is not None:
        parse_task_tokens(opts.tasks)
    if opts.epochs < 1:
        raise UsageError(f"--epochs {opts.epochs}: every task trains --epochs epochs; give at least 1")
    if (opts.augment != "none" or opts.random_erasing) and "lwf" in opts.strategies:
        raise UsageError("--augment or --random-erasing with lwf: the old model's outputs are recorded once per "
                         "task on unaugmented inputs, so they would not match the augmented images; drop the "
                         "augmentation or lwf")


# -- tasks -----------------------------------------------------------------------------------------------------------
def parse_task_tokens(text: str) -> list[list[str]]:
    """'0,1;2,3' -> [['0', '1'], ['2', '3']]; ValueError for an empty task or a class named twice."""
    tasks = [[token.strip() for token in part.split(",")] for part in text.split(";")]
    for number, task in enumerate(tasks, 1):
        if not any(task) or not all(task):
            raise UsageError(f"--tasks {text!r}: task {number} has an empty class; write classes separated by "
                             "',' and tasks by ';', e.g. '0,1;2,3'")
    seen: dict[str, int] = {}
    for number, task in enumerate(tasks, 1):
        for token in task:
            if token in seen:
                where = f"task {seen[token]} and task {number}" if seen[token] != number else f"task {number} twice"
                raise UsageError(f"--tasks {text!r}: class {token!r} is in {where}; every class may be in one task")
            seen[token] = number
    return tasks


def parse_tasks(text: str | None, class_names: list[str]) -> list[tuple[int, ...]]:
    """The tasks as tuples of class indices. None: consecutive pairs over every class (the last may be single).
    A class is its index or its name; ValueError for an unknown class, an empty task or an overlap."""
    n = len(class_names)
    if text is None:
        return [tuple(range(i, min(i + 2, n))) for i in range(0, n, 2)]
    tasks = []
    for task in parse_task_tokens(text):
        indices = []
        for token in task:
            if token.isdigit() and int(token) < n:
                indices.append(int(token))
            elif token in class_names:
                indices.append(class_names.index(token))
            else:
                raise UsageError(f"--tasks {text!r}: {token!r} is not a class of this dataset; use an index 0..{n - 1} "
                                 f"or a name ({', '.join(class_names[:12])}{', ...' if n > 12 else ''})")
        tasks.append(tuple(indices))
    flat = [c for task in tasks for c in task]
    if len(set(flat)) != len(flat):  # a class given once by index and once by name
        twice = next(c for c in flat if flat.count(c) > 1)
        raise UsageError(f"--tasks {text!r}: class {twice} ({class_names[twice]}) is named twice; every class may be "
                         "in one task")
    return tasks


def task_masks(tasks, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(own [T, C], seen [T, C]) float32: own[t] marks task t's classes, seen[t] those of tasks 0..t."""
    own = np.zeros((len(tasks), num_classes), np.float32)
    for t, classes in enumerate(tasks):
        own[t, list(classes)] = 1.0
    return own, np.minimum(np.cumsum(own, axis=0), 1.0).astype(np.float32)


def row_masks(scenario: str, labels: np.ndarray, task_of: np.ndarray, own: np.ndarray, seen_row: np.ndarray):
    """The logit mask of every row of a split: class-IL the classes seen so far (one row for all), task-IL the
    classes of the row's own task (zeros for classes in no task)."""
    if scenario == "class-il":
        return np.broadcast_to(seen_row, (len(labels), own.shape[1]))
    tasks = task_of[labels]
    return np.where((tasks >= 0)[:, None], own[np.maximum(tasks, 0)], 0.0).astype(np.float32)


# -- replay buffer ---------------------------------------------------------------------------------------------------
class ClassBalancedBuffer:
    """At most `memory` training rows, shared as equally as possible among the classes seen: with n classes each
    keeps memory // n rows, and the first memory % n classes (by index) one more, unless a class has fewer rows.
    Each class's rows are put in a seeded random order once, when its task ends; a smaller share keeps a prefix of
    that order, so a dropped row never comes back and the kept ones stay."""

    def __init__(self, memory: int, seed: int):
        self.memory, self.seed = memory, seed
        self.order: dict[int, np.ndarray] = {}  # class -> its rows in the buffer's order (at most `memory`)

    def add(self, rows: np.ndarray, labels: np.ndarray) -> None:
        """The rows of a finished task; `labels` is the split's labels (row-aligned with its indices)."""
        rows = np.asarray(rows, np.int64)
        for c in sorted(set(labels[rows].tolist())):
            mine = rows[labels[rows] == c]
            rng = np.random.default_rng([self.seed, c])
            self.order[int(c)] = rng.permutation(mine)[: self.memory]

    def quota(self) -> dict[int, int]:
        classes = sorted(self.order)
        if not classes:
            return {}
        base, extra = divmod(self.memory, len(classes))
        return {c: min(base + (i < extra), len(self.order[c])) for i, c in enumerate(classes)}

    def rows(self) -> np.ndarray:
        quota = self.quota()
        parts = [self.order[c][: quota[c]] for c in sorted(quota)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def state(self) -> tuple[dict, dict]:
        return {"classes": sorted(self.order)}, {f"buffer.{c}": rows for c, rows in self.order.items()}

    def load(self, state: dict, arrays: dict) -> None:
        self.order = {int(c): np.asarray(arrays[f"buffer.{c}"], np.int64) for c in state["classes"]}


# -- the loss and metric hooks ---------------------------------------------------------------------------------------
MASK, TASK, OLD_LOGITS = "mask", "task", "old_logits"


def masked_logits(logits, mask):
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    return tf.where(tf.cast(mask, tf.float32) > 0, logits, tf.constant(MASKED, tf.float32))


class MaskedCrossEntropy:
    """Cross-entropy of the logits masked to batch[MASK] (see the scenarios) against the labels."""

    def __call__(self, batch, logits):
        import tensorflow as tf

        from tfl.data.pipeline import LABEL

        return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(batch[LABEL], tf.int32),
                                                              masked_logits(logits, batch[MASK]))


def no_loss(batch, logits):
    """The test pass's loss hook: none (a class-IL test row of an untrained task has its own class masked out, so
    its cross-entropy would be ~1e9; only accuracies are reported)."""
    import tensorflow as tf

    return tf.zeros(tf.shape(logits)[:1], tf.float32)


def masked_accuracy(batch, logits) -> dict:
    import tensorflow as tf

    from tfl.data.pipeline import LABEL

    predicted = tf.argmax(masked_logits(logits, batch[MASK]), -1, output_type=tf.int32)
    return {"accuracy": tf.cast(tf.equal(predicted, tf.cast(batch[LABEL], tf.int32)), tf.float32)}


class PerTaskAccuracy:
    """Metrics hook for the test pass: hits and rows of each task, whose means' ratio is the task's accuracy."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    def __call__(self, batch, logits) -> dict:
        import tensorflow as tf

        hit = masked_accuracy(batch, logits)["accuracy"]
        task = tf.cast(batch[TASK], tf.int32)
        out = {"accuracy": hit}
        for t in range(self.num_tasks):
            mine = tf.cast(tf.equal(task, t), tf.float32)
            out[f"hits{t}"], out[f"rows{t}"] = hit * mine, mine
        return out


class Distillation(MaskedCrossEntropy):
    """LwF: masked cross-entropy plus alpha * T^2 * KL(old || new) at temperature T within each group of old
    classes (class masks [G, C]); the plain masked cross-entropy on batches without recorded outputs (validation)."""

    def __init__(self, groups: np.ndarray, alpha: float, temperature: float):
        self.groups, self.alpha, self.temperature = np.asarray(groups, np.float32), alpha, temperature

    def __call__(self, batch, logits):
        import tensorflow as tf

        loss = super().__call__(batch, logits)
        if OLD_LOGITS not in batch:  # validation and test rows: recorded outputs exist for training rows only
            return loss
        t = self.temperature
        for mask in self.groups:
            mask = tf.constant(mask)[None, :]
            old = masked_logits(tf.cast(batch[OLD_LOGITS], tf.float32) / t, mask)
            new = masked_logits(tf.cast(logits, tf.float32) / t, mask)
            p_old = tf.nn.softmax(old)
            kl = tf.reduce_sum(p_old * (tf.nn.log_softmax(old) - tf.nn.log_softmax(new)), axis=-1)
            loss += self.alpha * t * t * kl
        return loss


class ElasticPenalty(MaskedCrossEntropy):
    """EWC: masked cross-entropy plus lambda / 2 * sum F (theta - theta*)^2 (the same on every example, so the
    batch mean adds it once)."""

    def __init__(self, variables, fisher, anchor, lam: float):
        import tensorflow as tf

        self.variables, self.lam = list(variables), lam
        self.fisher = [tf.constant(f, tf.float32) for f in fisher]
        self.anchor = [tf.constant(a, tf.float32) for a in anchor]

    def __call__(self, batch, logits):
        import tensorflow as tf

        loss = super().__call__(batch, logits)
        penalty = tf.add_n([tf.reduce_sum(f * tf.square(tf.cast(v, tf.float32) - a))
                            for v, f, a in zip(self.variables, self.fisher, self.anchor)])
        return loss + 0.5 * self.lam * penalty


def diagonal_fisher(model, variables, batches) -> list[np.ndarray]:
    """mean over the batches' rows of (d log p(label | x) / d v)^2 for every variable v, p the softmax of the
    model's logits masked to the row's batch[MASK], the model in inference mode."""
    import tensorflow as tf

    from tfl.data.pipeline import LABEL
    from tfl.training.trainer import model_inputs

    @tf.function
    def squared_grads(batch):
        with tf.GradientTape() as tape:
            logits = masked_logits(model(model_inputs(batch), training=False), batch[MASK])
            log_p = -tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(batch[LABEL], tf.int32), logits)
        # Per-example gradients (the Fisher needs them, not the batch mean's), vectorised by the jacobian.
        return [tf.reduce_sum(tf.square(j), axis=0) for j in tape.jacobian(log_p, variables)]

    total, rows = [np.zeros(v.shape, np.float32) for v in variables], 0
    for batch in batches:
        for t, g in zip(total, squared_grads(batch)):
            t += g.numpy()
        rows += int(batch[LABEL].shape[0])
    return [t / max(rows, 1) for t in total]


# -- one strategy's task sequence ------------------------------------------------------------------------------------
@dataclasses.dataclass
class SequenceState:
    """What a checkpoint holds of the sequence besides the trainer's state."""

    done: int = 0  # training tasks finished, tested and folded into the strategy's state
    R: list = dataclasses.field(default_factory=list)
    seconds: list = dataclasses.field(default_factory=list)  # per training task: train + test + strategy update
    buffer: ClassBalancedBuffer | None = None
    old_logits: np.ndarray | None = None  # lwf: [train rows, C], the rows of the running task filled
    fisher: list | None = None  # ewc: one array per trained variable
    anchor: list | None = None

    def to_checkpoint(self) -> tuple[dict, dict]:
        state = {"done": self.done, "R": self.R, "seconds": self.seconds}
        arrays = {}
        if self.buffer is not None:
            buffer_state, buffer_arrays = self.buffer.state()
            state["buffer"] = buffer_state
            arrays.update(buffer_arrays)
        if self.old_logits is not None:
            arrays["old_logits"] = self.old_logits
        if self.fisher is not None:
            state["fisher"] = len(self.fisher)
            arrays.update({f"fisher.{i:05d}": f for i, f in enumerate(self.fisher)})
            arrays.update({f"anchor.{i:05d}": a for i, a in enumerate(self.anchor)})
        return state, arrays

    def load(self, state: dict, arrays: dict) -> None:
        arrays = {k[len("recipe."):]: v for k, v in arrays.items() if k.startswith("recipe.")}
        self.done, self.R, self.seconds = state["done"], state["R"], state["seconds"]
        if "buffer" in state and self.buffer is not None:
            self.buffer.load(state["buffer"], arrays)
        if "old_logits" in arrays:
            self.old_logits = arrays["old_logits"]
        if "fisher" in state:
            self.fisher = [arrays[f"fisher.{i:05d}"] for i in range(state["fisher"])]
            self.anchor = [arrays[f"anchor.{i:05d}"] for i in range(state["fisher"])]


class Sequence:
    """One strategy on one Job: train the tasks in order, test after each, keep the strategy's state."""

    def __init__(self, job: Job, strategy: str):
        from tfl.freezing import head_only_plan
        from tfl.training import boundary

        opts = self.opts = job.opts
        self.job, self.name, self.scenario = job, strategy, opts.scenario
        self.tasks = parse_tasks(opts.tasks, job.class_names)
        self.C = len(job.class_names)
        self.own, self.seen = task_masks(self.tasks, self.C)
        self.per_task = PerTaskAccuracy(len(self.tasks))  # one object: the test pass is traced once
        self.task_of = np.full(self.C, -1, np.int64)
        for t, classes in enumerate(self.tasks):
            self.task_of[list(classes)] = t
        # The training tasks: the tasks themselves, or for joint one task holding all of them.
        self.training = [sorted(c for task in self.tasks for c in task)] if self.name == "joint" else \
            [list(task) for task in self.tasks]
        plan = job.plan if opts.finetune else head_only_plan(job.plan)
        lrs = {"backbone": job.backbone_lr, "head": job.lr} if opts.finetune else {"head": job.lr}
        self.stage = Stage("tasks", plan, opts.epochs, lrs)
        config = {"tasks": [list(t) for t in self.tasks], "training_tasks": self.training}
        job.prepare([self.stage], config=config, loss=MaskedCrossEntropy(), metrics=masked_accuracy)
        splits = job.splits
        self.test_split = "test" if splits.test is not None else "val"
        if self.test_split == "test":
            job.inputs.add_split("test", splits.test, splits.num_examples["test"],
                                 boundary.data_identity(splits.fingerprint, "test"))
        self.state = SequenceState(buffer=ClassBalancedBuffer(opts.memory, opts.seed) if self.name == "replay"
                                   else None)
        if job.snapshot is not None and "recipe" in job.snapshot.state:
            self.state.load(job.snapshot.state["recipe"], job.snapshot.arrays)
        job.trainer.recipe_state = self.state.to_checkpoint
        self.labels = None  # split -> the labels of its rows, once the first task is fed

    # -- data ------------------------------------------------------------------------------------------------------
    def _feed(self, feed, groups) -> None:
        """What the stage trains and is tested on (the same every task: Stage.inputs is the one prepared stage)."""
        self.groups, self.boundary = groups, feed.boundary
        self.eval_model = feed.eval_model  # None: the classifier on images
        if self.labels is None:
            self.labels = {split: np.asarray(self.job.inputs.labels(split, self.boundary))
                           for split in dict.fromkeys(("train", "val", self.test_split))}

    def rows(self, split: str, classes) -> np.ndarray:
        return np.flatnonzero(np.isin(self.labels[split], list(classes))).astype(np.int64)

    def columns(self, split: str, seen_row: np.ndarray) -> dict:
        labels = self.labels[split]
        columns = {MASK: row_masks(self.scenario, labels, self.task_of, self.own, seen_row),
                   TASK: self.task_of[labels].astype(np.int32)}
        if split == "train" and self.state.old_logits is not None:
            columns[OLD_LOGITS] = self.state.old_logits
        return columns

    def ordered(self, split: str, rows: np.ndarray, seen_row: np.ndarray):
        """`rows` of `split` in order, in batches of the global batch (the last one partial)."""
        import tensorflow as tf

        batch = self.job.batch
        order = tf.data.Dataset.from_tensor_slices(np.asarray(rows, np.int64)).batch(batch)
        batches = self.job.inputs.batches(split, self.boundary, order, self.columns(split, seen_row))
        return batches, -(-len(rows) // batch)

    def train_order(self, rows: np.ndarray, epoch: int):
        """Epoch `epoch`'s index batches: a permutation of the task's rows in full batches, each followed by
        min(batch, buffer) replayed rows drawn without replacement; all seeded by (seed, epoch)."""
        import tensorflow as tf

        from tfl.training.trainer import epoch_seed

        batch = self.job.batch
        rng = np.random.default_rng(epoch_seed(self.opts.seed, epoch))
        steps = len(rows) // batch
        index = rng.permutation(rows)[: steps * batch].reshape(steps, batch)
        memory = self.state.buffer.rows() if self.state.buffer is not None else np.zeros(0, np.int64)
        if len(memory):
            take = min(batch, len(memory))
            picks = np.argsort(rng.random((steps, len(memory))), axis=1)[:, :take]
            index = np.concatenate([index, memory[picks]], axis=1)
        return tf.data.Dataset.from_tensor_slices(index.astype(np.int64))

    # -- the sequence ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """One stage per training task on the prepared stage's inputs; Job.train runs them, `task` sets each
        up (rows, loss, batches) and `tested` follows it (R, the strategy's state)."""
        from tfl.training.trainer import StagePolicy

        stages = [dataclasses.replace(self.stage, name=f"task{k + 1}", policy=StagePolicy(), inputs=self.stage.name)
                  for k in range(len(self.training))]
        self.index = {stage.name: k for k, stage in enumerate(stages)}
        self.job.train(stages, adapt=self.task, after=self.tested)
        return self.finish()

    def task(self, stage, feed, groups) -> dict:
        """Task k's rows, loss and batches: every batch the task's rows plus replayed ones (see train_order)."""
        job, state, k = self.job, self.state, self.index[stage.name]
        if k < state.done:  # finished before the resume: the trainer skips it
            return {}
        self.started = time.time()
        self._feed(feed, groups)
        classes = self.training[k]
        seen_row = self.seen[-1] if self.name == "joint" else self.seen[k]
        rows = self.rows("train", classes)
        steps = len(rows) // job.batch
        if steps < 1:
            raise UsageError(f"task {k + 1} (classes {classes}) has {len(rows)} training examples, fewer than the "
                             f"global batch of {job.batch}; lower --batch-size")
        memory = len(state.buffer.rows()) if state.buffer is not None else 0
        job.trainer.loss_fn = self.loss(k)
        job.trainer.metrics_fn = masked_accuracy
        val_classes = [c for task in self.training[: k + 1] for c in task]
        val, val_steps = self.ordered("val", self.rows("val", val_classes), seen_row)
        columns = self.columns("train", seen_row)

        def train_batches(epoch):
            return job.inputs.batches("train", self.boundary, self.train_order(rows, epoch), columns, epoch)

        job.log(f"forgetting: {self.name}, task {k + 1}/{len(self.training)}: classes "
                f"{', '.join(map(str, classes))}, {len(rows)} training rows" +
                (f" + {min(job.batch, memory)} of {memory} buffer rows in every batch" if memory else ""))
        self.current = (rows, seen_row)
        return {"train": train_batches, "val": val, "steps": steps, "batch": job.batch + min(job.batch, memory),
                "val_steps": val_steps}

    def tested(self, stage) -> None:
        """After task k: R's row k (every task's test rows), then the strategy's update (buffer, logits, Fisher)."""
        state, k = self.state, self.index[stage.name]
        if k < state.done:
            return
        rows, seen_row = self.current
        state.R.append(self.test(seen_row))
        self.job.log(f"forgetting: {self.name} after task {k + 1}: test accuracy per task "
                     + " ".join(f"{a:.4f}" for a in state.R[-1]))
        self.after_task(k, rows)
        state.seconds.append(round(time.time() - self.started, 2))
        state.done = k + 1

    def loss(self, k: int):
        if self.name == "lwf" and k > 0:
            if self.scenario == "class-il":
                groups = self.seen[k - 1][None, :]
            else:
                groups = self.own[:k]
            return Distillation(groups, self.opts.lwf_alpha, self.opts.temperature)
        if self.name == "ewc" and self.state.fisher is not None:
            variables = [v for g in self.groups for v in g.variables]
            return ElasticPenalty(variables, self.state.fisher, self.state.anchor, self.opts.ewc_lambda)
        return MaskedCrossEntropy()

    def test(self, seen_row: np.ndarray) -> list[float]:
        """Accuracy on every task's test rows, under the scenario's masks."""
        rows = self.rows(self.test_split, [c for task in self.tasks for c in task])
        data, steps = self.ordered(self.test_split, rows, seen_row)
        result = self.job.trainer.evaluate_all(data, self.test_split, steps, self.eval_model,
                                               loss=no_loss, metrics=self.per_task)
        return [round(result[f"hits{t}"] / result[f"rows{t}"], 6) if result[f"rows{t}"] else math.nan
                for t in range(len(self.tasks))]

    def after_task(self, k: int, rows: np.ndarray) -> None:
        state = self.state
        if self.name == "replay":
            state.buffer.add(rows, self.labels["train"])
        elif self.name == "lwf" and k + 1 < len(self.training):
            nxt = self.rows("train", self.training[k + 1])
            logits = np.zeros((len(self.labels["train"]), self.C), np.float32)
            logits[nxt] = self.predict("train", nxt)
            state.old_logits = logits
        elif self.name == "ewc" and k + 1 < len(self.training):
            fisher = self.fisher(rows, self.seen[k])
            state.fisher = fisher if state.fisher is None else [a + b for a, b in zip(state.fisher, fisher)]
            state.anchor = [np.array(v.numpy(), np.float32) for g in self.groups for v in g.variables]

    def _model(self):
        return self.eval_model or self.job.model

    def predict(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Logits of the model in inference mode on `rows` of `split`, in their order."""
        from tfl.training.trainer import model_inputs

        data, _ = self.ordered(split, rows, self.seen[-1])
        model = self._model()
        return np.concatenate([np.asarray(model(model_inputs(b), training=False), np.float32) for b in data])

    def fisher(self, rows: np.ndarray, seen_row: np.ndarray) -> list[np.ndarray]:
        """Diagonal empirical Fisher of the trained variables on up to FISHER_SAMPLES of `rows` (seeded)."""
        import tensorflow as tf

        rng = np.random.default_rng([self.opts.seed, len(self.state.R)])
        picked = np.sort(rng.choice(rows, min(FISHER_SAMPLES, len(rows)), replace=False))
        order = tf.data.Dataset.from_tensor_slices(picked).batch(FISHER_BATCH)
        data = self.job.inputs.batches("train", self.boundary, order, self.columns("train", seen_row))
        return diagonal_fisher(self._model(), [v for g in self.groups for v in g.variables], data)

    def finish(self) -> dict:
        """model.keras with the weights after the last task, metrics.json with R's metrics, forgetting.json."""
        state = self.state
        metrics = (cl_metrics.summary(state.R) if self.name != "joint"
                   else {**dict.fromkeys(("acc", "average_incremental_accuracy", "bwt", "forgetting",
                                          "min_old_accuracy")), "per_task_forgetting": [],
                         "acc": round(float(np.mean(state.R[-1])), 6)})
        train_seconds = round(sum(state.seconds), 1)
        run = self.job.finish(score=lambda job: {**metrics, "train_seconds": train_seconds}, best=False)["run_dir"]
        result = {"strategy": self.name, "scenario": self.scenario, "tasks": [list(t) for t in self.tasks],
                  "training_tasks": self.training, "R": state.R, "metrics": metrics,
                  "task_seconds": state.seconds, "train_seconds": train_seconds,
                  "epochs_per_task": self.opts.epochs, "run_dir": run}
        self.job.run_dir.write_json(FORGETTING_JSON, {k: v for k, v in result.items() if k != "run_dir"})
        return result


def sequence(strategy: str):
    """The recipe of one strategy's run (jobs.run calls it with the set-up Job)."""
    return lambda job: Sequence(job, strategy).run()


# -- every strategy ----------------------------------------------------------------------------------------------------
def forgetting(opts: ForgettingOptions, log=print) -> dict:
    """Train every strategy through the task sequence; returns what forgetting.json holds, plus output_dir."""
    check_options(opts)
    from tfl.training import rundir

    out = opts.output_dir or rundir.default_path("forgetting", opts.dataset)
    result = {"output_dir": out, "settings": {"options": dataclasses.asdict(opts)}, "strategies": []}
    runs = [strategy_run(opts, number, name, out) for number, name in enumerate(dict.fromkeys(opts.strategies), 1)]
    sweep.sweep(runs, out, result, TABLES, log, "forgetting", key="strategies")
    log(f"forgetting: wrote {os.path.join(out, FORGETTING_JSON)}, {FORGETTING_CSV}, {MATRIX_CSV}, {FORGETTING_PNG} "
        f"and {CURVES_PNG}")
    return result


def strategy_rows(result: dict) -> list[dict]:
    """One row per strategy: its metrics of R."""
    return [{"strategy": run["strategy"], "scenario": run["scenario"],
             "tasks": ";".join(",".join(map(str, t)) for t in run["tasks"]),
             **{k: run["metrics"][k] for k in ("acc", "average_incremental_accuracy", "bwt", "forgetting",
                                               "min_old_accuracy")},
             "train_seconds": run["train_seconds"], "wall_seconds": run.get("wall_seconds"), "run_dir": run["run_dir"]}
            for run in result["strategies"]]


def matrix_rows(result: dict) -> list[dict]:
    """One row per entry of every strategy's R."""
    return [{"strategy": run["strategy"], "after_task": i + 1, "task": j + 1, "accuracy": value}
            for run in result["strategies"] for i, row in enumerate(run["R"]) for j, value in enumerate(row)]


def write_figures(folder, result: dict) -> None:
    from tfl.reporting.figures import write_accuracy_curves, write_forgetting_heatmaps

    runs = result["strategies"]
    title = f"{result['settings']['options']['backbone']}, {runs[0]['scenario']}" if runs else None
    write_forgetting_heatmaps(runs, folder.file(FORGETTING_PNG), title=title)
    write_accuracy_curves(runs, folder.file(CURVES_PNG), title=title)


TABLES = sweep.Tables(FORGETTING_JSON, {FORGETTING_CSV: (COLUMNS, strategy_rows),
                                        MATRIX_CSV: (("strategy", "after_task", "task", "accuracy"), matrix_rows)},
                      write_figures)


TABLE = (Column("strategy", "strategy"), *(Column(title, key, ".4f") for title, key in (
    ("ACC", "acc"), ("AIA", "average_incremental_accuracy"), ("BWT", "bwt"), ("forget", "forgetting"),
    ("min old", "min_old_accuracy"))), Column("train s", "train_seconds", ".1f"),
    Column("wall s", "wall_seconds", ".1f"))


def format_table(result: dict) -> str:
    return table.format_table(TABLE, strategy_rows(result))
