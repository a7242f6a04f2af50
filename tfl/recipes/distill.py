"""`tfl distill`: knowledge distillation (Hinton et al. 2015) and Born-Again Networks (Furlanello et al. 2018).

A student learns from the labels and from a frozen teacher's softened outputs:

    loss = alpha * CE(labels, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

with s, t the student's and teacher's logits (float32). The T^2 factor keeps the soft term's gradients on the
label term's scale (they shrink as 1/T^2 otherwise). alpha = 0 learns from the teacher only.

The teacher is a run directory (tfl finetune, compare, distill ...) or a .keras model file (rebuilt in Keras'
safe mode, only tfl's own layer classes trusted). Its class names (classes.json of the run, or beside the file)
must be the data's. Without augmentation the teacher's logits for an image never change, so they are computed in
one pass over the train and val rows at the teacher's own input size, kept in the cache directory (keyed by the
teacher's weights and architecture, its input size and the rows, like boundary caches) and ride along as an extra
batch column; with --augment the teacher runs on every (augmented) batch, resized to its input size.

Members, each a normal run directory under the output directory (tfl evaluate, report, export, predict take it):
  student/         --student distilled from the teacher
  labels_only/     the same student, seed and epoch budget, trained on the labels only (--no-baseline: skipped)
  generation<k>/   with --born-again N instead of the student: k = 1..N has the teacher's architecture (backbone,
                   image size, head) and learns from generation k-1 (generation 0 = the teacher); one seed for
                   all (the seed also draws the validation split, which every generation must share)
A student trains as tfl finetune does (--head-epochs on the head, then --epochs above --freeze-up-to) when it
starts from pretrained weights, and every layer for --head-epochs + --epochs epochs when it starts from random
weights (batch norm trains too, momentum 0.9 as compare's scratch arm).

distill.json / distill.csv hold per model (teacher, members, the generations' ensemble): test accuracy,
parameters, model file size, inference images/s at batch 1 and 64 (measured here, on this machine's load),
median epoch seconds (the median leaves out the first epoch's tracing); distill.png plots accuracy against
parameters and against throughput.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import ClassVar

from tfl.bench import significant  # throughputs to significant figures: a slow machine's never rounds to 0
from tfl.errors import UsageError
from tfl.job import Job, JobOptions, Stage
from tfl.options import SWEEP_RUN, augmentation_flags, check_options as check_fields, option
from tfl.options import TEACHER_LOGITS as TEACHER_MODES
from tfl.recipes import sweep
from tfl.recipes.stages import RANDOM_START, head_then_finetune, scratch_stage, starts_random
from tfl.reporting import table
from tfl.reporting.table import Column

DISTILL_JSON, DISTILL_CSV, DISTILL_PNG = "distill.json", "distill.csv", "distill.png"
TEACHER_COLUMN = "teacher_logits"  # the batch column the cached teacher logits ride in
DEFAULT_STUDENT = "compact_cnn"
COLUMNS = ("role", "model", "image_size", "test_accuracy", "params", "file_bytes", "images_per_second_batch1",
           "images_per_second_batch64", "epoch_seconds", "teacher_seconds", "run_dir")
THROUGHPUT_BATCHES = (1, 64)


@dataclasses.dataclass
class DistillOptions(JobOptions):
    unused: ClassVar = ("backbone", "weights", *SWEEP_RUN)
    option_help: ClassVar = {"output_dir": (
        "Where distill.json/.csv/.png and every member's run directory go (default: runs/<time>-distill-<dataset>). "
        "Rerun with the same directory to continue an interrupted run.")}

    teacher: str = option("", metavar="RUN_DIR|MODEL.keras", required=True, show_default=False, help=(
        "The frozen teacher: a run directory (tfl finetune, compare, distill) or a .keras model file "
        "(classes.json beside it is checked against the data's classes when present)."))
    student: str = option(DEFAULT_STUDENT, help=(
        "The student's backbone, a name from `tfl backbones` (compact_cnn: ~0.33 M parameters, random init; "
        "efficientnet_lite0 with --image-size 56: pretrained at a lower resolution)."))
    student_weights: str = option("default", help=(
        "'default' (the student backbone's pretrained weights, random init when it has none), 'none' or a weights "
        "file. A random-init student trains every layer for --head-epochs + --epochs epochs."))
    temperature: float = option(4.0, check="positive", metavar="T",
                                help="Softens both distributions: softmax(logits / T).")
    alpha: float = option(0.1, check=(0, 1, False, False), help=(
        "loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)); the "
        "T^2 factor keeps the soft term's gradients on the label term's scale. 0 = soft targets only."))
    born_again: int = option(0, check="non_negative", metavar="N", help=(
        "Born-Again Networks: instead of --student, N generations with the teacher's architecture, generation k+1 "
        "learning from generation k; reports each and their ensemble."))
    teacher_logits: str = option("auto", choices=TEACHER_MODES, help=(
        "cached: one teacher pass over train and val, kept in --cache-dir for later runs; online: the teacher runs "
        "on every batch (the student then trains on images, no boundary cache); auto: online with --augment, "
        "--random-erasing, --mixup or --cutmix (the teacher sees the augmented, mixed images), else cached."))
    baseline: bool = option(True, flag="--baseline/--no-baseline", help=(
        "Also train the same student on the labels only, with the same seed and epochs."))
    throughput_seconds: float = option(2.0, check="positive", help=(
        "How long each model's inference images/s is timed, per batch size (1, 64)."))


# DistillOptions' own fields: which members train (a member's config.json records the teacher, T, alpha and mode)
SWEEP_ONLY = ("student", "student_weights", "born_again", "baseline", "throughput_seconds")


# -- the loss -------------------------------------------------------------------------------------------------------
class DistillationLoss:
    """The loss hook: per-example alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), all float32.

    The teacher's logits come from batch[TEACHER_COLUMN] (cached) or, without that column, from
    `teacher(batch[IMAGE])` (online). Label smoothing applies to the label term; batch["sample_weight"] to both.
    """

    def __init__(self, num_classes: int, temperature: float, alpha: float, label_smoothing: float = 0.0,
                 teacher=None):
        self.num_classes, self.temperature, self.alpha = num_classes, float(temperature), float(alpha)
        self.label_smoothing, self.teacher = label_smoothing, teacher

    def teacher_logits(self, batch: dict):
        return batch_teacher_logits(batch, self.teacher)

    def __call__(self, batch: dict, logits):
        import keras
        import tensorflow as tf

        from tfl.training.trainer import targets

        student = tf.cast(logits, tf.float32)
        teacher = batch_teacher_logits(batch, self.teacher)
        hard = keras.losses.categorical_crossentropy(targets(batch, self.num_classes), student, from_logits=True,
                                                     label_smoothing=self.label_smoothing)
        t = self.temperature
        log_p_teacher = tf.nn.log_softmax(teacher / t, axis=-1)
        log_p_student = tf.nn.log_softmax(student / t, axis=-1)
        soft = tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1) * (t * t)
        loss = self.alpha * hard + (1.0 - self.alpha) * soft
        return loss * tf.cast(batch["sample_weight"], loss.dtype) if "sample_weight" in batch else loss


def batch_teacher_logits(batch: dict, teacher=None):
    """The teacher's logits for a batch: its TEACHER_COLUMN (cached), else teacher(batch[IMAGE]) (online); the
    loss and the agreement metric share it."""
    import tensorflow as tf

    from tfl.data.pipeline import IMAGE

    if TEACHER_COLUMN in batch:
        logits = batch[TEACHER_COLUMN]
    elif teacher is not None and IMAGE in batch:
        logits = teacher(batch[IMAGE])
    else:
        raise UsageError(f"the distillation loss needs a {TEACHER_COLUMN!r} column or image batches and a teacher; "
                         f"the batch has {', '.join(batch)}")
    return tf.stop_gradient(tf.cast(logits, tf.float32))


def distill_metrics(loss: DistillationLoss):
    """accuracy on the labels, and agreement: the student's top class is the teacher's."""
    import tensorflow as tf

    from tfl.training.trainer import accuracy

    def metrics(batch, logits):
        top = tf.argmax(logits, -1, output_type=tf.int32)
        teacher = batch_teacher_logits(batch, loss.teacher)
        agree = tf.equal(top, tf.argmax(teacher, -1, output_type=tf.int32))
        return {**accuracy(batch, logits), "agreement": tf.cast(agree, tf.float32)}

    return metrics


# -- the teacher ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Teacher:
    path: str  # as given
    model_file: str
    model: object  # keras.Model: raw 0-255 pixels in, logits out
    classes: list | None  # None: a bare .keras file without classes.json beside it
    config: dict  # the run's config.json ({} for a bare file)

    @property
    def image_size(self) -> int:
        return int(self.model.inputs[0].shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.model.outputs[0].shape[-1])

    @property
    def backbone(self) -> str | None:
        """The registered backbone inside (from the run's config, else the nested model's name)."""
        from tfl.backbones import registry
        from tfl.models import backbone_of

        if self.config.get("backbone"):
            return self.config["backbone"]
        try:
            name = backbone_of(self.model).name
        except ValueError:
            return None
        return name if name in registry.names() else None

    def digest(self) -> dict:
        """What the teacher's logits depend on: its weights and its architecture."""
        from tfl.training.boundary import _digest, _weights_digest

        return {"weights": _weights_digest([self.model]),
                "architecture": _digest(json.dumps(self.model.get_config(), sort_keys=True, default=str).encode())}


def check_teacher_path(path: str) -> None:
    if not path:
        raise UsageError("--teacher is required: a run directory (tfl finetune, compare, distill) or a .keras file")
    if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".keras"))):
        raise UsageError(f"--teacher {path!r}: neither a run directory nor a .keras model file")


def load_teacher(path: str) -> Teacher:
    """A run directory's model.keras, classes.json and config.json; or a .keras file (classes.json beside it
    when there is one), rebuilt in safe mode after the same config audit as --init-from files."""
    import zipfile

    import keras

    from tfl import reuse
    from tfl.checkpoints.keras_files import audit_config
    from tfl.training import rundir

    check_teacher_path(path)
    if os.path.isdir(path):
        run = rundir.RunDir(path, create=False)
        config, classes = run.read_json(rundir.CONFIG), run.read_json(rundir.CLASSES)
        return Teacher(path, run.file(rundir.MODEL), run.load_model(), list(classes), config)
    try:
        with zipfile.ZipFile(path) as archive:
            problems = audit_config(json.loads(archive.read("config.json")), reuse.custom_objects())
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
        raise UsageError(f"--teacher {path!r}: not a readable Keras model file ({err})") from None
    if problems:
        raise UsageError(f"--teacher {path!r}: refused, its config names code: {'; '.join(problems[:3])}")
    try:
        model = keras.saving.load_model(path, custom_objects=reuse.custom_objects(), compile=False, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - whatever Keras cannot rebuild is the file's problem
        raise UsageError(f"--teacher {path!r}: Keras cannot rebuild it ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from None
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), rundir.CLASSES)
    classes = None
    if os.path.isfile(beside):
        with open(beside) as f:
            classes = list(json.load(f))
    return Teacher(path, path, model, classes, {})


def check_classes(teacher: Teacher, class_names, dataset: str) -> str | None:
    """ValueError naming the difference when the teacher's classes are not the data's; returns a note when only
    the count could be checked (a .keras file without classes.json)."""
    names = list(class_names)
    if teacher.classes is None:
        if teacher.num_classes != len(names):
            raise UsageError(f"--teacher {teacher.path!r} outputs {teacher.num_classes} classes but --dataset "
                             f"{dataset!r} has {len(names)}: {', '.join(names)}")
        return (f"teacher: {teacher.path} has no classes.json beside it; only its class count ({len(names)}) "
                "was checked against the data")
    if teacher.classes != names:
        only_teacher = [c for c in teacher.classes if c not in names]
        only_data = [c for c in names if c not in teacher.classes]
        detail = (f"the teacher's only: {', '.join(only_teacher) or 'none'}; the data's only: "
                  f"{', '.join(only_data) or 'none'}")
        if not only_teacher and not only_data:
            detail = f"same names, different order: teacher {teacher.classes}, data {names}"
        raise UsageError(f"--teacher {teacher.path!r} was trained on other classes than --dataset {dataset!r} has "
                         f"({detail}); distill on data with the teacher's classes")
    if teacher.num_classes != len(names):
        raise UsageError(f"--teacher {teacher.path!r} outputs {teacher.num_classes} classes but its classes.json "
                         f"names {len(names)}")
    return None


def log_split_mismatch(teacher: Teacher, opts: JobOptions, log) -> None:
    """A warning when the teacher's run drew its validation split otherwise: it may have trained on this run's
    validation rows, which then flatter the student's selection (the test split is never trained on)."""
    cfg = teacher.config
    differ = [f"--{name.replace('_', '-')} {cfg[name]} (here {getattr(opts, name)})"
              for name in ("dataset", "val_split", "seed") if name in cfg and cfg[name] != getattr(opts, name)]
    if differ:
        log(f"warning: the teacher's run used {', '.join(differ)}: its training rows may include this run's "
            "validation rows")


def forward(model, jit: bool = False):
    """float32 images [B, S, S, 3] (0..255) at any size -> the model's logits, in inference mode; one trace."""
    import tensorflow as tf

    from tfl.data.pipeline import to_model_input

    size = int(model.inputs[0].shape[1])

    @tf.function(jit_compile=jit, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def run(images):
        return tf.cast(model(to_model_input(images, size), training=False), tf.float32)

    return run


def predict_logits(model, source, count: int, batch_size: int, label: str = "logits", fn=None, out=None,
                   labels=None):
    """(logits float32 [count, C], labels int32 [count]) of `model` over an unbatched source, in source order,
    images resized to the model's input size as evaluation does. `out`/`labels`: arrays to fill instead."""
    import numpy as np

    from tfl.data import make_pipeline
    from tfl.data.pipeline import IMAGE, LABEL
    from tfl.training.trainer import Progress

    size = int(model.inputs[0].shape[1])
    fn = fn or forward(model)
    out = np.zeros((count, int(model.outputs[0].shape[-1])), np.float32) if out is None else out
    labels = np.zeros((count,), np.int32) if labels is None else labels
    progress, done = Progress(-(-count // batch_size), f"  {label}"), 0
    for step, batch in enumerate(make_pipeline(source, size, batch_size, training=False, seed=0), 1):
        values = fn(batch[IMAGE]).numpy()
        out[done: done + len(values)], labels[done: done + len(values)] = values, batch[LABEL].numpy()
        done += len(values)
        progress.update(step)
    progress.close()
    if done != count:
        raise UsageError(f"{label}: the split has {done} examples, not the {count} it was counted to have")
    return out, labels


def teacher_key(teacher_digest: dict, image_size: int, data_id: dict) -> dict:
    """Everything cached teacher logits depend on; a change in any of them makes a different cache entry."""
    import keras
    import tensorflow as tf

    from tfl.training.boundary import PIPELINE_VERSION

    return {"kind": "teacher_logits", "teacher": teacher_digest, "image_size": image_size, "data": data_id,
            "pipeline": PIPELINE_VERSION, "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}}


def data_ids(job: Job) -> dict:
    """split -> the identity of the rows the job trains and validates on, as boundary caches key them."""
    from tfl.training.boundary import data_identity, rows_digest

    subset = rows_digest(job.train_rows) if job.train_rows is not None else None
    return {"train": data_identity(job.splits.fingerprint, "train", subset),
            "val": data_identity(job.splits.fingerprint, "val")}


def cached_teacher_logits(job: Job, teacher: Teacher, digest: dict, log) -> tuple[dict, dict]:
    """({split: {TEACHER_COLUMN: logits row-aligned with the split}}, info): from the cache when an earlier run
    with the same teacher and rows computed them, else one pass of the teacher over train and val."""
    import numpy as np

    from tfl.cache import ArrayCache, default_cache_dir, format_size, parse_disk_limit, parse_size

    opts = job.opts
    cache = ArrayCache(opts.cache_dir or default_cache_dir(), parse_size(opts.cache_budget), log=log,
                       disk_limit=parse_disk_limit(opts.cache_disk_limit))
    sources = {"train": (job.train_source, job.n_train), "val": (job.splits.val, job.splits.num_examples["val"])}
    columns, info, fn = {}, {"seconds": 0.0, "reused": True}, None
    for split, (source, count) in sources.items():
        key = teacher_key(digest, teacher.image_size, data_ids(job)[split])
        entry = cache.lookup(key)
        if entry is None:
            fn = fn or forward(teacher.model, opts.jit)

            def fill(data, labels, source=source, count=count, split=split):
                start = time.perf_counter()
                predict_logits(teacher.model, source, count, job.batch, f"teacher logits of {split}", fn, data, labels)
                return {"seconds": time.perf_counter() - start}

            entry = cache.build(key, count, (teacher.num_classes,), np.float32, fill, persist=opts.cache != "off")
            info["seconds"] += entry.info.get("seconds", 0.0)
            info["reused"] = False
        how = "reused from an earlier run" if entry.reused else f"computed in {entry.info.get('seconds', 0.0):.1f}s"
        log(f"teacher logits of {split}: {count} x {teacher.num_classes} at {teacher.image_size}px, "
            f"{format_size(entry.nbytes)} in {entry.where()}; {how}")
        columns[split] = {TEACHER_COLUMN: entry.data}
    info["seconds"] = round(info["seconds"], 2)
    return columns, info


# -- one member -----------------------------------------------------------------------------------------------------
def member_stages(job: Job) -> list[Stage]:
    """tfl finetune's two stages for a pretrained student; every layer at once for a randomly initialised one."""
    return [scratch_stage(job)] if starts_random(job.opts) else head_then_finetune(job)


def member_recipe(teacher_path: str | None, state: dict, log) -> "callable":
    """The recipe of one member: learn from `teacher_path` (None: the labels only)."""

    def recipe(job: Job) -> dict:
        opts = job.opts
        state.setdefault("splits", job.splits)
        stages = member_stages(job)
        loss = metrics = extra = None
        config = {"member_stages": [s.name for s in stages]}
        teacher_info = {"seconds": None, "reused": None, "mode": None}
        if teacher_path is not None:
            teacher = state["teachers"].get(teacher_path) or load_teacher(teacher_path)
            state["teachers"][teacher_path] = teacher
            note = check_classes(teacher, job.class_names, opts.dataset)
            if note:
                log(note)
            log_split_mismatch(teacher, opts, log)
            digest = teacher.digest()
            config["teacher_digest"] = digest
            online = opts.teacher_logits == "online"
            if online:
                fn = forward(teacher.model, opts.jit)
                loss = DistillationLoss(len(job.class_names), opts.temperature, opts.alpha, opts.label_smoothing, fn)
                log(f"teacher: {teacher.path} runs on every batch ({teacher.image_size}px)")
            else:
                extra, teacher_info = cached_teacher_logits(job, teacher, digest, log)
                loss = DistillationLoss(len(job.class_names), opts.temperature, opts.alpha, opts.label_smoothing)
            teacher_info["mode"] = opts.teacher_logits
            metrics = distill_metrics(loss)
        job.prepare(stages, config=config, loss=loss, metrics=metrics, extra=extra)
        job.train(stages)
        seconds = [r.seconds for r in job.trainer.history]
        return job.finish(extra_metrics={"teacher": teacher_path, "teacher_seconds": teacher_info["seconds"],
                                         "teacher_logits": teacher_info["mode"],
                                         "teacher_logits_reused": teacher_info["reused"],
                                         "epoch_seconds": [round(s, 2) for s in seconds]})

    return recipe


def member_run(opts: DistillOptions, role: str, backbone: str, weights: str | None, output_dir: str,
               teacher: str | None, overrides: dict | None = None) -> sweep.Run:
    changes = {"backbone": backbone, "weights": weights, "output_dir": output_dir, "export": False,
               "teacher": teacher, **(overrides or {})}
    if teacher is None:  # trained on the labels only
        changes.update(temperature=None, alpha=None, teacher_logits=None)
    else:
        changes["teacher_logits"] = resolved_mode(opts)
        if changes["teacher_logits"] == "online":
            changes["cache"] = "off"  # the teacher needs the images, so the student trains on images too
    member = sweep.derive(opts, **changes)
    if starts_random(member):
        # Random weights: every layer trains from the start, batch norm too (its statistics are random).
        member = dataclasses.replace(member, **RANDOM_START)
    learns = f" learns from {teacher}" if teacher else " on the labels only"
    return sweep.Run(f"{role}: {backbone}{learns}", member, None, {"recipe": "distill", "role": role}, SWEEP_ONLY,
                     {"role": role})


def resolved_mode(opts: DistillOptions) -> str:
    if opts.teacher_logits == "auto":
        return "online" if augmentation_flags(opts) else "cached"
    return opts.teacher_logits


# -- the command ----------------------------------------------------------------------------------------------------
def check_options(opts: DistillOptions) -> None:
    from tfl.backbones import registry

    check_fields(opts)
    check_teacher_path(opts.teacher)
    augmented = augmentation_flags(opts)
    if opts.teacher_logits == "cached" and augmented:
        raise UsageError(f"--teacher-logits cached cannot be used with {', '.join(augmented)}: augmentation changes "
                         "the images (or features) the teacher would see every epoch; use --teacher-logits online "
                         "(or auto), or drop " + ", ".join(augmented))
    if opts.born_again and opts.student != DEFAULT_STUDENT:
        raise UsageError(f"--student {opts.student} and --born-again {opts.born_again}: born-again generations have "
                         "the teacher's architecture; drop one of them")
    if not opts.born_again:
        registry.get(opts.student)
    if opts.head_epochs + opts.epochs < 1:
        raise UsageError(f"--head-epochs {opts.head_epochs} and --epochs {opts.epochs}: nothing to train; make their "
                         "sum >= 1")


def plan_members(opts: DistillOptions, out: str, teacher: Teacher) -> list[sweep.Run]:
    """The members in training order; with --born-again, generation k learns from generation k-1."""
    members = []
    if opts.born_again:
        cfg = teacher.config
        if teacher.backbone is None:
            raise UsageError(f"--born-again: cannot tell the architecture of --teacher {teacher.path!r} (no run "
                             "config, no registered backbone inside); use a run directory as the teacher")
        arch = {"image_size": teacher.image_size, "head_hidden": tuple(cfg.get("head_hidden", ())),
                "dropout": cfg.get("dropout", opts.dropout)}
        weights = cfg.get("weights", "default")
        previous = opts.teacher
        for k in range(1, opts.born_again + 1):
            path = os.path.join(out, f"generation{k}")
            members.append(member_run(opts, f"generation{k}", teacher.backbone, weights, path, previous, arch))
            previous = path
        if opts.baseline:
            members.append(member_run(opts, "labels_only", teacher.backbone, weights,
                                      os.path.join(out, "labels_only"), None, arch))
        return members
    members.append(member_run(opts, "student", opts.student, opts.student_weights, os.path.join(out, "student"),
                              opts.teacher))
    if opts.baseline:
        members.append(member_run(opts, "labels_only", opts.student, opts.student_weights,
                                  os.path.join(out, "labels_only"), None))
    return members


def distill(opts: DistillOptions, log=print) -> dict:
    """Train every member, then score and time every model; returns what distill.json holds, plus output_dir."""
    check_options(opts)
    from tfl.training import rundir, strategy as strategies

    out = opts.output_dir or rundir.default_path("distill", opts.dataset)
    # The strategy before the teacher loads: --devices splits the CPU into logical devices, which TensorFlow allows
    # only before it initialises (loading a model does). Every member's jobs.run then gets this same strategy.
    if opts.devices:
        strategies.make_strategy(opts.strategy, opts.devices, opts.worker_hosts, opts.task_index)
    teacher = load_teacher(opts.teacher)
    state = {"teachers": {opts.teacher: teacher}}
    members = plan_members(opts, out, teacher)
    for number, member in enumerate(members, 1):
        member.name = f"{number}/{len(members)} {member.name}"
        member.recipe = member_recipe(member.options.teacher, state, log)
    unused = ("backbone", "weights")  # --student and --student-weights (or the teacher's) say what each member is
    settings = {"options": {k: v for k, v in dataclasses.asdict(opts).items() if k not in unused},
                "teacher_logits": resolved_mode(opts),
                "members": [{"role": m.row["role"], "backbone": m.options.backbone, "teacher": m.options.teacher,
                             "seed": m.options.seed, "image_size": m.options.image_size,
                             "run_dir": m.options.output_dir} for m in members]}
    result = {"output_dir": out, "settings": settings, "models": [], "members": []}
    tables = sweep.Tables(DISTILL_JSON, {DISTILL_CSV: (COLUMNS, lambda r: r["models"])})
    sweep.sweep(members, out, result, tables, log, "distill", key="members")
    result["models"] = score_models(opts, teacher, result["members"], state["splits"], log)
    from tfl.reporting.figures import write_distill

    def figure(folder, result):
        write_distill(result["models"], folder.file(DISTILL_PNG),
                      title=f"{os.path.basename(os.path.normpath(opts.dataset))}: teacher "
                            f"{teacher.backbone or 'model'} {teacher.image_size}px, T={opts.temperature:g}, "
                            f"alpha={opts.alpha:g}")

    sweep.write(out, result, dataclasses.replace(tables, figure=figure))
    log(f"distill: wrote {os.path.join(out, DISTILL_JSON)}, {DISTILL_CSV} and {DISTILL_PNG}")
    return result


# -- scoring --------------------------------------------------------------------------------------------------------
def throughput(model, batch: int, seconds: float) -> float:
    """Images per second of the model's forward pass at `batch` (inference mode, after a warm-up call)."""
    import numpy as np
    import tensorflow as tf

    size = int(model.inputs[0].shape[1])
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([batch, size, size, 3])])
    images = tf.constant(np.random.RandomState(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    fn(images).numpy()
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        fn(images).numpy()
        runs += 1
    return batch * runs / (time.perf_counter() - start)


def score_models(opts: DistillOptions, teacher: Teacher, members: list[dict], splits, log) -> list[dict]:
    """One row per model: the teacher, each member, and (with --born-again) the generations' ensemble (mean of
    their softmax probabilities; its images/s is the members' run one after another)."""
    import numpy as np

    from tfl.job import held_out_accuracy
    from tfl.training import rundir

    split = "test" if splits.test is not None else "val"
    source, count = getattr(splits, split), splits.num_examples[split]
    models = [("teacher", teacher.model, teacher.model_file, None, teacher.backbone, None)]
    for row in members:
        run = rundir.RunDir(row["run_dir"], create=False)
        config = run.read_json(rundir.CONFIG)
        models.append((row["role"], run.load_model(), run.file(rundir.MODEL), row, config["backbone"], config))
    rows, probabilities = [], {}
    for role, model, path, member, backbone, _ in models:
        logits, labels = predict_logits(model, source, count, opts.batch_size, f"{role} on {split}")
        accuracy = float(np.mean(np.argmax(logits, -1) == labels))
        if member is not None and abs(accuracy - held_out_accuracy(member)) > 1e-3:
            log(f"warning: {role}'s {split} accuracy {accuracy:.4f} differs from its metrics.json "
                f"{held_out_accuracy(member):.4f}")
        if role.startswith("generation"):
            probabilities[role] = _softmax(logits)
        speeds = {b: throughput(model, b, opts.throughput_seconds) for b in THROUGHPUT_BATCHES}
        epochs = member["epoch_seconds"] if member else []
        rows.append({"role": role, "model": backbone or model.name, "image_size": int(model.inputs[0].shape[1]),
                     "test_accuracy": round(accuracy, 6), "params": int(model.count_params()),
                     "file_bytes": os.path.getsize(path),
                     "images_per_second_batch1": significant(speeds[1]),
                     "images_per_second_batch64": significant(speeds[64]),
                     "epoch_seconds": round(statistics.median(epochs), 2) if epochs else None,
                     "teacher_seconds": member["teacher_seconds"] if member else None,
                     "run_dir": member["run_dir"] if member else teacher.path, "eval_split": split})
        log(f"scored {role}: {split} accuracy {accuracy:.4f}, {speeds[1]:.0f} / {speeds[64]:.0f} images/s at "
            "batch 1 / 64")
    if probabilities:
        mean = np.mean(list(probabilities.values()), axis=0)
        generations = [r for r in rows if r["role"] in probabilities]
        rows.append({"role": "ensemble", "model": f"mean of {len(generations)} generation(s)",
                     "image_size": generations[0]["image_size"],
                     "test_accuracy": round(float(np.mean(np.argmax(mean, -1) == labels)), 6),
                     "params": sum(r["params"] for r in generations),
                     "file_bytes": sum(r["file_bytes"] for r in generations),
                     **{f"images_per_second_batch{b}": significant(1.0 / sum(1.0 / r[f"images_per_second_batch{b}"]
                                                                             for r in generations))
                        for b in THROUGHPUT_BATCHES},
                     "epoch_seconds": None, "teacher_seconds": None, "run_dir": None, "eval_split": split})
    return rows


def _softmax(logits):
    import numpy as np

    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


TABLE = (Column("role", "role"), Column("model", lambda r: str(r["model"])[:23]), Column("px", "image_size"),
         Column("test acc", "test_accuracy", ".4f"), Column("params", "params", ","),
         Column("MB", lambda r: r["file_bytes"] / 2**20, ".2f"), Column("img/s b1", "images_per_second_batch1", ".1f"),
         Column("img/s b64", "images_per_second_batch64", ".1f"), Column("epoch s", "epoch_seconds", ".1f"))


def format_table(result: dict) -> str:
    return table.format_table(TABLE, result["models"])
