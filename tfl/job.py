"""What every tfl command shares: source -> tf.data -> model -> freeze plan -> strategy -> run directory -> resume
point -> stage inputs -> trainer, and the stage loop. A recipe (tfl/recipes/) only says which stages to train.

    job = Job.setup(opts, log, strategy, scratch)     # data, model, base freeze plan
    stages = [Stage("head", head_only_plan(job.plan), 10, {"head": job.lr}), ...]
    job.prepare(stages)                               # caches, config, run directory, resume point, trainer
    job.train(stages)
    metrics = job.finish()                            # best weights, test split, model.keras, metrics, figures

`run(opts, recipe, log)` wraps this for multi-worker runs: every worker runs the same steps, only the chief
writes the run directory (the others write into a scratch directory removed at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Callable

from tfl import data
from tfl.version import __version__
from tfl.backbones import registry
from tfl.errors import UsageError
from tfl.options import (ADAPTER_NONE, BACKBONE_LR_FACTOR, DEFAULT_BACKBONE, DEFAULT_DATASET,  # noqa: F401
                         PRECISIONS, JobOptions)
from tfl.reporting.figures import write_curves
from tfl.training import checkpoint, rundir, strategy as strategies

# The modules built on TensorFlow/Keras (tfl.models, tfl.freezing, tfl.precision, tfl.reuse, tfl.training.boundary
# and .trainer, tfl.serving.saved_model, the TensorBoard writer) are imported inside the functions that use them:
# the CLI imports this module (and every recipe, which imports it) to print --help, and TensorFlow takes seconds.
# None of them imports tfl.job, so these are not hidden cycles (tests/test_layering.py checks).

RESTORE_REPORT = "restore_report.json"
AUTO = "auto"  # --freeze-up-to auto: the command's DepthResolver chooses the depth
ADVICE = "advice.json"  # --freeze-up-to auto: what the resolver measured and chose
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
SMALL_IMAGE_UPSCALE = 4  # 28x28 / 32x32 datasets are upscaled 4x (112 / 128 px) unless --image-size says
# Settings a resumed run may change: where files are, how the work is spread (the global batch and learning
# rates are still compared), what happens after training. Any other difference is refused.
RESUME_MAY_CHANGE = ("output_dir", "data_dir", "resume", "overwrite", "strategy", "devices", "worker_hosts",
                     "task_index", "export", "calibrate", "tta", "versions", "command", "cache", "cache_budget",
                     "cache_dir", "tensorboard",
                     # how the precision was chosen may change; the precision itself ("precision") may not
                     "mixed_precision", "precision_choice",
                     # keep or stream the decoded images: the same batches either way (tfl.training.boundary)
                     "decoded_images", "decoded_images_chosen", "cache_disk_limit",
                     # how the step runs on its device, not what it computes (auto differs by device kind)
                     "deterministic", "jit", "readback_every",
                     # how --freeze-up-to auto scores depths: a resume keeps the depth its advice.json chose
                     "proxy_folds", "proxy_tie_rule")


# --freeze-up-to auto: (opts, spec, splits, train source, n_train, train rows, log, strategy) -> (opts with a concrete
# freeze_up_to and image_size, the advice recorded as advice.json). A hook, so this shared layer calls no recipe.
DepthResolver = Callable[..., "tuple[JobOptions, dict]"]


@dataclasses.dataclass
class Stage:
    """One stage of a recipe: which layers train (a freeze plan), for how long, at which learning rates.

    `lrs` maps parameter groups to learning rates; `group_of` maps a layer's canonical stage (CLASSIFIER_STAGE
    for the new head) to its group. The default makes two groups, "backbone" and "head".
    """

    name: str
    plan: object  # tfl.freezing.FreezePlan
    epochs: int
    lrs: dict
    policy: object = None  # tfl.training.trainer.StagePolicy; None: the trainer's default
    group_of: Callable[[str], str] | None = None
    inputs: str | None = None  # the prepared stage whose inputs (cache) it trains on; None: its own


def backbone_or_head(stage: str) -> str:
    from tfl.freezing import CLASSIFIER_STAGE  # Keras (see the top)

    return "head" if stage == CLASSIFIER_STAGE else "backbone"


def pick_image_size(requested: int | None, spec_size: int, native_size, min_size: int = 32) -> int:
    if requested:
        return requested
    if native_size and max(native_size) <= 64:
        return min(spec_size, max(min_size, SMALL_IMAGE_UPSCALE * max(native_size)))
    return spec_size


def train_rows(splits, opts: JobOptions):
    """The rows of the train split to train on: a stratified --label-fraction of each class, then --limit-train
    of those at random, both seeded; None when that is every row."""
    size = splits.num_examples["train"]
    rows = None
    if opts.label_fraction is not None and opts.label_fraction < 1.0:
        labels = splits.train_labels if splits.train_labels is not None else data.labels_of(splits.train)
        rows = data.stratified_rows(labels, opts.label_fraction, opts.seed)
    kept = size if rows is None else len(rows)
    if opts.limit_train and opts.limit_train < kept:
        picked = data.random_rows(kept, opts.limit_train, opts.seed)
        rows = picked if rows is None else rows[picked]
    return rows


def versions() -> dict:
    import keras
    import numpy
    import tensorflow as tf

    return {"tfl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def resolve_step_options(opts: JobOptions, strategy) -> JobOptions:
    """--deterministic, --jit and --readback-every as this run takes them (auto: the strategy's device kind's
    default, tfl.training.device), op determinism set accordingly; config.json then records the choices."""
    from tfl.training import device  # TensorFlow (see the top)

    kind = device.device_kind(strategy)
    deterministic = device.resolve_deterministic(opts.deterministic, kind)
    device.set_op_determinism(deterministic)
    return dataclasses.replace(opts, deterministic=deterministic,
                               jit=device.resolve_jit(opts.jit, kind, deterministic),
                               readback_every=device.resolve_readback(opts.readback_every, kind))


def check_finite(opts) -> None:
    """Refuse NaN and infinite option values (click's FLOAT takes "nan" and "inf"): they would train NaNs."""
    for field in dataclasses.fields(opts):
        value = getattr(opts, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{field.name.replace('_', '-')} {value}: must be a finite number")


def run(opts: JobOptions, recipe: Callable[["Job"], dict], log=print, targets=None,
        resolve_depth: DepthResolver | None = None, data_view: Callable | None = None) -> dict:
    """Set up a job for `opts` and let `recipe(job)` train it; returns the recipe's metrics. `targets`,
    `resolve_depth`, `data_view`: see Job.setup.

    In a multi-worker run every worker calls this. Only the chief writes the run directory, holding its lock
    (rundir.RunLock) for the whole run; the others write the same files into a temporary directory, removed at
    the end, so every worker runs the same steps.
    """
    check_finite(opts)
    if opts.resume and opts.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --overwrite starts anew; drop one")
    if opts.resume and not opts.output_dir:
        raise UsageError("--resume needs --output-dir: the run directory to continue")
    if opts.resume and not checkpoint.has_checkpoint(os.path.join(opts.output_dir, rundir.CHECKPOINTS)):
        raise checkpoint.ResumeError(f"--resume: {opts.output_dir} has no checkpoint to continue from; "
                                     "drop --resume to start a new run there")
    # First of all: logical devices and the cluster can only be set up before TensorFlow initialises.
    strategy = strategies.make_strategy(opts.strategy, opts.devices, opts.worker_hosts, opts.task_index)
    if strategies.is_chief(strategy):
        path = opts.output_dir or rundir.default_path(opts.backbone, opts.dataset)
        opts = dataclasses.replace(opts, output_dir=path)
        with rundir.RunLock(path):
            has_checkpoint = checkpoint.has_checkpoint(os.path.join(path, rundir.CHECKPOINTS))
            for removed in rundir.check_reusable(path, opts.overwrite, has_checkpoint):
                log(f"--overwrite: removed {removed}")
            fresh = not rundir.run_files(path)
            try:
                return recipe(Job.setup(opts, log, strategy, scratch=None, targets=targets,
                                        resolve_depth=resolve_depth, data_view=data_view))
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM (tfl.training.stopping.Terminated)
                if fresh:
                    forget_untrained(path, log)
                raise
    scratch = tempfile.mkdtemp(prefix=f"tfl-{strategies.worker_name(strategy)}-")
    try:
        return recipe(Job.setup(opts, log, strategy, scratch, targets=targets, resolve_depth=resolve_depth,
                                data_view=data_view))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclasses.dataclass
class Job:
    opts: JobOptions
    log: Callable
    strategy: object
    scratch: str | None
    spec: object  # BackboneSpec
    splits: object  # DatasetSplits
    image_size: int
    train_source: object
    n_train: int
    batch: int  # the global batch
    model: object  # the classifier (keras.Model)
    plan: object  # the base FreezePlan from --freeze-up-to and the rules
    restored: object  # RestoreReport of --init-from, or None
    started: float
    train_rows: object = None  # the rows of splits.train trained on (--label-fraction, --limit-train); None: all
    advice: dict | None = None  # --freeze-up-to auto: what tfl advise measured and chose (advice.json)
    precision: object = None  # tfl.precision.Choice: what the model computes in, and why
    targets: list | None = None  # the model's output names when they are not the data's classes (a pretext task)
    record: dict | None = None  # the options config.json records; None: every field (a sweep's run: tfl.recipes.sweep)
    # (job) -> extra metrics: what a command does with the saved model before --export (finetune --calibrate)
    finishers: list = dataclasses.field(default_factory=list)
    # set by prepare():
    inputs: object = None  # StageInputs
    config: dict | None = None
    run_dir: object = None  # RunDir
    snapshot: object = None
    trainer: object = None

    # -- the first half: data, model, plan --------------------------------------------------------------------------
    @classmethod
    def setup(cls, opts: JobOptions, log, strategy, scratch: str | None = None, targets=None,
              resolve_depth: DepthResolver | None = None, data_view: Callable | None = None) -> "Job":
        """`targets`: names of the model's outputs when they are not the data's classes (a pretext task's
        rotations); the model gets one logit per target, classes.json lists them, the data's labels stay.
        `resolve_depth`: what `--freeze-up-to auto` means, passed in by a command that offers it (`tfl finetune`
        passes tfl.recipes.advise.resolve_auto); without it `auto` is refused. `data_view`: splits -> splits,
        applied to the loaded data before anything reads it (tfl advise's k-fold proxy: one fold of train+val,
        tfl.data.folds.fold_splits)."""
        import keras

        from tfl import adapters, freezing, models, reuse  # Keras (see the top)

        spec = registry.get(opts.backbone)
        # The one place --freeze-up-to is resolved ("default" -> the backbone's stage, "none" -> None; auto below):
        # from here on opts, config.json and freeze_plan.json hold what the run freezes, which resume compares.
        opts = dataclasses.replace(opts, freeze_up_to=freezing.resolve_freeze_up_to(spec, opts.freeze_up_to))
        models.check_image_size(spec, opts.image_size)  # before the data is read
        if opts.label_fraction is not None:
            data.check_label_fraction(opts.label_fraction)
        if opts.freeze_up_to == AUTO and resolve_depth is None:
            raise UsageError("--freeze-up-to auto: this command cannot choose the depth (`tfl finetune` can, by "
                             "running `tfl advise`); give a stage of `tfl inspect`, or run `tfl advise` first and "
                             "pass the depth it recommends")
        if hasattr(opts, "adapter"):  # a command whose options mix in AdapterOptions
            adapters.check_options(opts)
        if getattr(opts, "save_adapters_only", False) and opts.export:
            raise UsageError("--save-adapters-only writes no model.keras, which --export exports: drop one (without "
                             "--save-adapters-only the run saves and exports the model with its adapters merged)")
        adapters.check_init_from(opts.init_from, opts)
        init = reuse.open_init_from(opts.init_from, opts.reuse, opts.reuse_exclude, opts.rename, opts.init_unsafe)
        keras.utils.set_random_seed(opts.seed)
        opts = resolve_step_options(opts, strategy)
        started = time.time()

        splits = data.load_dataset(opts.dataset, data_dir=opts.data_dir, val_split=opts.val_split, seed=opts.seed,
                                   skip_bad_images=opts.skip_bad_images, log=log)
        if data_view is not None:
            splits = data_view(splits)
        n_train = splits.num_examples["train"]
        train_source, rows = splits.train, train_rows(splits, opts)
        if rows is not None:
            train_source, n_train = data.take_rows(splits.train, n_train, rows), len(rows)
        advice = None
        if opts.freeze_up_to == AUTO:  # the command's resolver decides: a concrete stage (and size) from here on
            opts, advice = resolve_depth(opts, spec, splits, train_source, n_train, rows, log, strategy)
        image_size = pick_image_size(opts.image_size, spec.input_size, splits.native_size, spec.min_input_size)
        replicas = strategy.num_replicas_in_sync
        batch = opts.batch_size * replicas  # the global batch; --batch-size is per replica
        if n_train < batch and getattr(opts, "trains", True):  # fewshot (trains = False) only extracts features
            per_replica = f"{opts.batch_size}" + (f" x {replicas} replicas = {batch}" if replicas > 1 else "")
            raise UsageError(f"--batch-size {per_replica} is larger than the {n_train} training examples; lower it")
        log(f"data: {splits.name}: {n_train} train / {splits.num_examples['val']} val / "
            f"{splits.num_examples.get('test', 0)} test, {len(splits.class_names)} classes, images at {image_size}px")

        choice = choose_precision(opts, strategy, len(splits.class_names), image_size, batch, log)
        with strategy.scope():
            outputs = len(targets) if targets is not None else len(splits.class_names)
            model = models.build_classifier(opts.backbone, outputs, image_size, opts.weights,
                                            opts.head_hidden, opts.dropout, choice.precision)
        plan = freezing.make_plan(spec, model, opts.freeze_up_to, opts.rules)
        if getattr(opts, "adapter", ADAPTER_NONE) != ADAPTER_NONE:  # before --init-from, which may hold adapters
            with strategy.scope():
                adapted = adapters.add_lora(model, plan, opts.lora_rank, opts.lora_alpha)
            plan = freezing.make_plan(spec, model, opts.freeze_up_to, opts.rules)
            log(f"adapter: LoRA rank {opts.lora_rank} (alpha {opts.lora_alpha or opts.lora_rank:g}) on {len(adapted)} "
                f"layers above {opts.freeze_up_to}: {plan.trainable_params:,} trained parameters with the head")
        restored = reuse.restore_classifier(model, spec, init, opts.reuse, opts.reuse_exclude, opts.rename,
                                              log) if init else None
        with strategy.scope():
            # Fail on a plan the freeze mode cannot apply now, not after an earlier stage has trained.
            freezing.training_graph(model, plan, opts.freeze_mode, opts.train_bn)
        return cls(opts, log, strategy, scratch, spec, splits, image_size, train_source, n_train, batch, model, plan,
                   restored, started, train_rows=rows, advice=advice, precision=choice,
                   targets=list(targets) if targets is not None else None)

    # -- derived facts ------------------------------------------------------------------------------------------------
    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def lr(self) -> float:
        """The head's learning rate (x replicas with --scale-lr)."""
        return self.opts.lr * (self.replicas if self.opts.scale_lr else 1)

    @property
    def backbone_lr(self) -> float:
        base = self.opts.backbone_lr if self.opts.backbone_lr is not None else self.opts.lr * BACKBONE_LR_FACTOR
        return base * (self.replicas if self.opts.scale_lr else 1)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch

    @property
    def class_names(self) -> list:
        """The model's outputs: the data's classes, or the recipe's targets."""
        return list(self.targets) if self.targets is not None else list(self.splits.class_names)

    def steps(self, split: str) -> int:
        count = self.n_train if split == "train" else self.splits.num_examples.get(split, 0)
        return -(-count // self.batch)

    # -- the second half: caches, run directory, resume point, trainer -----------------------------------------------
    def prepare(self, stages: list[Stage], config: dict | None = None, loss=None, metrics=None, extra=None,
                callbacks=(), select: str = "val_accuracy", inputs=None) -> "Job":
        """Plan the stage inputs (--cache on refuses here, before the run directory exists), write the run
        directory (or find the resume point in it) and make the trainer. `config`: the recipe's own settings,
        recorded in config.json and compared on resume; loss/metrics/extra/callbacks/select: see Trainer and
        StageInputs; inputs: what the model is called on (Trainer's `inputs` hook, default the batch's images or
        cached features)."""
        from tfl.training import boundary
        from tfl.training import averaging, regularize
        from tfl.training.trainer import CrossEntropy, TrainConfig, Trainer

        opts = self.opts
        self.inputs = boundary.for_job(self, stages, extra)
        weights = self.spec.resolve_weights(opts.weights)
        plan = stages[-1].plan if stages else self.plan
        self.log(f"model: {opts.backbone} ({weights or 'random init'}), {plan.frozen_params:,} frozen / "
                 f"{plan.trainable_params:,} trainable parameters in the last stage, freeze mode {opts.freeze_mode}, "
                 f"{self.replicas} replica(s)")
        recorded = self.record if self.record is not None else dataclasses.asdict(opts)
        self.config = {**recorded, **(config or {}), "image_size": self.image_size,
                       "weights_resolved": weights, "num_classes": len(self.class_names),
                       "num_examples": {**self.splits.num_examples, "train": self.n_train},
                       "dataset_fingerprint": self.splits.fingerprint,
                       **({"data_fingerprints": self.splits.split_fingerprints}
                          if self.splits.split_fingerprints else {}),
                       "replicas": self.replicas,
                       "global_batch_size": self.batch, "stages": [_stage_record(s) for s in stages],
                       "decoded_images_chosen": self.inputs.decoded_record(),
                       "precision": self.precision.precision, "precision_choice": self.precision.to_json(),
                       "versions": versions(), "command": sys.argv}
        if self.advice:  # opts hold the resolved depth; resume compares it, and that it was chosen by auto
            self.config["freeze_up_to_requested"] = self.advice["requested"]
        self.snapshot = self._resume_point()
        strategies.check_workers_agree(self.strategy, self.snapshot.epoch if self.snapshot else 0,
                                       f"the epoch to resume from; each must read the chief's --output-dir "
                                       f"{opts.output_dir} (a shared filesystem)")
        run = rundir.RunDir(self.scratch or opts.output_dir or rundir.default_path(opts.backbone, opts.dataset))
        self.run_dir = run
        for path in run.remove_leftovers():
            self.log(f"removed {path}, a partial file from an interrupted run")
        if self.snapshot is None:
            run.write_json(rundir.CONFIG, self.config)
            run.write_json(rundir.CLASSES, self.class_names)
            run.write_json(rundir.PLAN, plan.to_json())
            if self.restored:
                run.write_json(RESTORE_REPORT, self.restored.to_json())
            if self.advice:
                run.write_json(ADVICE, self.advice)
        self.log(f"run directory: {run.path}" + (f" (this worker's scratch copy; the chief writes {opts.output_dir})"
                                                 if self.scratch else ""))
        cfg = TrainConfig.from_options(opts, loss_scale=self.precision.precision == "float16")
        # --regularize, --ema, --swa-epochs: w0 of L2-SP and the averages start from the weights as loaded, before
        # a resume replaces them (the checkpoint then restores the averages).
        if getattr(opts, "regularize", None):
            loss = regularize.for_job(opts.regularize, self.model,
                                      loss or CrossEntropy(len(self.class_names), opts.label_smoothing),
                                      self.strategy, self.log)
        averagers = averaging.for_job(opts, self.model, stages, self.strategy, self.log)
        callbacks = [*callbacks, _HistoryWriter(self)]
        if opts.tensorboard and not self.scratch:
            callbacks.append(_tensorboard(run.file(TENSORBOARD), self.config, plan))
        self.trainer = Trainer(self.strategy, self.model, len(self.class_names), cfg, self.log,
                               checkpoint.CheckpointManager(run.file(rundir.CHECKPOINTS)), loss=loss, metrics=metrics,
                               callbacks=callbacks, select=select, averagers=averagers,
                               **({"inputs": inputs} if inputs is not None else {}))
        if self.snapshot:
            self.trainer.resume(self.snapshot)
            self.log(f"resuming after epoch {self.snapshot.epoch} (stage {self.snapshot.state['stage']}) from the "
                     f"checkpoint in {run.file(rundir.CHECKPOINTS)}")
        return self

    def _resume_point(self):
        """The checkpoint to continue from, None for a new run; refuses when the settings changed (naming them)."""
        opts = self.opts
        folder = os.path.join(opts.output_dir, rundir.CHECKPOINTS) if opts.output_dir else None
        if not folder or not checkpoint.has_checkpoint(folder):
            return None
        previous = rundir.RunDir(opts.output_dir, create=False)
        saved = {**previous.read_json(rundir.CONFIG), "classes": previous.read_json(rundir.CLASSES)}
        saved.setdefault("precision", saved_precision(saved))
        current = {**self.config, "classes": self.class_names}
        differences, ignore = [], RESUME_MAY_CHANGE
        if saved.get("data_fingerprints") and current.get("data_fingerprints"):
            differences, saved, current = self._data_differences(saved, current)
            ignore += ("dataset_fingerprint", "data_fingerprints")
        elif current.get("data_fingerprints") and saved.get("dataset_fingerprint") != current["dataset_fingerprint"]:
            differences = ["its data fingerprint is by file size and modification time (an earlier tfl), this one by "
                           "file content, so whether the images changed cannot be told"]
            ignore += ("dataset_fingerprint", "data_fingerprints")
        differences += checkpoint.config_differences(saved, current, ignore)
        if differences:
            raise checkpoint.ResumeError(f"cannot resume {opts.output_dir}: its run used other settings ("
                                         + "; ".join(differences) + "). Use the same settings, or another --output-dir")
        return checkpoint.load_latest(folder, self.log)

    def _data_differences(self, saved: dict, current: dict) -> tuple[list, dict, dict]:
        """The resume check of the data, split by split: what training read (train, val) must be the same files
        by content; the test split may have changed (it is only scored at the end, as it is now: a test file fixed
        after a failed final evaluation must not cost the training). Returns (differences, saved and current
        without the test split's example count)."""
        before, now = saved["data_fingerprints"], current["data_fingerprints"]
        differences = [f"the {split} images changed since the run started (their content: {split} fingerprint "
                       f"{before.get(split, '(none)')} -> {now.get(split, '(none)')})"
                       for split in dict.fromkeys([*before, *now])
                       if split != "test" and before.get(split) != now.get(split)]
        if before.get("test") != now.get("test"):
            self.log("note: the test images changed since this run started; it is scored on them as they are now")

        def without_test(config):
            return {**config, "num_examples": {k: v for k, v in (config.get("num_examples") or {}).items()
                                               if k != "test"}}

        return differences, without_test(saved), without_test(current)

    # -- the stage loop -----------------------------------------------------------------------------------------------
    def train(self, stages: list[Stage], adapt: Callable | None = None, after: Callable | None = None) -> None:
        """Train every stage in order (after a resume, finished stages are skipped); history.csv is rewritten
        after every epoch (see _HistoryWriter). `adapt`, `after`: see train_stages."""
        with self.naming_changed_files(("train", "val"), "training"):
            train_stages(self.trainer, self.model, self.inputs, stages, self.opts.freeze_mode, self.opts.train_bn,
                         self.steps_per_epoch, self.batch, self.steps("val"), self.log, adapt, after)
        self.inputs.log_summary(self.trainer.history)

    def write_history(self, curves: bool = True) -> None:
        from tfl.training.trainer import history_rows  # TensorFlow (see the top)

        rows = history_rows(self.trainer.history)
        self.run_dir.write_history(rows)
        if curves and rows and not self.scratch:
            write_curves(rows, self.run_dir.file(CURVES), title=f"{self.opts.backbone} on {self.splits.name}")

    # -- the end: best weights, test split, model, metrics --------------------------------------------------------
    def eval_split(self) -> tuple[str, object]:
        name = "test" if self.splits.test is not None else "val"
        return name, data.make_pipeline(getattr(self.splits, name), self.image_size, self.batch, training=False,
                                        seed=self.opts.seed)

    def finish(self, extra_metrics: dict | None = None, loss=None, metrics=None, score: Callable | None = None,
               best: bool = True, save: bool = True) -> dict:
        """Restore the run's best weights, score the test split (val without one) and save model and metrics.
        The scores are the classifier's (cross-entropy and accuracy on the labels) whatever loss trained it,
        unless the recipe passes its own `loss` / `metrics` hooks for them.

        A recipe that scores its own way passes `score(job) -> metrics` (metrics.json holds what it returns; the
        log line is the recipe's); `best=False` keeps the weights after the last epoch; `save=False` writes no
        model.keras (the classifier is not what the recipe trained)."""
        from tfl.training import averaging  # TensorFlow (see the top)

        trainer, run = self.trainer, self.run_dir
        averaged = None
        if best:
            trainer.restore_best()
            if trainer.averagers:  # --ema / --swa-epochs: the best of the trained and the averaged weights
                averaged = averaging.choose(trainer, self.log)
        if save and getattr(self.opts, "save_adapters_only", False):
            self._save_adapters()
        elif save:  # before the last pass over the data: a file that fails it must not cost what training produced
            from tfl import adapters  # Keras (see the top)

            self.model.trainable = True  # saved flags don't matter for inference; keep the file independent of the plan
            run.save_model(adapters.merged(self.model))  # LoRA adapters merged into their kernels
            if run.forget_calibration():  # its temperature was fitted to the model just replaced
                self.log(f"removed {run.file(rundir.CALIBRATION)}: it belonged to the model this run replaced; run "
                         f"`tfl calibrate --run {run.path}` to fit the new one")
        splits = (self.eval_split()[0],) if score is None else ("test", "val", "train")
        with self.naming_changed_files(splits, "the final evaluation", saved=save):
            metrics, message = (score(self), None) if score is not None else self._scores(loss, metrics)
        metrics.update(extra_metrics or {})
        if averaged:
            metrics["weight_averaging"] = averaged
        run.write_json(rundir.METRICS, metrics)
        trainer.finish()
        if message:
            adapters_only = getattr(self.opts, "save_adapters_only", False)
            self.log(f"{message}; saved {run.file(rundir.ADAPTERS if adapters_only else rundir.MODEL)}")
        metrics["run_dir"] = run.path
        for finisher in self.finishers if not self.scratch else ():  # the chief's, like the export below
            metrics.update(finisher(self) or {})
        if self.opts.export and not self.scratch:  # the chief exports; built from model.keras, no collectives
            from tfl.serving.saved_model import export_saved_model

            metrics["export_dir"] = export_saved_model(run.path, log=self.log)
        return metrics

    def _save_adapters(self) -> None:
        """--save-adapters-only: adapters.safetensors and adapters.json instead of model.keras."""
        from tfl import adapters  # Keras (see the top)

        opts = self.opts
        manifest = {"adapter": opts.adapter, "rank": opts.lora_rank, "alpha": opts.lora_alpha or opts.lora_rank,
                    "backbone": opts.backbone, "weights": self.spec.resolve_weights(opts.weights),
                    "freeze_up_to": opts.freeze_up_to, "train_bn": opts.train_bn, "image_size": self.image_size,
                    "classes": self.class_names,
                    "layers": [layer.name for layer in self.plan.layers if layer.adapter and not layer.frozen]}
        data, manifest = adapters.adapter_file(self.model, self.plan, manifest, opts.train_bn)
        path = self.run_dir.file(rundir.ADAPTERS)
        rundir.atomic_write(path, data)
        self.run_dir.write_json(rundir.ADAPTERS_MANIFEST, manifest)
        self.log(f"saved {path}: {manifest['params']:,} trained weights in {len(manifest['tensors'])} tensors "
                 f"(no {rundir.MODEL}: --save-adapters-only)")

    @contextlib.contextmanager
    def naming_changed_files(self, splits, what: str, saved: bool = False):
        """Turn TensorFlow's failure to read an image of `splits` (an InvalidArgumentError naming no file) into a
        DataError naming the files that are no longer readable images: they changed after the check before training
        (a sync job rewriting the folder). Any other failure is raised as it was."""
        import tensorflow as tf

        try:
            yield
        except tf.errors.OpError as error:
            from tfl.data.image_folder import changed_files_error

            files = self.splits.files or {}
            kept = f"{self.run_dir.file(rundir.MODEL)} holds the trained model. " if saved else ""
            changed = changed_files_error(
                [path for split in splits for path in files.get(split, [])],
                "changed after the check before training", what,
                f"{kept}Fix or restore the file(s), then run the same command with --resume --output-dir "
                f"{self.opts.output_dir}: it checks the data again and continues from the last checkpoint (a changed "
                "test file does not stop it).")
            if changed is None:
                raise
            self.trainer.finish()
            raise changed from error

    def _scores(self, loss=None, metrics=None) -> tuple[dict, str]:
        """The classifier's scores on the test split (val without one), and the log line saying them."""
        from tfl.training.trainer import CrossEntropy, accuracy  # TensorFlow (see the top)

        trainer = self.trainer
        train_seconds = time.time() - self.started
        split, dataset = self.eval_split()
        test = trainer.evaluate_all(dataset, split, self.steps(split),
                                    loss=loss or CrossEntropy(len(self.class_names), self.opts.label_smoothing),
                                    metrics=metrics or accuracy)
        # Named for the split they were measured on: without a test split the scores are validation scores (the
        # validation accuracy is the best epoch's, measured while training, which this evaluation repeats).
        held_out = ({"test_accuracy": round(test["accuracy"], 6), "test_loss": round(test["loss"], 6)}
                    if split == "test" else {"val_loss": round(test["loss"], 6)})
        scores = {**held_out, "val_accuracy": round(trainer.best_accuracy, 6), "epochs_run": len(trainer.history),
                  "train_seconds": round(train_seconds, 1), "best_epoch": trainer.best_epoch, "eval_split": split}
        return scores, (f"{split} accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) after "
                        f"{len(trainer.history)} epoch(s), {train_seconds:.0f}s")


def held_out_accuracy(metrics: dict) -> float:
    """The accuracy Job.finish measured on the held-out split: test, or val when the data has none
    (metrics["eval_split"] says which)."""
    return metrics["test_accuracy"] if "test_accuracy" in metrics else metrics["val_accuracy"]


def forget_untrained(path: str, log) -> None:
    """A new run stopped before its first epoch was saved: remove the files it wrote (config.json and the like),
    so that the same command starts it again instead of refusing a directory with nothing to resume."""
    if checkpoint.has_checkpoint(os.path.join(path, rundir.CHECKPOINTS)) or rundir.MODEL in rundir.run_files(path):
        return
    if rundir.check_reusable(path, overwrite=True, has_checkpoint=False):
        log(f"nothing was trained yet: removed the run's files from {path}, so the same command starts it again")


def saved_precision(config: dict) -> str | None:
    """The precision a run's config.json records; runs from before --mixed-precision auto stored a bool."""
    if "precision" in config:
        return config["precision"]
    return "bfloat16" if config.get("mixed_precision") is True else "float32"


def choose_precision(opts: JobOptions, strategy, num_classes: int, image_size: int, batch: int, log):
    """--mixed-precision: tfl.precision.resolve for this run's model; a resumed run keeps the precision in its
    config.json; every worker of a multi-worker run takes the chief's choice."""
    from tfl import precision  # Keras (see the top)

    saved = None
    if opts.output_dir and checkpoint.has_checkpoint(os.path.join(opts.output_dir, rundir.CHECKPOINTS)):
        try:
            saved = saved_precision(rundir.RunDir(opts.output_dir, create=False).read_json(rundir.CONFIG))
        except (OSError, ValueError, AttributeError):
            saved = None  # no readable config: the resume check says so
    per_replica = batch // strategy.num_replicas_in_sync
    key = {"backbone": opts.backbone, "image_size": image_size, "freeze_up_to": opts.freeze_up_to,
           "batch_size": per_replica, "freeze_mode": opts.freeze_mode, "train_bn": opts.train_bn}
    measure = lambda p: precision.time_train_steps(opts.backbone, num_classes, image_size,  # noqa: E731
                                                   opts.freeze_up_to, per_replica, p)
    choice = precision.resolve(opts.mixed_precision, key, measure, opts.cache_dir,
                               saved if saved in PRECISIONS else None, log)
    chief = strategies.chief_value(strategy, PRECISIONS.index(choice.precision))
    if PRECISIONS[chief] != choice.precision:
        choice = precision.Choice(PRECISIONS[chief], choice.requested, "the chief worker's choice")
    log(choice.describe())
    return choice


def train_stages(trainer, model, inputs, stages: list[Stage], freeze_mode: str, train_bn: bool, steps_per_epoch: int,
                 batch: int, val_steps: int, log=print, adapt: Callable | None = None,
                 after: Callable | None = None) -> None:
    """The one stage loop: apply each stage's plan, group its variables, feed it (images or cached activations)
    and train. Shared by every recipe and by `tfl bench`.

    `adapt(stage, feed, groups) -> dict`: a recipe that trains another model on the stage's feed (a block on
    cached pooled features), or on batches of its own, replaces what the stage trains: any of model, groups,
    train, val, steps, batch, val_steps, eval_model, trainable (Trainer.run_stage's arguments); it may also swap
    the trainer's loss. `after(stage)`: what a recipe does between stages (test, update its state). Both run for
    a stage the trainer skips as finished after a resume too, so a recipe's step that a kill interrupted after
    the stage's last checkpoint is redone; the recipe's own checkpointed state says what it has done."""
    from tfl import freezing  # Keras (see the top)
    from tfl.training.trainer import Trainer

    header = Trainer.header()  # printed once the caches are ready, right above the first epoch row
    for stage in stages:
        if stage.epochs <= 0 or trainer.stopped_early:
            continue
        with trainer.strategy.scope():
            graph = freezing.training_graph(model, stage.plan, freeze_mode, train_bn)
        groups = param_groups(graph, stage)
        feed = inputs.feed(stage.inputs or stage.name, graph, trainer.history)
        run = {"model": feed.model, "groups": groups, "train": feed.train, "val": feed.val, "steps": steps_per_epoch,
               "batch": batch, "val_steps": val_steps, "eval_model": feed.eval_model,
               "trainable": graph.trainable_stages(), **(adapt(stage, feed, groups) if adapt else {})}
        if header:
            log(header)
            header = None
        trainer.run_stage(stage.name, run["model"], run["groups"], stage.epochs, run["train"], run["val"],
                          run["steps"], run["batch"], run["val_steps"], eval_model=run["eval_model"],
                          policy=stage.policy, trainable=run["trainable"])
        if after:
            after(stage)


def param_groups(graph, stage: Stage) -> list:
    """The stage's trainable variables grouped by stage.group_of, in model order, each at its group's lr."""
    from tfl.training.trainer import ParamGroup

    group_of = stage.group_of or backbone_or_head
    variables: dict[str, list] = {}
    for canonical, vs in graph.variables.items():
        variables.setdefault(group_of(canonical), []).extend(vs)
    missing = [g for g in variables if g not in stage.lrs]
    if missing:
        raise UsageError(f"stage {stage.name!r} trains the group(s) {', '.join(missing)} but gives no learning rate "
                         f"for them (it has {', '.join(stage.lrs) or 'none'})")
    # Order: as stage.lrs lists the groups, so the optimizers (and a checkpoint's slots) keep a fixed order.
    return [ParamGroup(g, variables[g], stage.lrs[g]) for g in stage.lrs if g in variables]


class _HistoryWriter:
    """Rewrites history.csv after every epoch, so a crash loses at most the epoch in progress, and curves.png at the
    end and, while a run goes on, every CURVES_EVERY seconds (drawing takes about half a second, as long as a cached
    head epoch: a short run draws it once)."""

    CURVES_EVERY = 30.0

    def __init__(self, job: Job):
        self.job = job
        self.drawn = time.monotonic()

    def on_epoch_end(self, result) -> None:
        draw = time.monotonic() - self.drawn >= self.CURVES_EVERY
        self.job.write_history(curves=draw)
        if draw:
            self.drawn = time.monotonic()

    def on_run_end(self, history) -> None:
        self.job.write_history()


def _stage_record(stage: Stage) -> dict:
    return {"name": stage.name, "epochs": stage.epochs, "lrs": stage.lrs,
            "trainable_params": stage.plan.trainable_params, "freeze_boundary": stage.plan.boundary()}


def _tensorboard(logdir: str, config: dict, plan):
    from tfl.reporting.tensorboard import TensorBoardCallback

    frozen = [layer for layer in plan.layers if layer.frozen]
    text = (f"backbone {plan.backbone}, freeze_up_to {plan.freeze_up_to}: {len(frozen)} frozen layers, "
            f"{plan.frozen_params:,} frozen / {plan.trainable_params:,} trainable parameters; boundary "
            f"{plan.boundary() or 'none'}")
    return TensorBoardCallback(logdir, hparams=config, plan_text=text)
