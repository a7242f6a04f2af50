"""`tfl dann`: unsupervised domain adaptation with a domain-adversarial network (Ganin et al. 2016, DANN).

Labeled source images, unlabeled target images. The feature extractor G_f feeds a label predictor (trained on the
source labels) and, through a gradient-reversal layer, a domain classifier (source vs target): the classifier
learns to tell the domains apart while the reversed gradient pushes G_f towards features it cannot tell apart.
The reversal's strength follows the paper's schedule lambda(p) = 2 / (1 + exp(-10 p)) - 1 over the training
progress p in [0, 1] (0 at the start, 0.987 at p = 0.5, ~1 at the end), set before every step.

Here G_f is the frozen pretrained backbone (up to its global average pool, whose features are cached once) plus a
trainable block above it: the classifier's hidden head layer(s) (--head-hidden, default 256 units, ReLU). The label
predictor is the classifier's logits layer; the domain classifier is Dense(--domain-hidden, ReLU) -> Dense(1).
Freezing the backbone keeps the adversarial game cheap on a CPU (seconds an epoch) at the price of adapting only
the block above the pool.

Every batch holds --batch-size source rows and as many target rows, interleaved (source, target, source, ...), so
each replica's share of a batch has both domains in equal parts. Loss per batch = mean cross-entropy over its
source rows + mean domain cross-entropy over all its rows; the target labels are never used in training and
never select anything: every run keeps its weights after the last epoch. Where the target labels exist they only
score: val_target_accuracy in history.csv (monitoring), and the target test accuracy.

Arms (same data, seed, block, batches and epochs): source_only, with lambda fixed at 0 (the domain classifier
still trains, so its accuracy shows how separable the domains are, but no gradient reaches G_f), and dann.

The target domain: --target-shift SHIFT makes a deterministic shifted copy of the dataset itself (see SHIFTS), or
--target DIR reads an image folder with the same classes (ROOT/{train,val,test}/<class>/..., as --dataset takes):
its train images are the unlabeled target, its test (else val) images score. With --target-shift, the target
training images are the shifted copies of train rows the source does not use (with --limit-train N: N of the other
rows, seeded); when the source uses every train row, they are shifted copies of the same rows (say --limit-train to
make them disjoint). Target val / test are the shifted val / test splits.

<output_dir>/<arm>/seed<S>/ is a run directory (config.json, history.csv, curves.png, checkpoints, model.keras:
the classifier with its adapted block, metrics.json); <output_dir> gets dann.json, dann.csv (one row per arm and
seed) and dann.png (target accuracy per seed, and the target accuracy curves), rewritten after every run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import ClassVar

import numpy as np

from tfl.errors import UsageError
from tfl.job import Job, JobOptions
from tfl.options import AUGMENTATION, DANN_SHIFTS, FROZEN_BACKBONE, SWEEP_RUN, option
from tfl.recipes import pooled, sweep

DANN_JSON, DANN_CSV, DANN_PNG = "dann.json", "dann.csv", "dann.png"
ARMS = ("source_only", "dann")
DOMAIN = "domain"  # the batch column: 0.0 for a source row, 1.0 for a target row
DEFAULT_ADAPTER = (256,)  # --head-hidden when not given: the trainable block of G_f
COLUMNS = ("arm", "seed", "source_test_accuracy", "target_test_accuracy", "val_domain_accuracy", "final_lambda",
           "train_seconds", "wall_seconds", "run_dir")
# The shifts' colours: a tint maps black to BACKGROUND and white to FOREGROUND (RGB).
TINT_BACKGROUND, TINT_FOREGROUND = (20.0, 40.0, 110.0), (255.0, 190.0, 40.0)
TEXTURE_PERIOD, TEXTURE_MEAN, TEXTURE_AMPLITUDE = 6.0, 90.0, 70.0  # diagonal stripes, 20..160 grey


@dataclasses.dataclass
class DannOptions(JobOptions):
    unused: ClassVar = ("epochs", *FROZEN_BACKBONE, "backbone_lr", *AUGMENTATION, *SWEEP_RUN)
    option_help: ClassVar = {"output_dir": (
        "Where dann.json/.csv/.png and every run directory (<arm>/seed<S>/) go (default: runs/<time>-dann-<dataset>)."),
        "label_fraction": "Label a seeded, stratified share F of each class's training examples as the source.",
        "head_epochs": "Epochs of every run (the block above the frozen backbone and the heads)."}

    target_shift: str = option("invert", choices=DANN_SHIFTS, help=(
        "The target domain: a deterministic shifted copy of --dataset. invert: 255 - x; tint: dark blue background, "
        "orange garments; texture: on diagonal stripes. Target training images are shifted train rows the source "
        "does not use (see --limit-train); target val/test: the shifted val/test."))
    target: str | None = option(None, metavar="DIR", help=(
        "The target domain as an image folder with --dataset's classes (ROOT/{train,val,test}/<class>/...): its "
        "train images are the unlabeled target, its test (else val) labels only score. Replaces --target-shift."))
    target_limit: int | None = option(None, check="positive", metavar="N", help=(
        "With --target-shift: at most N target training images (seeded), e.g. to bound the one-time feature "
        "extraction of the shifted copies."))
    seeds: int = option(3, check="positive", metavar="N", help=(
        "Every arm runs with seeds --seed, --seed+1, ...; a seed where DANN's target accuracy is below "
        "source-only's is flagged."))
    arms: tuple[str, ...] = option(ARMS, choices=ARMS, metavar="ARM[,ARM]", help=(
        "source_only: the same network and batches with lambda fixed at 0 (no reversed gradient reaches the "
        "features). dann: lambda(p) = lambda_max * (2 / (1 + exp(-10 p)) - 1)."))
    domain_hidden: int = option(256, check="positive", metavar="N", help=(
        "Units of the domain classifier's hidden layer (Dense N ReLU, then Dense 1)."))
    lambda_max: float = option(1.0, check="positive", help="Scales the gradient-reversal schedule (the paper: 1).")
    # the 10 in the schedule (JobOptions.gamma is the step learning-rate schedule's)
    lambda_gamma: float = option(10.0, check="positive", help=(
        "The schedule's steepness: lambda(p) = 2 / (1 + exp(-gamma p)) - 1 (the paper: 10)."))


SWEEP_ONLY = ("seeds", "arms")  # DannOptions' own fields: which runs, not what one run trains


# -- the gradient-reversal layer and its schedule ------------------------------------------------------------------
def dann_lambda(p: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s schedule: 2 / (1 + exp(-gamma p)) - 1, p the training progress in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(p, 0.0), 1.0))) - 1.0


def reverse_gradient(x, lam):
    """Identity forward; the gradient times -lam backward (lam: a scalar tensor, not trained)."""
    import tensorflow as tf

    @tf.custom_gradient
    def reverse(x, lam):
        def grad(upstream):
            return -tf.cast(lam, upstream.dtype) * upstream, tf.zeros_like(lam)

        return tf.identity(x), grad

    return reverse(x, tf.convert_to_tensor(lam, tf.float32))


def gradient_reversal_layer(name: str = "gradient_reversal"):
    """A Keras layer applying reverse_gradient with its own non-trained `lam` variable (set by LambdaSchedule)."""
    import keras

    class GradientReversal(keras.layers.Layer):
        def build(self, input_shape):
            self.lam = self.add_weight(shape=(), initializer="zeros", trainable=False, name="lambda")

        def call(self, x):
            return reverse_gradient(x, self.lam.value)

    return GradientReversal(name=name)


class LambdaSchedule:
    """A trainer callback: before every step, lam = lambda_max * dann_lambda(steps done / steps of the stage).
    After a resume the stage's info says where it continues, so the schedule continues there too."""

    def __init__(self, layer, lambda_max: float = 1.0, gamma: float = 10.0):
        self.layer, self.lambda_max, self.gamma = layer, lambda_max, gamma
        self.start, self.total, self.value = 0, 1, 0.0

    def on_stage_begin(self, stage: str, info: dict) -> None:
        spe = info["steps_per_epoch"]
        self.total = max(1, info["epochs"] * spe)
        self.start = info["step"] - (info["first_epoch"] - 1) * spe
        self._set(info["step"])

    def on_train_step(self, stage: str, step: int, logs: dict) -> None:
        self._set(step)

    def _set(self, step: int) -> None:
        self.value = self.lambda_max * dann_lambda((step - self.start) / self.total, self.gamma)
        self.layer.lam.assign(self.value)


# -- loss and metrics ---------------------------------------------------------------------------------------------
class DannLoss:
    """Per example: 2 x cross-entropy on source rows (0 on target rows) + the domain's binary cross-entropy.
    Half of every batch is source, so the batch mean is mean source CE + mean domain CE."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def __call__(self, batch, outputs):
        import keras
        import tensorflow as tf

        from tfl.data.pipeline import LABEL

        logits = tf.cast(outputs["logits"], tf.float32)
        domain_logit = tf.cast(outputs["domain"], tf.float32)[:, 0]
        domain = tf.cast(batch[DOMAIN], tf.float32)
        onehot = tf.one_hot(batch[LABEL], self.num_classes)
        ce = keras.losses.categorical_crossentropy(onehot, logits, from_logits=True,
                                                   label_smoothing=self.label_smoothing)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=domain, logits=domain_logit)
        return 2.0 * (1.0 - domain) * ce + bce


def dann_metrics(batch, outputs) -> dict:
    """accuracy on the source rows and target_accuracy on the target rows (each x 2: half the rows are each
    domain's; the target labels only monitor), and domain_accuracy of the domain classifier on all rows."""
    import tensorflow as tf

    from tfl.data.pipeline import LABEL

    domain = tf.cast(batch[DOMAIN], tf.float32)
    hit = tf.cast(tf.equal(tf.argmax(outputs["logits"], -1, output_type=tf.int32), tf.cast(batch[LABEL], tf.int32)),
                  tf.float32)
    said_target = tf.cast(tf.cast(outputs["domain"], tf.float32)[:, 0] > 0.0, tf.float32)
    return {"accuracy": 2.0 * hit * (1.0 - domain), "target_accuracy": 2.0 * hit * domain,
            "domain_accuracy": tf.cast(tf.equal(said_target, domain), tf.float32)}


# -- the target domain --------------------------------------------------------------------------------------------
def shift_image(image, shift: str):
    """A deterministic shift of one uint8 RGB image [H, W, 3]:
      invert   255 - x (light garments on black become dark garments on white)
      tint     the grey level g in [0, 1] -> TINT_BACKGROUND + g (TINT_FOREGROUND - TINT_BACKGROUND): dark blue
               background, orange garments
      texture  max(x, diagonal stripes 90 + 70 sin(2 pi (row + col) / 6)): the garment on a striped background
    """
    import tensorflow as tf

    x = tf.cast(image, tf.float32)
    if shift == "invert":
        out = 255.0 - x
    elif shift == "tint":
        grey = tf.reduce_mean(x, axis=-1, keepdims=True) / 255.0
        low, high = tf.constant(TINT_BACKGROUND), tf.constant(TINT_FOREGROUND)
        out = low + grey * (high - low)
    elif shift == "texture":
        shape = tf.shape(x)
        rows = tf.cast(tf.range(shape[0]), tf.float32)[:, None]
        cols = tf.cast(tf.range(shape[1]), tf.float32)[None, :]
        stripes = TEXTURE_MEAN + TEXTURE_AMPLITUDE * tf.sin(2.0 * math.pi * (rows + cols) / TEXTURE_PERIOD)
        out = tf.maximum(x, stripes[:, :, None])
    else:
        raise UsageError(f"--target-shift {shift!r}: choose one of {', '.join(DANN_SHIFTS)}")
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def shifted(ds, shift: str):
    """The (image, label) dataset with every image shifted."""
    import tensorflow as tf

    def apply(image, label):
        return shift_image(image, shift), label

    return ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass
class Target:
    """The target domain's splits as (source, count, data id) for StageInputs.add_split."""

    name: str
    train: tuple
    val: tuple
    test: tuple
    note: str = ""


TARGET_ROWS_SEED = 7919  # the target rows are part of the data's definition: the same for every seed (and cached once)


def target_rows(size: int, source_rows, limit: int | None = None) -> tuple[np.ndarray, str]:
    """The train rows whose shifted copies are the unlabeled target: rows the source does not use (as many as it
    uses, at most `limit`), else (the source uses every row) up to `limit` of the source's own rows; drawn with
    TARGET_ROWS_SEED."""
    from tfl.data import random_rows

    used = np.arange(size) if source_rows is None else np.sort(np.asarray(source_rows, np.int64))
    rest = np.setdiff1d(np.arange(size), used)
    note = ""
    if len(rest) == 0:
        rest, note = used, ("the target training images are shifted copies of rows the source also uses (their "
                            "labels are never used); --limit-train makes them disjoint")
    count = min(len(used), len(rest), limit or len(rest))
    picked = rest[np.sort(random_rows(len(rest), count, TARGET_ROWS_SEED))] if count < len(rest) else rest
    return picked.astype(np.int64), note


def make_target(job: Job) -> Target:
    from tfl import data
    from tfl.training.boundary import data_identity, rows_digest

    opts, splits = job.opts, job.splits
    if opts.target:
        other = data.load_dataset(opts.target, val_split=opts.val_split, seed=opts.seed,
                                  skip_bad_images=opts.skip_bad_images, log=job.log)
        if list(other.class_names) != job.class_names:
            raise UsageError(f"--target {opts.target!r} has the classes {', '.join(other.class_names)} but --dataset "
                             f"{opts.dataset!r} has {', '.join(job.class_names)}; the target needs the same classes "
                             "(their labels only score)")
        test = "test" if other.test is not None else "val"
        return Target(os.path.basename(os.path.normpath(opts.target)),
                      (other.train, other.num_examples["train"], data_identity(other.fingerprint, "train")),
                      (other.val, other.num_examples["val"], data_identity(other.fingerprint, "val")),
                      (getattr(other, test), other.num_examples[test], data_identity(other.fingerprint, test)))
    shift = opts.target_shift
    size = splits.num_examples["train"]
    rows, note = target_rows(size, job.train_rows, opts.target_limit)
    train = data.take_rows(shifted(splits.train, shift), size, rows)

    def ident(split, subset=None):
        return {**data_identity(splits.fingerprint, split, subset), "shift": shift}

    test = "test" if splits.test is not None else "val"
    return Target(f"{splits.name} {shift}", (train, len(rows), ident("train", rows_digest(rows))),
                  (shifted(splits.val, shift), splits.num_examples["val"], ident("val")),
                  (shifted(getattr(splits, test), shift), splits.num_examples[test], ident(test)), note)


# -- one run --------------------------------------------------------------------------------------------------------
def interleaved(source, target, batch: int, source_rows, target_rows):
    """Batches of `batch` source rows and `batch` target rows, alternating row by row, with the DOMAIN column.
    source_rows / target_rows: [steps, batch] index arrays into each Entry."""
    import tensorflow as tf

    from tfl.data.pipeline import FEATURES, LABEL, gather_batches

    def side(entry, rows):
        order = tf.data.Dataset.from_tensor_slices(np.asarray(rows, np.int64))
        return gather_batches(order, {FEATURES: entry.data, LABEL: entry.labels})

    def merge(s, t):
        out = {key: tf.reshape(tf.stack([s[key], t[key]], axis=1), tf.concat([[-1], tf.shape(s[key])[1:]], 0))
               for key in (FEATURES, LABEL)}
        n = tf.shape(s[LABEL])[0]
        out[DOMAIN] = tf.tile(tf.constant([0.0, 1.0]), [n])
        return out

    return tf.data.Dataset.zip((side(source, source_rows), side(target, target_rows))).map(
        merge, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def epoch_rows(n_source: int, n_target: int, batch: int, seed: int, epoch: int):
    """Epoch `epoch`'s [steps, batch] source and target rows: a permutation of each, the target's repeated as
    needed to fill as many batches as the source gives (full batches only); seeded by (seed, epoch)."""
    from tfl.training.trainer import epoch_seed

    rng = np.random.default_rng(epoch_seed(seed, epoch))
    steps = n_source // batch
    source = rng.permutation(n_source)[: steps * batch].reshape(steps, batch)
    repeats = -(-steps * batch // n_target)
    target = np.concatenate([rng.permutation(n_target) for _ in range(repeats)])[: steps * batch]
    return source, target.reshape(steps, batch)


def val_batches(source, target, batch: int):
    """(dataset, steps): the first m = min(source rows, target rows) rows of each Entry, in order, interleaved in
    batches of `batch` of each (the last one partial)."""
    m = min(len(source.labels), len(target.labels))
    if m < 1:
        raise UsageError("the source or the target domain has no validation images")
    rows = np.arange(m, dtype=np.int64)
    full = (m // batch) * batch
    parts = []
    if full:
        parts.append(interleaved(source, target, batch, rows[:full].reshape(-1, batch), rows[:full].reshape(-1, batch)))
    if full < m:
        last = rows[full:].reshape(1, -1)
        parts.append(interleaved(source, target, m - full, last, last))
    ds = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
    return ds, -(-m // batch)


def arm_recipe(arm: str):
    def recipe(job: Job) -> dict:
        import keras

        from tfl.training.trainer import ParamGroup

        opts = job.opts
        started = time.time()
        stage = pooled.head_stage(job, "dann" if arm == "dann" else "source", opts.head_epochs)
        width = pooled.feature_width(job)
        with job.strategy.scope():
            grl = gradient_reversal_layer()
            domain_hidden = keras.layers.Dense(opts.domain_hidden, activation="relu", name="domain_hidden")
            domain_logit = keras.layers.Dense(1, name="domain_logit", dtype="float32")
            inputs = keras.Input(shape=(width,), name="pooled_features")
            hidden, logits = pooled.head_block(job, inputs)
            domain = domain_logit(domain_hidden(grl(hidden)))
            model = keras.Model(inputs, {"logits": logits, "domain": domain}, name="dann")
        schedule = LambdaSchedule(grl, opts.lambda_max if arm == "dann" else 0.0, opts.lambda_gamma)
        config = {"lambda_schedule": "lambda_max * (2 / (1 + exp(-lambda_gamma * p)) - 1)"}
        loss = DannLoss(len(job.class_names), opts.label_smoothing)
        job.prepare([stage], config=config, loss=loss, metrics=dann_metrics, callbacks=[schedule])
        domain_vars = domain_hidden.trainable_variables + domain_logit.trainable_variables
        pooled.keep_in_checkpoints(job, domain_vars)
        target = make_target(job)
        if target.note:
            job.log(f"dann: {target.note}")
        batch, entries = job.batch, {}

        def adversarial(stage, feed, groups) -> dict:  # interleaved source and target rows, the domain group too
            pooled.check_pooled(feed)
            source_train, source_val = pooled.features(job, "train"), pooled.features(job, "val")
            target_train = entries["target_train"] = pooled.features(job, "target_train", *target.train)
            target_val = pooled.features(job, "target_val", *target.val)
            if len(target_train.labels) < 1:
                raise UsageError("the target domain has no training images")

            def train_batches(epoch):
                s, t = epoch_rows(len(source_train.labels), len(target_train.labels), batch, opts.seed, epoch)
                return interleaved(source_train, target_train, batch, s, t)

            val, val_steps = val_batches(source_val, target_val, batch)
            job.log(f"dann: {arm}, {len(source_train.labels)} source / {len(target_train.labels)} target training "
                    f"images ({target.name}), lambda_max {schedule.lambda_max:g}")
            return {"model": model, "groups": groups + [ParamGroup("domain", domain_vars, job.lr)],
                    "train": train_batches, "val": val, "batch": 2 * batch, "val_steps": val_steps,
                    "eval_model": model, "trainable": ["head"]}

        job.train([stage], adapt=adversarial)
        n_target = len(entries["target_train"].labels) if entries else len(
            pooled.features(job, "target_train", *target.train).labels)
        return finish(job, arm, model, target, schedule, started, n_target)

    return recipe


def finish(job: Job, arm: str, model, target: Target, schedule: LambdaSchedule, started: float, n_target: int) -> dict:
    """Job.finish with the weights after the last epoch, scored on the source and target test rows through the
    model's pooled predictions: model.keras and metrics.json."""
    from tfl.training.boundary import data_identity

    splits, opts = job.splits, job.opts
    test = "test" if splits.test is not None else "val"

    def score(job) -> dict:
        if test == "test":
            source_test = pooled.features(job, "test", splits.test, splits.num_examples["test"],
                                          data_identity(splits.fingerprint, "test"))
        else:
            source_test = pooled.features(job, "val")
        target_test = pooled.features(job, "target_test", *target.test)
        scores = {}
        for name, entry in (("source", source_test), ("target", target_test)):
            logits = pooled.predict(model, entry, job.batch, "logits")
            scores[name] = round(float(np.mean(np.argmax(logits, -1) == entry.labels)), 6)
        last = job.trainer.history[-1]
        return {"arm": arm, "seed": opts.seed, "source_test_accuracy": scores["source"],
                "target_test_accuracy": scores["target"], "eval_split": test, "target": target.name,
                "val_accuracy": round(last.val.get("accuracy", math.nan), 6),
                "val_target_accuracy": round(last.val.get("target_accuracy", math.nan), 6),
                "val_domain_accuracy": round(last.val.get("domain_accuracy", math.nan), 6),
                # lambda at the last step, from the schedule (also when a rerun finds every epoch done)
                "final_lambda": round(schedule.lambda_max * dann_lambda(len(job.trainer.history) / opts.head_epochs,
                                                                       schedule.gamma), 6),
                "epochs_run": len(job.trainer.history),
                "train_seconds": round(time.time() - started, 1),
                "source_train_examples": job.n_train, "target_train_examples": n_target}

    metrics = job.finish(score=score, best=False)
    job.log(f"dann: {arm} seed {opts.seed}: {test} accuracy source {metrics['source_test_accuracy']:.4f}, target "
            f"{metrics['target_test_accuracy']:.4f}; domain classifier {metrics['val_domain_accuracy']:.4f} on val")
    return metrics


# -- every arm and seed ---------------------------------------------------------------------------------------------
def check_options(opts: DannOptions) -> None:
    pooled.check_pooled_options(opts, "dann")
    if opts.target is not None and not os.path.isdir(opts.target):
        raise UsageError(f"--target {opts.target!r}: not a directory; give an image folder ROOT/{{train,val,test}}/"
                         "<class>/... with the dataset's classes")


def arm_run(opts: DannOptions, arm: str, seed: int, out: str, target: str) -> sweep.Run:
    options = sweep.derive(opts, output_dir=os.path.join(out, arm, f"seed{seed}"), seed=seed, export=False,
                           head_hidden=opts.head_hidden or DEFAULT_ADAPTER, epochs=0,
                           target_shift=None if opts.target else opts.target_shift)
    return sweep.Run(f"seed {seed}, {arm} (target {target})", options, arm_recipe(arm),
                     {"recipe": "dann", "arm": arm}, SWEEP_ONLY)


def dann(opts: DannOptions, log=print) -> dict:
    """Every arm for every seed; returns what dann.json holds, plus output_dir."""
    check_options(opts)
    from tfl.training import rundir

    out = opts.output_dir or rundir.default_path("dann", opts.dataset)
    target = opts.target or f"shift:{opts.target_shift}"
    result = {"output_dir": out, "settings": {"options": dataclasses.asdict(opts), "target": target}, "runs": []}
    runs = [arm_run(opts, arm, seed, out, target) for seed in sweep.seeds(opts) for arm in opts.arms]
    sweep.sweep(runs, out, result, TABLES, log, "dann", summarize=lambda r: r.update(summarize(r["runs"])))
    worse = [c["seed"] for c in result["comparisons"] if c["dann_worse"]]
    if worse:
        log(f"dann: WARNING: DANN's target accuracy is below source-only's for seed(s) {', '.join(map(str, worse))}")
    log(f"dann: wrote {os.path.join(out, DANN_JSON)}, {DANN_CSV} and {DANN_PNG}")
    return result


def summarize(runs: list[dict]) -> dict:
    """Per arm: mean and sd of the source and target test accuracy; per seed with both arms: DANN minus
    source-only on the target, and whether DANN is worse."""
    arms = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rows = [r for r in runs if r["arm"] == arm]
        src, tgt = sweep.mean_sd(r["source_test_accuracy"] for r in rows), \
            sweep.mean_sd(r["target_test_accuracy"] for r in rows)
        arms[arm] = {"n": len(rows), "source_test_accuracy_mean": src[0], "source_test_accuracy_sd": src[1],
                     "target_test_accuracy_mean": tgt[0], "target_test_accuracy_sd": tgt[1],
                     "val_domain_accuracy_mean": sweep.mean_sd(r["val_domain_accuracy"] for r in rows)[0]}
    comparisons = []
    by = {(r["arm"], r["seed"]): r for r in runs}
    for seed in dict.fromkeys(r["seed"] for r in runs):
        if ("dann", seed) in by and ("source_only", seed) in by:
            gain = by[("dann", seed)]["target_test_accuracy"] - by[("source_only", seed)]["target_test_accuracy"]
            comparisons.append({"seed": seed, "target_gain": round(gain, 6), "dann_worse": gain < 0})
    return {"summary": arms, "comparisons": comparisons}


def write_figure(folder, result: dict) -> None:
    from tfl.reporting.figures import read_history_csv
    from tfl.reporting.figures_transfer import write_dann
    from tfl.training import rundir

    curves = {f"{r['arm']} seed {r['seed']}": read_history_csv(os.path.join(r["run_dir"], rundir.HISTORY))
              for r in result["runs"] if os.path.isfile(os.path.join(r["run_dir"], rundir.HISTORY))}
    write_dann(result["runs"], curves, folder.file(DANN_PNG), title=f"DANN: {result['settings']['target']} as target")


TABLES = sweep.Tables(DANN_JSON, {DANN_CSV: (COLUMNS, lambda result: result["runs"])}, write_figure)


def format_table(result: dict) -> str:
    """Per seed: source-only and DANN target (and source) test accuracy, the gain, WORSE where DANN lost; then
    the means."""
    by = {(r["arm"], r["seed"]): r for r in result["runs"]}
    lines = [f"{'seed':>4}  {'arm':<12}{'source test':>12}{'target test':>12}{'domain acc':>11}{'gain':>9}"]
    gains = {c["seed"]: c for c in result["comparisons"]}
    for seed in dict.fromkeys(r["seed"] for r in result["runs"]):
        for arm in ARMS:
            r = by.get((arm, seed))
            if r is None:
                continue
            mark = ""
            if arm == "dann" and seed in gains:
                c = gains[seed]
                mark = f"{c['target_gain']:>+9.4f}" + ("  WORSE than source-only" if c["dann_worse"] else "")
            lines.append(f"{seed:>4}  {arm:<12}{r['source_test_accuracy']:>12.4f}{r['target_test_accuracy']:>12.4f}"
                         f"{r['val_domain_accuracy']:>11.4f}{mark}")
    for arm, s in result["summary"].items():
        source = sweep.format_mean_sd(s["source_test_accuracy_mean"], s["source_test_accuracy_sd"])
        target = sweep.format_mean_sd(s["target_test_accuracy_mean"], s["target_test_accuracy_sd"])
        lines.append(f"mean  {arm:<12} source {source}  target {target}  (n={s['n']})")
    return "\n".join(lines)
