"""`tfl multitask`: multi-task learning with hard or soft parameter sharing, against single-task models.

Tasks come from a JSON label map, task -> dataset class -> that task's label, e.g. Fashion-MNIST's ten classes as
one task and a coarse task (tops / bottoms / footwear / bags) as another (tfl/assets/fashion_mnist_tasks.json, the
default for fashion_mnist). A task's classes are its distinct labels in the order they first appear; a dataset class
a task does not map is left out of that task's loss and accuracy. --task-weight NAME=W weighs the tasks' losses
(default 1 each): loss = sum_t w_t * CE_t (+ the soft-sharing penalty).

As in tfl dann, the pretrained backbone is frozen and shared by every task; its pooled features are cached once.
What trains is a block above it, --head-hidden units (default 256, ReLU) after --dropout, and one Dense head per
task. Arms, on the same batches, seed and epoch budget (--head-epochs; --epochs is not used):
  hard    one shared block, a head per task (hard parameter sharing)
  soft    a block per task, a head per task, and soft_penalty * sum over corresponding layers of every pair of
          tasks of ||W_a - W_b||^2 (kernels and biases) pulling the blocks together (soft parameter sharing)
  single  one run per task: the block and that task's head trained on that task alone (the baselines)
Every run keeps its weights after the last epoch (the same budget for every arm; no selection on validation).

<output_dir>/<arm>[_<task>]/seed<S>/ is a run directory (config.json, history.csv with each task's accuracy,
curves.png, checkpoints, metrics.json); <output_dir> gets multitask.json, multitask.csv (one row per run and task)
and multitask.png (test accuracy per task and arm), rewritten after every run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import ClassVar

import numpy as np

from tfl.errors import UsageError
from tfl.job import Job, JobOptions
from tfl.options import AUGMENTATION, FROZEN_BACKBONE, SWEEP_RUN, option
from tfl.recipes import pooled, sweep

MULTITASK_JSON, MULTITASK_CSV, MULTITASK_PNG = "multitask.json", "multitask.csv", "multitask.png"
ARMS = ("hard", "soft", "single")
DEFAULT_BLOCK = (256,)
FASHION_MNIST_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                   "fashion_mnist_tasks.json")
TASK_NAME = re.compile(r"[A-Za-z0-9_]+")
COLUMNS = ("arm", "seed", "task", "test_accuracy", "task_weight", "trainable_params", "train_seconds", "run_dir")


@dataclasses.dataclass
class MultitaskOptions(JobOptions):
    unused: ClassVar = ("epochs", *FROZEN_BACKBONE, "backbone_lr", *AUGMENTATION, *SWEEP_RUN)
    option_help: ClassVar = {"output_dir": (
        "Where multitask.json/.csv/.png and every run directory (<arm>[_<task>]/seed<S>/) go (default: "
        "runs/<time>-multitask-<dataset>)."),
        "head_epochs": "Epochs of every run (the block above the frozen backbone and the heads)."}

    tasks: str | None = option(None, metavar="FILE.json", help=(
        "The label map: a JSON object task -> dataset class -> that task's label. A class a task leaves out is not "
        "in its loss or accuracy.  [default for fashion_mnist: tfl/assets/fashion_mnist_tasks.json, the 10 classes "
        "(fine) and tops/bottoms/footwear/bags (coarse)]"))
    task_weights: tuple[tuple[str, float], ...] = option((), flag="--task-weight", repeat=True, parse="task_weights",
                                                         metavar="TASK=W", show_default=False, help=(
        "The weight of TASK's loss (repeatable; default 1 each)."))
    arms: tuple[str, ...] = option(ARMS, choices=ARMS, metavar="ARM[,ARM]", help=(
        "hard: one shared block above the frozen backbone, a head per task. soft: a block per task with an L2 "
        "penalty pulling corresponding layers together. single: one model per task, trained alone."))
    soft_penalty: float = option(0.01, check="non_negative", metavar="L", help=(
        "soft: L * sum over corresponding layers and task pairs of ||W_a - W_b||^2."))
    seeds: int = option(1, check="positive", metavar="N", help=(
        "Every run repeats with seeds --seed, --seed+1, ...; the table gives mean ± sd."))


SWEEP_ONLY = ("arms", "seeds")  # MultitaskOptions' own fields: which runs, not what one run trains


# -- tasks ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    name: str
    labels: list  # the task's classes, in order of first appearance in the map
    table: np.ndarray  # int32 [dataset classes]: the task label's index, -1 where the task leaves the class out

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def read_label_map(path: str) -> dict:
    """{task: {dataset class: label}} from a JSON file, shape-checked (ValueError naming the problem)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError as err:
        raise UsageError(f"--tasks {path!r}: cannot read it ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--tasks {path!r}: not valid JSON ({err})") from None
    if not isinstance(value, dict) or not value:
        raise UsageError(f"--tasks {path!r}: expected an object {{task: {{class: label}}}}, e.g. "
                         f"{FASHION_MNIST_TASKS}")
    for task, mapping in value.items():
        if not TASK_NAME.fullmatch(task):
            raise UsageError(f"--tasks {path!r}: task name {task!r} must be letters, digits and _ (it names metrics "
                             "and layers)")
        if not isinstance(mapping, dict) or not mapping:
            raise UsageError(f"--tasks {path!r}: task {task!r} must map class names to labels, got {mapping!r}")
        bad = [k for k, v in mapping.items() if not isinstance(v, (str, int)) or isinstance(v, bool)]
        if bad:
            raise UsageError(f"--tasks {path!r}: task {task!r} maps {', '.join(map(repr, bad[:3]))} to something "
                             "other than a string or integer label")
    return value


def make_tasks(label_map: dict, class_names: list, path: str = "--tasks") -> list[Task]:
    tasks = []
    names = list(class_names)
    for task, mapping in label_map.items():
        unknown = [c for c in mapping if c not in names]
        if unknown:
            raise UsageError(f"--tasks {path!r}: task {task!r} names classes the dataset does not have: "
                             f"{', '.join(map(repr, unknown[:5]))} (it has {', '.join(names)})")
        labels = list(dict.fromkeys(str(v) for v in mapping.values()))
        if len(labels) < 2:
            raise UsageError(f"--tasks {path!r}: task {task!r} has {len(labels)} label(s); a task needs at least 2")
        table = np.full(len(names), -1, np.int32)
        for cls, label in mapping.items():
            table[names.index(cls)] = labels.index(str(label))
        tasks.append(Task(task, labels, table))
    return tasks


def default_tasks_path(opts) -> str:
    if opts.tasks:
        return opts.tasks
    if opts.dataset == "fashion_mnist":
        return FASHION_MNIST_TASKS
    raise UsageError(f"--tasks is required for --dataset {opts.dataset!r}: a JSON file {{task: {{class: label}}}} "
                     f"(see {FASHION_MNIST_TASKS})")


def task_weights(opts, names) -> dict:
    weights = dict(opts.task_weights)
    unknown = [t for t in weights if t not in names]
    if unknown:
        raise UsageError(f"--task-weight {', '.join(unknown)}: no such task; the tasks are {', '.join(names)}")
    bad = [t for t, w in weights.items() if not w >= 0]
    if bad or (weights and not any(weights.get(t, 1.0) > 0 for t in names)):
        raise UsageError(f"--task-weight: weights must be >= 0 and at least one > 0 (got {weights})")
    return {t: float(weights.get(t, 1.0)) for t in names}


# -- the model, the loss, the metrics ------------------------------------------------------------------------------
def build_block(width: int, tasks: list[Task], sharing: str, hidden: tuple, dropout: float):
    """(model: pooled features -> {task: logits}, penalty layer groups): hard = one block for all, soft = one per
    task, each group holding the corresponding Dense layers of every task's block."""
    import keras

    inputs = keras.Input(shape=(width,), name="pooled_features")
    x = keras.layers.Dropout(dropout, name="block_dropout")(inputs)
    outputs, groups = {}, [[] for _ in hidden]
    if sharing == "hard":
        h = x
        for i, units in enumerate(hidden, 1):
            h = keras.layers.Dense(units, activation="relu", name=f"shared_hidden{i}")(h)
        for k, task in enumerate(tasks):
            outputs[task.name] = keras.layers.Dense(task.num_classes, name=f"task{k}_logits", dtype="float32")(h)
        return keras.Model(inputs, outputs, name="multitask_hard"), []
    for k, task in enumerate(tasks):
        h = x
        for i, units in enumerate(hidden, 1):
            layer = keras.layers.Dense(units, activation="relu", name=f"task{k}_hidden{i}")
            h = layer(h)
            groups[i - 1].append(layer)
        outputs[task.name] = keras.layers.Dense(task.num_classes, name=f"task{k}_logits", dtype="float32")(h)
    return keras.Model(inputs, outputs, name="multitask_soft"), groups


def soft_penalty(groups) -> object:
    """sum over layer groups, over pairs of tasks, of ||kernel_a - kernel_b||^2 + ||bias_a - bias_b||^2."""
    import tensorflow as tf

    terms = []
    for layers in groups:
        for a in range(len(layers)):
            for b in range(a + 1, len(layers)):
                for va, vb in zip(layers[a].trainable_variables, layers[b].trainable_variables):
                    terms.append(tf.reduce_sum(tf.square(tf.cast(va, tf.float32) - tf.cast(vb, tf.float32))))
    return tf.add_n(terms) if terms else tf.constant(0.0)


class MultiTaskLoss:
    """Per example: sum_t w_t * CE_t (0 where task t leaves the row's class out), + the soft penalty (the same on
    every example, so the batch mean adds it once)."""

    def __init__(self, tasks: list[Task], weights: dict, label_smoothing: float = 0.0, groups=(), penalty=0.0):
        self.tasks, self.weights, self.label_smoothing = tasks, weights, label_smoothing
        self.groups, self.penalty = list(groups), float(penalty)

    def __call__(self, batch, outputs):
        import keras
        import tensorflow as tf

        from tfl.data.pipeline import LABEL

        total = 0.0
        for task in self.tasks:
            y = tf.gather(tf.constant(task.table), tf.cast(batch[LABEL], tf.int32))
            valid = tf.cast(y >= 0, tf.float32)
            onehot = tf.one_hot(tf.maximum(y, 0), task.num_classes)
            ce = keras.losses.categorical_crossentropy(onehot, tf.cast(outputs[task.name], tf.float32),
                                                       from_logits=True, label_smoothing=self.label_smoothing)
            total += self.weights[task.name] * valid * ce
        if self.groups and self.penalty:
            total += self.penalty * soft_penalty(self.groups)
        return total


class TaskMetrics:
    """<task>_accuracy per task (0 on rows the task leaves out), and accuracy: their mean."""

    def __init__(self, tasks: list[Task]):
        self.tasks = tasks

    def __call__(self, batch, outputs) -> dict:
        import tensorflow as tf

        from tfl.data.pipeline import LABEL

        out = {}
        for task in self.tasks:
            y = tf.gather(tf.constant(task.table), tf.cast(batch[LABEL], tf.int32))
            hit = tf.equal(tf.argmax(outputs[task.name], -1, output_type=tf.int32), y)
            out[f"{task.name}_accuracy"] = tf.cast(hit, tf.float32)
        out["accuracy"] = tf.add_n(list(out.values())) / float(len(self.tasks))
        return out


def task_accuracy(task: Task, logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy over the rows whose class the task maps."""
    y = task.table[labels]
    keep = y >= 0
    return round(float(np.mean(np.argmax(logits[keep], -1) == y[keep])), 6) if keep.any() else float("nan")


# -- one run ---------------------------------------------------------------------------------------------------------
def run_recipe(arm: str, task_names: tuple):
    return lambda job: train_run(job, arm, task_names)


def train_run(job: Job, arm: str, task_names: tuple) -> dict:
    from tfl.training.boundary import data_identity
    from tfl.training.trainer import ParamGroup

    opts = job.opts
    started = time.time()
    path = default_tasks_path(opts)
    every = make_tasks(read_label_map(path), job.class_names, path)
    tasks = [t for t in every if t.name in task_names]
    weights = task_weights(opts, [t.name for t in tasks])
    stage = pooled.head_stage(job, arm, opts.head_epochs)
    sharing = "soft" if arm == "soft" else "hard"
    with job.strategy.scope():
        model, groups = build_block(pooled.feature_width(job), tasks, sharing, opts.head_hidden, opts.dropout)
    variables = model.trainable_variables
    loss = MultiTaskLoss(tasks, weights, opts.label_smoothing, groups, opts.soft_penalty if sharing == "soft" else 0)
    metrics = TaskMetrics(tasks)
    job.prepare([stage], config={"task_labels": {t.name: t.labels for t in tasks}}, loss=loss, metrics=metrics)
    # Every variable of the block, not only the trained ones: the dropout's seed-generator state too, so a resumed
    # run draws the same dropout masks as an uninterrupted one.
    pooled.keep_in_checkpoints(job, variables + model.non_trainable_variables)
    params = int(sum(np.prod(v.shape) for v in variables))
    described = ", ".join(f"{t.name} ({t.num_classes} classes, weight {weights[t.name]:g})" for t in tasks)

    def block(stage, feed, groups) -> dict:  # the block on the stage's pooled features, one group at --lr
        pooled.check_pooled(feed)
        job.log(f"multitask: {arm}, tasks {described}, {params:,} trainable parameters")
        return {"model": model, "groups": [ParamGroup("tasks", variables, job.lr)], "eval_model": model,
                "trainable": ["head"]}

    job.train([stage], adapt=block)
    splits = job.splits

    def score(job) -> dict:  # the block after its last epoch, per task, through its pooled predictions
        if splits.test is not None:
            test = pooled.features(job, "test", splits.test, splits.num_examples["test"],
                                   data_identity(splits.fingerprint, "test"))
        else:
            test = pooled.features(job, "val")
        scores = {task.name: task_accuracy(task, pooled.predict(model, test, job.batch, task.name), test.labels)
                  for task in tasks}
        return {"arm": arm, "seed": opts.seed, "tasks": [t.name for t in tasks], "test_accuracy": scores,
                "task_weights": weights, "trainable_params": params, "epochs_run": len(job.trainer.history),
                "eval_split": "test" if splits.test is not None else "val",
                "train_seconds": round(time.time() - started, 1)}

    # The block is not the classifier: no model.keras.
    result = job.finish(score=score, best=False, save=False)
    job.log(f"multitask: {arm} seed {opts.seed}: " + ", ".join(f"{t} {a:.4f}" for t, a in
                                                               result["test_accuracy"].items()))
    return result


# -- every arm -------------------------------------------------------------------------------------------------------
def check_options(opts: MultitaskOptions) -> list[str]:
    """The options that need no data; returns the task names (the label map is read here)."""
    pooled.check_pooled_options(opts, "multitask")
    names = list(read_label_map(default_tasks_path(opts)))
    task_weights(opts, names)
    return names


def planned_runs(opts: MultitaskOptions, names: list[str]) -> list[tuple[str, str, tuple]]:
    """(arm, directory name, tasks) in training order."""
    runs = []
    for arm in dict.fromkeys(opts.arms):
        if arm == "single":
            runs += [(arm, f"single_{name}", (name,)) for name in names]
        else:
            runs.append((arm, arm, tuple(names)))
    return runs


def task_run(opts: MultitaskOptions, arm: str, folder: str, tasks: tuple, seed: int, out: str) -> sweep.Run:
    weights = () if arm == "single" else tuple((t, w) for t, w in opts.task_weights if t in tasks)  # alone: 1
    options = sweep.derive(opts, output_dir=os.path.join(out, folder, f"seed{seed}"), seed=seed, export=False,
                           epochs=0, head_hidden=opts.head_hidden or DEFAULT_BLOCK, task_weights=weights,
                           soft_penalty=opts.soft_penalty if arm == "soft" else 0.0)
    return sweep.Run(f"seed {seed}, {folder}", options, run_recipe(arm, tasks),
                     {"recipe": "multitask", "arm": arm, "task_names": tasks}, SWEEP_ONLY)


def multitask(opts: MultitaskOptions, log=print) -> dict:
    names = check_options(opts)
    from tfl.training import rundir

    out = opts.output_dir or rundir.default_path("multitask", opts.dataset)
    settings = {"options": dataclasses.asdict(opts), "tasks_file": default_tasks_path(opts), "tasks": names}
    result = {"output_dir": out, "settings": settings, "runs": [], "summary": []}
    runs = [task_run(opts, arm, folder, tasks, seed, out) for seed in sweep.seeds(opts)
            for arm, folder, tasks in planned_runs(opts, names)]
    sweep.sweep(runs, out, result, TABLES, log, "multitask",
                summarize=lambda r: r.update(summary=summarize(r["runs"])))
    log(f"multitask: wrote {os.path.join(out, MULTITASK_JSON)}, {MULTITASK_CSV} and {MULTITASK_PNG}")
    return result


def rows(runs: list[dict]) -> list[dict]:
    """One row per run and task."""
    out = []
    for r in runs:
        for task, accuracy in r["test_accuracy"].items():
            out.append({"arm": r["arm"], "seed": r["seed"], "task": task, "test_accuracy": accuracy,
                        "task_weight": r["task_weights"][task], "trainable_params": r["trainable_params"],
                        "train_seconds": r["train_seconds"], "run_dir": r["run_dir"]})
    return out


def summarize(runs: list[dict]) -> list[dict]:
    """Per (task, arm): mean and sd over seeds of the test accuracy, its difference to the single-task mean, and the
    arm's trainable parameters (single: the sum over its runs, the cost of one model per task)."""
    table = rows(runs)
    single_params: dict = {}
    for r in runs:
        if r["arm"] == "single":
            single_params.setdefault(r["seed"], 0)
            single_params[r["seed"]] += r["trainable_params"]
    summary = []
    for task in dict.fromkeys(r["task"] for r in table):
        for arm in dict.fromkeys(r["arm"] for r in table):
            mine = [r for r in table if r["task"] == task and r["arm"] == arm]
            if not mine:
                continue
            mean, sd = sweep.mean_sd(r["test_accuracy"] for r in mine)
            params = max(single_params.values()) if arm == "single" and single_params else mine[0]["trainable_params"]
            summary.append({"task": task, "arm": arm, "n": len(mine), "test_accuracy_mean": mean,
                            "test_accuracy_sd": sd, "trainable_params": params})
    base = {r["task"]: r["test_accuracy_mean"] for r in summary if r["arm"] == "single"}
    for r in summary:
        r["vs_single"] = round(r["test_accuracy_mean"] - base[r["task"]], 6) if r["task"] in base else None
    return summary


def write_figure(folder, result: dict) -> None:
    from tfl.reporting.figures_transfer import write_multitask

    opts = result["settings"]["options"]
    write_multitask(result["summary"], folder.file(MULTITASK_PNG),
                    title=f"{opts['backbone']} (frozen) on {os.path.basename(os.path.normpath(opts['dataset']))}: "
                          f"{opts['head_epochs']} epochs per run")


TABLES = sweep.Tables(MULTITASK_JSON, {MULTITASK_CSV: (COLUMNS, lambda result: rows(result["runs"]))}, write_figure)


def format_table(result: dict) -> str:
    """Per task: each arm's test accuracy (mean ± sd over seeds) and its difference to the single-task model."""
    arms = list(dict.fromkeys(r["arm"] for r in result["summary"]))
    lines = [f"{'task':<14}" + "".join(f"{arm:>28}" for arm in arms)]
    for task in dict.fromkeys(r["task"] for r in result["summary"]):
        cells = []
        for arm in arms:
            r = next((r for r in result["summary"] if r["task"] == task and r["arm"] == arm), None)
            if r is None:
                cells.append(f"{'-':>28}")
                continue
            diff = "" if r["vs_single"] is None or arm == "single" else f" ({r['vs_single']:+.4f})"
            cells.append(f"{sweep.format_mean_sd(r['test_accuracy_mean'], r['test_accuracy_sd']) + diff:>28}")
        lines.append(f"{task:<14}" + "".join(cells))
    params = {r["arm"]: r["trainable_params"] for r in result["summary"]}
    lines.append(f"{'params':<14}" + "".join(f"{params[arm]:>28,}" for arm in arms))
    n = max((r["n"] for r in result["summary"]), default=0)
    lines.append(f"(test accuracy, mean ± sd over {n} seed(s); in brackets: minus the single-task model's)")
    return "\n".join(lines)
