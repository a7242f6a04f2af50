"""`tfl pretext`: self-supervised pretext pretraining on unlabeled images, then fine-tuning from the result.

The backbone keeps pretraining on the images of --dataset's train split (--limit-train N of them), their labels
ignored, with a pretext head on top:

  rotation  Gidaris et al., "Unsupervised Representation Learning by Predicting Image Rotations" (ICLR 2018):
            every image is shown at 0, 90, 180 and 270 degrees in the same batch and a 4-way head predicts which.
            loss = the mean cross-entropy over the four copies; "accuracy" is rotation accuracy.
  simclr    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML 2020): two
            random views of every image (resized crop, flip, brightness and contrast jitter), a projection MLP
            (--head-hidden, default 128, then --projection-dim), and NT-Xent at --temperature: each view must find
            its partner among the 2B - 1 other views of the batch (of its replica). "accuracy" is that top-1.

Both are hooks of the one training loop (tfl.training.trainer): an `inputs` hook makes the rotated copies or the
views from the image batch, a `loss` hook scores the outputs; nothing else changes (the boundary cache is off,
since the inputs are transformed images). With random initial weights every layer trains, batch norm too; with
pretrained weights (the backbone's own, or any checkpoint given by --init-from) the layers above --freeze-up-to do,
the backbone at --backbone-lr and the head at --lr.

Output directory:
  pretext/          the pretext run (a normal run directory: config, history, curves, checkpoints; its model.keras
                    is backbone + pretext head, its classes.json names the pretext targets)
  backbone.keras    the pretrained backbone alone: `tfl finetune --backbone B --init-from <out>/backbone.keras`
                    restores every backbone weight by name and trains a new head as usual
  frac<F>/baseline/ and frac<F>/pretext/  (unless --no-finetune) for each --label-fraction F, the same fine-tune
                    from the initial weights (--init-from's, if given) and from backbone.keras, same seed and budget:
                    random initial weights train every layer for --head-epochs + --epochs (as compare's scratch
                    arm); pretrained ones train as tfl finetune does (--head-epochs on the head, then --epochs above
                    --freeze-up-to)
  pretext.json, pretext.csv  the pretext run's summary and one row per fine-tune (test accuracy, ...)
  pretext.png       test accuracy against the label fraction per arm and the arms' val curves (without
                    fine-tunes: the pretext run's curves)
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from tfl.backbones import registry
from tfl.errors import UsageError
from tfl.job import Job, JobOptions, Stage, held_out_accuracy
from tfl.options import FRACTION, PRETEXT_OBJECTIVES, SWEEP_RUN, check_options as check_fields, option
from tfl.recipes import sweep
from tfl.recipes.stages import RANDOM_START, head_then_finetune, scratch_stage, starts_random
from tfl.reporting import table
from tfl.reporting.table import Column

PRETEXT_JSON, PRETEXT_CSV, PRETEXT_PNG = "pretext.json", "pretext.csv", "pretext.png"
BACKBONE_FILE = "backbone.keras"
ROTATIONS = ("rot0", "rot90", "rot180", "rot270")  # k quarter turns counter-clockwise, k = the target
SIMCLR_HIDDEN = (128,)  # the projection MLP's hidden layer when --head-hidden is not given
COLUMNS = ("arm", "start", "label_fraction", "seed", "test_accuracy", "best_val_accuracy", "epochs", "wall_seconds",
           "train_examples", "run_dir")


@dataclasses.dataclass
class PretextOptions(JobOptions):
    unused: ClassVar = ("label_fraction", *SWEEP_RUN)
    option_help: ClassVar = {"output_dir": (
        "Where pretext.json/.csv/.png, backbone.keras, the pretext run (pretext/) and the fine-tunes "
        "(frac<F>/baseline, frac<F>/pretext) go (default: runs/<time>-pretext-<dataset>).")}

    objective: str = option("rotation", choices=PRETEXT_OBJECTIVES, help=(
        "rotation (Gidaris et al. 2018): predict which of 0/90/180/270 degrees each image was turned by. simclr "
        "(Chen et al. 2020): two random views of each image find each other among the batch (NT-Xent)."))
    pretext_epochs: int = option(5, check="positive", help=(
        "Epochs of pretext training over the train split's images (--limit-train N of them), labels ignored."))
    temperature: float = option(0.5, check="positive", help="simclr: NT-Xent's temperature.")
    projection_dim: int = option(64, check="positive", help=(
        "simclr: the projection head's output size (after --head-hidden, default 128)."))
    label_fractions: tuple[float, ...] = option((0.01, 0.1), flag="--label-fraction", check=FRACTION,
                                                metavar="F[,F]", help=(
        "Then fine-tune at each seeded, stratified share F of the labels, from the initial weights and from the "
        "pretext backbone, same seed and --head-epochs/--epochs budget."))
    finetune: bool = option(True, flag="--finetune/--no-finetune", help=(
        "--no-finetune: pretrain only and write backbone.keras (for tfl finetune --init-from)."))


SWEEP_ONLY = ("pretext_epochs", "label_fractions", "finetune")  # PretextOptions' own: which runs follow


# -- the objectives -------------------------------------------------------------------------------------------------
def rotate_batch(images):
    """[B, S, S, C] -> [4B, S, S, C]: the batch at 0, 90, 180, 270 degrees (counter-clockwise), in that order."""
    import tensorflow as tf

    return tf.concat([tf.image.rot90(images, k) for k in range(4)], axis=0)


class Rotation:
    """Rotation prediction: the inputs hook makes the four copies, the loss is the mean CE over them per image."""

    targets = ROTATIONS

    def inputs(self, batch: dict):
        from tfl.data.pipeline import IMAGE

        return rotate_batch(batch[IMAGE])

    def _per_copy(self, logits):
        import tensorflow as tf

        logits = tf.cast(logits, tf.float32)
        logits = tf.reshape(logits, [4, -1, len(ROTATIONS)])  # [rotation, image, logit]
        labels = tf.broadcast_to(tf.range(4)[:, None], tf.shape(logits)[:2])
        return logits, labels

    def loss(self, batch: dict, logits):
        import tensorflow as tf

        logits, labels = self._per_copy(logits)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.reduce_mean(ce, axis=0)

    def metrics(self, batch: dict, logits) -> dict:
        import tensorflow as tf

        logits, labels = self._per_copy(logits)
        hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        return {"accuracy": tf.reduce_mean(hit, axis=0)}


def simclr_views(images, min_scale: float = 0.3, jitter: float = 0.4):
    """A random view of each image in [B, S, S, 3] (0..255): a resized crop of 30-100 % of the area (aspect 3/4 to
    4/3), a horizontal flip half the time, brightness and contrast jitter of +-40 %."""
    import math

    import tensorflow as tf

    shape = tf.shape(images)
    n, size = shape[0], shape[1]
    area = tf.random.uniform([n], min_scale, 1.0)
    log_ratio = tf.random.uniform([n], math.log(3 / 4), math.log(4 / 3))
    ratio = tf.exp(log_ratio)
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    y0 = tf.random.uniform([n]) * (1.0 - h)
    x0 = tf.random.uniform([n]) * (1.0 - w)
    boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
    views = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(n), tf.stack([size, size]))
    flip = tf.random.uniform([n, 1, 1, 1]) < 0.5
    views = tf.where(flip, tf.reverse(views, axis=[2]), views)
    brightness = tf.random.uniform([n, 1, 1, 1], -jitter, jitter) * 255.0
    contrast = tf.random.uniform([n, 1, 1, 1], 1.0 - jitter, 1.0 + jitter)
    mean = tf.reduce_mean(views, axis=[1, 2, 3], keepdims=True)
    views = (views - mean) * contrast + mean + brightness
    return tf.clip_by_value(views, 0.0, 255.0)


class SimCLR:
    """Two views per image; NT-Xent over the 2B projections, per image the mean of its two views' terms."""

    def __init__(self, projection_dim: int, temperature: float):
        self.targets = tuple(f"z{i}" for i in range(projection_dim))
        self.temperature = float(temperature)

    def inputs(self, batch: dict):
        import tensorflow as tf

        from tfl.data.pipeline import IMAGE

        images = batch[IMAGE]
        return tf.concat([simclr_views(images), simclr_views(images)], axis=0)

    def _logits(self, outputs):
        """[2B, 2B] similarity logits (self-similarity masked out) and each row's positive."""
        import tensorflow as tf

        z = tf.math.l2_normalize(tf.cast(outputs, tf.float32), axis=-1)
        n2 = tf.shape(z)[0]
        n = n2 // 2
        sim = tf.matmul(z, z, transpose_b=True) / self.temperature
        sim = sim - tf.eye(n2) * 1e9
        positive = tf.concat([tf.range(n, n2), tf.range(0, n)], axis=0)
        return sim, positive, n

    def loss(self, batch: dict, outputs):
        import tensorflow as tf

        sim, positive, n = self._logits(outputs)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive, logits=sim)
        return (ce[:n] + ce[n:]) / 2.0

    def metrics(self, batch: dict, outputs) -> dict:
        import tensorflow as tf

        sim, positive, n = self._logits(outputs)
        hit = tf.cast(tf.equal(tf.argmax(sim, -1, output_type=tf.int32), positive), tf.float32)
        return {"accuracy": (hit[:n] + hit[n:]) / 2.0}


def objective_for(opts) -> Rotation | SimCLR:
    if opts.objective == "rotation":
        return Rotation()
    if opts.objective == "simclr":
        return SimCLR(opts.projection_dim, opts.temperature)
    raise UsageError(f"--objective {opts.objective!r}: choose one of {', '.join(PRETEXT_OBJECTIVES)}")


# -- the pretext run ------------------------------------------------------------------------------------------------
def pretext_recipe(out: str, state: dict):
    def recipe(job: Job) -> dict:
        from tfl import models
        from tfl.training import rundir

        opts = job.opts
        objective = objective_for(opts)
        state["splits"] = job.splits
        if starts_random(opts):
            stage = scratch_stage(job, "pretext", opts.epochs)
        else:
            stage = Stage("pretext", job.plan, opts.epochs, {"backbone": job.backbone_lr, "head": job.lr})
        job.prepare([stage], config={"pretext_targets": list(objective.targets)}, loss=objective.loss,
                    metrics=objective.metrics, inputs=objective.inputs)
        job.train([stage])
        metrics = job.finish(loss=objective.loss, metrics=objective.metrics,
                             extra_metrics={"objective": opts.objective})
        path = os.path.join(out, BACKBONE_FILE)
        if not job.scratch:
            rundir.save_keras(models.backbone_of(job.model), path)
            job.log(f"pretext: saved the backbone to {path} (tfl finetune --init-from {path})")
        metrics["backbone_file"] = path
        return metrics

    return recipe


def pretext_run(opts: PretextOptions, out: str, state: dict) -> sweep.Run:
    changes = {"output_dir": os.path.join(out, "pretext"), "epochs": opts.pretext_epochs, "head_epochs": 0,
               "label_fraction": None, "cache": "off", "export": False,
               "mixup": 0.0, "cutmix": 0.0}  # the pretext task's own labels are not mixed
    if opts.objective == "simclr" and not opts.head_hidden:
        changes["head_hidden"] = SIMCLR_HIDDEN
    if opts.objective != "simclr":
        changes.update(temperature=None, projection_dim=None)
    if starts_random(opts):
        changes.update(RANDOM_START)
    return sweep.Run(f"{opts.objective} pretext run", sweep.derive(opts, **changes), pretext_recipe(out, state),
                     {"recipe": "pretext"}, SWEEP_ONLY, targets=objective_for(opts).targets)


# -- the fine-tunes -------------------------------------------------------------------------------------------------
def arm_recipe(random_start: bool):
    def recipe(job: Job) -> dict:
        # random weights: both arms alike, every layer (as compare's scratch arm)
        stages = [scratch_stage(job)] if random_start else head_then_finetune(job)
        job.prepare(stages, config={"arm_stages": [s.name for s in stages]})
        job.train(stages)
        return job.finish()

    return recipe


def start_name(opts: JobOptions) -> str:
    """The initial weights in a word: --init-from's file name, the weights' name ("imagenet"), or "random"."""
    if opts.init_from is not None:
        return os.path.basename(os.path.normpath(opts.init_from))
    return registry.get(opts.backbone).resolve_weights(opts.weights) or "random"


def arm_run(opts: PretextOptions, arm: str, fraction: float, out: str) -> sweep.Run:
    changes = {"output_dir": os.path.join(out, f"frac{fraction:g}", arm), "label_fraction": fraction,
               "limit_train": None, "export": False}
    if arm == "pretext":
        # The backbone comes from the pretext run; building the initial weights first would be wasted.
        changes.update(init_from=os.path.join(out, BACKBONE_FILE), weights="none", reuse=(), reuse_exclude=(),
                       rename=())
    if starts_random(opts):
        changes.update(RANDOM_START)
    start = start_name(opts)
    return sweep.Run(f"fine-tune {arm} ({'backbone.keras' if arm == 'pretext' else start + ' weights'}), label "
                     f"fraction {fraction:g}", sweep.derive(sweep.job_options(opts), **changes),
                     arm_recipe(starts_random(opts)), {"recipe": "pretext", "arm": arm, "start": start},
                     row={"arm": arm, "start": start, "label_fraction": fraction, "seed": opts.seed})


# -- the command ----------------------------------------------------------------------------------------------------
def check_options(opts: PretextOptions) -> None:
    check_fields(opts)
    registry.get(opts.backbone)
    objective_for(opts)
    if opts.objective != "simclr":
        defaults = PretextOptions()
        given = [f"--{name.replace('_', '-')}" for name in ("temperature", "projection_dim")
                 if getattr(opts, name) != getattr(defaults, name)]
        if given:
            raise UsageError(f"{' and '.join(given)} shape(s) the simclr objective; add --objective simclr or drop "
                             f"{'them' if len(given) > 1 else 'it'}")
    if opts.finetune and opts.head_epochs + opts.epochs < 1:
        raise UsageError(f"--head-epochs {opts.head_epochs} and --epochs {opts.epochs}: the fine-tunes' budget; "
                         "nothing to train; make their sum >= 1")


def pretext(opts: PretextOptions, log=print) -> dict:
    """The pretext run, then (unless --no-finetune) baseline and pretext fine-tunes at every label fraction;
    returns what pretext.json holds, plus output_dir."""
    check_options(opts)
    from tfl.training import rundir

    out = opts.output_dir or rundir.default_path("pretext", opts.dataset)
    fractions = tuple(dict.fromkeys(map(float, opts.label_fractions))) if opts.finetune else ()
    result = {"output_dir": out, "settings": {"options": dataclasses.asdict(opts), "start": start_name(opts),
                                              "label_fractions": list(fractions)},
              "pretext": None, "runs": []}
    state: dict = {}
    log(f"pretext: {opts.objective} on {opts.dataset}'s train images (labels ignored), {opts.backbone} from "
        f"{start_name(opts)} weights, {opts.pretext_epochs} epoch(s)")
    metrics, seconds = sweep.train(pretext_run(opts, out, state), log)
    # test_accuracy / test_loss: on the eval split (val when the data has no test split; eval_split says which)
    result["pretext"] = {"objective": opts.objective, "test_accuracy": held_out_accuracy(metrics),
                         "test_loss": metrics.get("test_loss", metrics.get("val_loss")),
                         "val_accuracy": metrics["val_accuracy"],
                         "epochs": metrics["epochs_run"], "eval_split": metrics["eval_split"],
                         "wall_seconds": seconds, "run_dir": metrics["run_dir"],
                         "backbone_file": metrics["backbone_file"]}
    tables = sweep.Tables(PRETEXT_JSON, {PRETEXT_CSV: (COLUMNS, lambda r: r["runs"])})
    sweep.write(out, result, tables)
    runs = [arm_run(opts, arm, fraction, out) for fraction in fractions for arm in ("baseline", "pretext")]
    sweep.sweep(runs, out, result, tables, log, "pretext", row=_row)
    write_figure(out, result, opts)
    log(f"pretext: wrote {os.path.join(out, PRETEXT_JSON)}, {PRETEXT_CSV} and {PRETEXT_PNG}")
    return result


def _row(run: sweep.Run, metrics: dict, seconds: float) -> dict:
    return {k: v for k, v in sweep.classifier_row(run, metrics, seconds).items() if k != "trainable_params"}


def write_figure(out: str, result: dict, opts: PretextOptions) -> None:
    from tfl.reporting.figures import read_history_csv, write_compare, write_curves
    from tfl.training import rundir

    dataset = os.path.basename(os.path.normpath(opts.dataset))
    path = os.path.join(out, PRETEXT_PNG)
    if not result["runs"]:
        rows = read_history_csv(os.path.join(result["pretext"]["run_dir"], rundir.HISTORY))
        write_curves(rows, path, title=f"{opts.objective} pretext, {opts.backbone} on {dataset}")
        return
    summary = [{"arm": arm_label(row), "label_fraction": row["label_fraction"],
                "test_accuracy_mean": row["test_accuracy"], "test_accuracy_sd": None} for row in result["runs"]]
    largest = max(row["label_fraction"] for row in result["runs"])
    curves = {arm_label(row): read_history_csv(os.path.join(row["run_dir"], rundir.HISTORY))
              for row in result["runs"] if row["label_fraction"] == largest}
    write_compare(summary, curves, path, title=f"{opts.backbone} on {dataset}: {arm_label_start(result)} vs + "
                                               f"{opts.objective} pretext ({opts.pretext_epochs} epochs)")


def arm_label(row: dict) -> str:
    start = "random init" if row["start"] == "random" else row["start"]
    return start if row["arm"] == "baseline" else f"{start} + pretext"


def arm_label_start(result: dict) -> str:
    start = result["settings"]["start"]
    return "random init" if start == "random" else start


TABLE = (Column("arm", arm_label), Column("fraction", "label_fraction", "g"), Column("train", "train_examples"),
         Column("test acc", "test_accuracy", ".4f"), Column("val acc", "best_val_accuracy", ".4f"),
         Column("wall s", "wall_seconds", ".1f"))


def format_table(result: dict) -> str:
    p = result["pretext"]
    head = (f"pretext {p['objective']}: {p['eval_split']} pretext accuracy {p['test_accuracy']:.4f} after "
            f"{p['epochs']} epoch(s), {p['wall_seconds']:.0f}s; backbone in {p['backbone_file']}")
    return head + ("\n" + table.format_table(TABLE, result["runs"]) if result["runs"] else "")
