"""Two-stage fine-tuning, composed: data source -> tf.data -> model -> freeze plan -> trainer -> run directory.

Stage 1 trains the new head on a frozen backbone at `lr`. Stage 2 unfreezes the layers above `freeze_up_to`
(and as the --freeze/--unfreeze rules say), with the backbone at `backbone_lr` (default 0.3 x lr) and the head at
`lr`, linear warmup, then the chosen schedule. The best weights by validation accuracy are restored at the end.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_DATASET = "fashion_mnist"
RESTORE_REPORT = "restore_report.json"
# Stage 2 backbone lr = 0.3 x the head lr unless --backbone-lr says. Measured on the embedded default: block4 with
# 0.3 x lr reached 0.9375 test accuracy in 19 min, block5 with lr/10 0.9228 in 15 min (2 fine-tune epochs each).
BACKBONE_LR_FACTOR = 0.3
SMALL_IMAGE_UPSCALE = 4  # 28x28 / 32x32 datasets are upscaled 4x (112 / 128 px) unless --image-size says
# Settings a resumed run may change: where files are, how the work is spread (the global batch and learning
# rates are still compared), what happens after training. Any other difference is refused.
RESUME_MAY_CHANGE = ("output_dir", "data_dir", "resume", "strategy", "devices", "worker_hosts", "task_index",
                     "export", "versions", "command", "cache", "cache_budget", "cache_dir")


@dataclasses.dataclass
class FinetuneOptions:
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = "default"
    init_from: str | None = None  # a checkpoint whose weights are restored by name before training
    reuse: tuple[str, ...] = ()  # regexes over weight/layer names; () = every weight init_from has
    reuse_exclude: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()  # (source regex, replacement) for init_from's names
    init_unsafe: bool = False
    dataset: str = DEFAULT_DATASET
    data_dir: str | None = None
    val_split: float = 0.1
    skip_bad_images: bool = False
    image_size: int | None = None
    limit_train: int | None = None
    freeze_up_to: str | None = "block4"
    rules: tuple[tuple[str, str], ...] = ()
    freeze_mode: str = "trainable"
    train_bn: bool = False
    head_hidden: tuple[int, ...] = ()
    dropout: float = 0.2
    head_epochs: int = 10
    epochs: int = 2
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    backbone_lr: float | None = None
    weight_decay: float | None = None
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 7
    gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: bool = False
    early_stopping: int | None = None
    strategy: str = "auto"
    devices: int | None = None  # replicas on this machine: the first N GPUs, or the CPU split N ways
    worker_hosts: tuple[str, ...] = ()  # every worker's host:port, chief first; written to TF_CONFIG
    task_index: int | None = None  # this process's place in worker_hosts
    scale_lr: bool = False  # multiply the learning rates by the number of replicas
    seed: int = 0
    output_dir: str | None = None
    resume: bool = False  # insist on continuing from output_dir's checkpoint (one is used anyway when present)
    export: bool = False  # then export a SavedModel to saved_models/<run name>/<next version>/
    cache: str = "auto"  # boundary caching (tfl.training.boundary): auto = when valid, on = insist, off
    cache_budget: str | None = None  # memory for cached arrays, e.g. "4G"; default min(25% of RAM, 4 GiB)
    cache_dir: str | None = None  # persisted cache entries; default $TFL_CACHE_DIR or ~/.cache/tfl
    jit: bool = False  # XLA-compile the train/eval steps and the cache extraction
    mixed_precision: bool = False  # bfloat16 compute, float32 variables and logits


def pick_image_size(requested: int | None, spec_size: int, native_size) -> int:
    if requested:
        return requested
    if native_size and max(native_size) <= 64:
        return min(spec_size, SMALL_IMAGE_UPSCALE * max(native_size))
    return spec_size


def versions() -> dict:
    import keras
    import numpy
    import tensorflow as tf

    from tfl import __version__

    return {"tfl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def finetune(opts: FinetuneOptions, log=print) -> dict:
    """Run the whole job; returns the metrics dict (also written to the run directory).

    In a multi-worker run every worker calls this. Only the chief writes the run directory; the others write
    the same files into a temporary directory, removed at the end, so every worker runs the same steps.
    """
    import shutil
    import tempfile

    from tfl.training import checkpoint, rundir, strategy as strategies

    if opts.resume and not opts.output_dir:
        raise ValueError("--resume needs --output-dir: the run directory to continue")
    if opts.resume and not checkpoint.has_checkpoint(os.path.join(opts.output_dir, rundir.CHECKPOINTS)):
        raise checkpoint.ResumeError(f"--resume: {opts.output_dir} has no checkpoint to continue from; "
                                     "drop --resume to start a new run there")
    # First of all: logical devices and the cluster can only be set up before TensorFlow initialises.
    strategy = strategies.make_strategy(opts.strategy, opts.devices, opts.worker_hosts, opts.task_index)
    if strategies.is_chief(strategy):
        return _finetune(opts, log, strategy, scratch=None)
    scratch = tempfile.mkdtemp(prefix=f"tfl-{strategies.worker_name(strategy)}-")
    try:
        return _finetune(opts, log, strategy, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finetune(opts: FinetuneOptions, log, strategy, scratch: str | None) -> dict:
    import keras
    import tensorflow as tf

    from tfl import data, freezing, models
    from tfl.backbones import registry
    from tfl.checkpoints import restore
    from tfl.training import boundary, checkpoint, rundir, strategy as strategies
    from tfl.training.trainer import ParamGroup, TrainConfig, Trainer

    spec = registry.get(opts.backbone)
    init = restore.open_init_from(opts.init_from, opts.reuse, opts.reuse_exclude, opts.rename, opts.init_unsafe)
    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()
    started = time.time()

    # Data.
    splits = data.load_dataset(opts.dataset, data_dir=opts.data_dir, val_split=opts.val_split, seed=opts.seed,
                               skip_bad_images=opts.skip_bad_images, log=log)
    image_size = pick_image_size(opts.image_size, spec.input_size, splits.native_size)
    n_train = splits.num_examples["train"]
    train_source = splits.train
    if opts.limit_train and opts.limit_train < n_train:
        train_source = data.random_subset(train_source, n_train, opts.limit_train, opts.seed)
        n_train = opts.limit_train
    replicas = strategy.num_replicas_in_sync
    batch = opts.batch_size * replicas  # the global batch; --batch-size is per replica
    if n_train < batch:
        per_replica = f"{opts.batch_size}" + (f" x {replicas} replicas = {batch}" if replicas > 1 else "")
        raise ValueError(f"--batch-size {per_replica} is larger than the {n_train} training examples; lower it")
    steps_per_epoch = n_train // batch

    val_ds = data.make_pipeline(splits.val, image_size, batch, training=False, seed=opts.seed)
    eval_split = "test" if splits.test is not None else "val"
    test_ds = data.make_pipeline(splits.test, image_size, batch, training=False, seed=opts.seed) if splits.test is not None else val_ds
    log(f"data: {splits.name}: {n_train} train / {splits.num_examples['val']} val / "
        f"{splits.num_examples.get('test', 0)} test, {len(splits.class_names)} classes, images at {image_size}px")

    # Model and plan.
    with strategy.scope():
        model = models.build_classifier(opts.backbone, len(splits.class_names), image_size, opts.weights,
                                        opts.head_hidden, opts.dropout, opts.mixed_precision)
    restored = restore.restore_classifier(model, spec, init, opts.reuse, opts.reuse_exclude, opts.rename,
                                          log) if init else None
    plan = freezing.make_plan(spec, model, opts.freeze_up_to, opts.rules)
    with strategy.scope():
        # Fail on a plan the freeze mode cannot apply now, not after stage 1 has trained (stage 1 re-applies).
        freezing.training_graph(model, plan, opts.freeze_mode, opts.train_bn)
    stages = [("head", freezing.head_only_plan(plan), opts.head_epochs), ("finetune", plan, opts.epochs)]
    # Decoded images once, and frozen activations cached where valid; --cache on refuses here, before the run dir.
    inputs = boundary.for_finetune(opts, model, splits, train_source, n_train, image_size, batch, stages, log)
    weights = models.resolve_weights(spec, opts.weights)
    log(f"model: {opts.backbone} ({weights or 'random init'}), {plan.frozen_params:,} frozen / "
        f"{plan.trainable_params:,} trainable parameters in stage 2, freeze mode {opts.freeze_mode}, "
        f"{strategy.num_replicas_in_sync} replica(s)")

    config = {**dataclasses.asdict(opts), "image_size": image_size, "weights_resolved": weights,
              "num_classes": len(splits.class_names), "num_examples": {**splits.num_examples, "train": n_train},
              "dataset_fingerprint": splits.fingerprint, "replicas": replicas, "global_batch_size": batch,
              "versions": versions(), "command": sys.argv}
    snapshot = _resume_point(opts, config, list(splits.class_names), log)
    strategies.check_workers_agree(strategy, snapshot.epoch if snapshot else 0,
                                   f"the epoch to resume from; each must read the chief's --output-dir "
                                   f"{opts.output_dir} (a shared filesystem)")
    run = rundir.RunDir(scratch or opts.output_dir or rundir.default_path(opts.backbone, opts.dataset))
    for path in run.remove_leftovers():
        log(f"removed {path}, a partial file from an interrupted run")
    if snapshot is None:
        run.write_json(rundir.CONFIG, config)
        run.write_json(rundir.CLASSES, list(splits.class_names))
        run.write_json(rundir.PLAN, plan.to_json())
        if restored:
            run.write_json(RESTORE_REPORT, restored.to_json())
    log(f"run directory: {run.path}" + (f" (this worker's scratch copy; the chief writes {opts.output_dir})"
                                        if scratch else ""))

    cfg = TrainConfig(optimizer=opts.optimizer,
                      weight_decay=opts.weight_decay, schedule=opts.schedule, warmup_epochs=opts.warmup_epochs,
                      step_size=opts.step_size, gamma=opts.gamma, label_smoothing=opts.label_smoothing,
                      early_stopping=opts.early_stopping, jit=opts.jit)
    trainer = Trainer(strategy, model, len(splits.class_names), cfg, log,
                      checkpoint.CheckpointManager(run.file(rundir.CHECKPOINTS)))
    if snapshot:
        trainer.resume(snapshot)
        log(f"resuming after epoch {snapshot.epoch} (stage {snapshot.state['stage']}) from the checkpoint in "
            f"{os.path.join(opts.output_dir, rundir.CHECKPOINTS)}")
    val_steps = -(-splits.num_examples["val"] // batch)
    lr_scale = replicas if opts.scale_lr else 1
    lr = opts.lr * lr_scale
    backbone_lr = (opts.backbone_lr if opts.backbone_lr is not None else opts.lr * BACKBONE_LR_FACTOR) * lr_scale
    header = Trainer.header()  # printed once the caches are ready, right above the first epoch row

    for name, stage_plan, epochs in stages:
        if epochs <= 0 or trainer.stopped_early:
            continue
        with strategy.scope():
            graph = freezing.training_graph(model, stage_plan, opts.freeze_mode, opts.train_bn)
        groups = [ParamGroup("backbone", graph.backbone_variables, backbone_lr), ParamGroup("head", graph.head_variables, lr)]
        feed = inputs.feed(name, graph, trainer.history)
        if header:
            log(header)
            header = None
        trainer.run_stage(name, feed.model, groups, epochs, feed.train, feed.val, steps_per_epoch, batch, val_steps,
                          eval_model=feed.eval_model)
        run.write_history(_history_rows(trainer))
    inputs.log_summary(trainer.history)
    trainer.restore_best()
    train_seconds = time.time() - started

    test_steps = -(-splits.num_examples.get(eval_split, 0) // batch)
    test_loss, test_acc = trainer.evaluate(test_ds, eval_split, test_steps)
    model.trainable = True  # saved flags don't matter for inference; keep the file independent of the plan
    run.save_model(model)
    metrics = {"test_accuracy": round(test_acc, 6), "test_loss": round(test_loss, 6),
               "val_accuracy": round(trainer.best_accuracy, 6), "epochs_run": len(trainer.history),
               "train_seconds": round(train_seconds, 1), "best_epoch": trainer.best_epoch, "eval_split": eval_split}
    run.write_json(rundir.METRICS, metrics)
    log(f"{eval_split} accuracy {test_acc:.4f} (loss {test_loss:.4f}) after {len(trainer.history)} epoch(s), "
        f"{train_seconds:.0f}s; saved {run.file(rundir.MODEL)}")
    metrics["run_dir"] = run.path
    if opts.export and not scratch:  # the chief exports; the SavedModel is built from model.keras, no collectives
        from tfl.export.saved_model import export_saved_model

        metrics["export_dir"] = export_saved_model(run.path, log=log)
    return metrics


def _resume_point(opts: FinetuneOptions, config: dict, class_names: list, log):
    """The checkpoint to continue from, None for a new run; refuses when the settings changed (naming them)."""
    from tfl.training import checkpoint, rundir

    folder = os.path.join(opts.output_dir, rundir.CHECKPOINTS) if opts.output_dir else None
    if not folder or not checkpoint.has_checkpoint(folder):
        return None
    previous = rundir.RunDir(opts.output_dir, create=False)
    saved = {**previous.read_json(rundir.CONFIG), "classes": previous.read_json(rundir.CLASSES)}
    differences = checkpoint.config_differences(saved, {**config, "classes": class_names}, RESUME_MAY_CHANGE)
    if differences:
        raise checkpoint.ResumeError(f"cannot resume {opts.output_dir}: its run used other settings ("
                                     + "; ".join(differences) + "). Use the same settings, or another --output-dir")
    return checkpoint.load_latest(folder, log)


def _history_rows(trainer) -> list[dict]:
    rows = []
    for r in trainer.history:
        row = {"epoch": r.epoch, "stage": r.stage, "train_loss": round(r.train_loss, 6),
               "train_accuracy": round(r.train_accuracy, 6), "val_loss": round(r.val_loss, 6),
               "val_accuracy": round(r.val_accuracy, 6), "seconds": round(r.seconds, 2)}
        for group in ("backbone", "head"):
            row[f"lr_{group}"] = r.lr.get(group, "")
        rows.append(row)
    return rows
