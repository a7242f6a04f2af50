"""Two-stage fine-tuning, composed: data source -> tf.data -> model -> freeze plan -> trainer -> run directory.

Stage 1 trains the new head on a frozen backbone at `lr`. Stage 2 unfreezes the layers above `freeze_up_to`
(and as the --freeze/--unfreeze rules say), with the backbone at `backbone_lr` (default lr/10) and the head at
`lr`, linear warmup, then the chosen schedule. The best weights by validation accuracy are restored at the end.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_DATASET = "fashion_mnist"
SMALL_IMAGE_UPSCALE = 4  # 28x28 / 32x32 datasets are upscaled 4x (112 / 128 px) unless --image-size says


@dataclasses.dataclass
class FinetuneOptions:
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = "default"
    dataset: str = DEFAULT_DATASET
    data_dir: str | None = None
    val_split: float = 0.1
    skip_bad_images: bool = False
    image_size: int | None = None
    limit_train: int | None = None
    freeze_up_to: str | None = "block3"
    rules: tuple[tuple[str, str], ...] = ()
    freeze_mode: str = "trainable"
    train_bn: bool = False
    head_hidden: tuple[int, ...] = ()
    dropout: float = 0.2
    head_epochs: int = 1
    epochs: int = 1
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
    seed: int = 0
    output_dir: str | None = None


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
    """Run the whole job; returns the metrics dict (also written to the run directory)."""
    import keras
    import tensorflow as tf

    from tfl import data, freezing, models
    from tfl.backbones import registry
    from tfl.training import rundir, strategy as strategies
    from tfl.training.trainer import ParamGroup, TrainConfig, Trainer

    spec = registry.get(opts.backbone)
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
    batch = opts.batch_size
    if n_train < batch:
        raise ValueError(f"--batch-size {batch} is larger than the {n_train} training examples; lower it")
    steps_per_epoch = n_train // batch
    train_ds = data.make_pipeline(train_source, image_size, batch, training=True, seed=opts.seed,
                                  augment=opts.augment, drop_remainder=True)
    val_ds = data.make_pipeline(splits.val, image_size, batch, training=False, seed=opts.seed)
    eval_split = "test" if splits.test is not None else "val"
    test_ds = data.make_pipeline(splits.test, image_size, batch, training=False, seed=opts.seed) if splits.test is not None else val_ds
    log(f"data: {splits.name}: {n_train} train / {splits.num_examples['val']} val / "
        f"{splits.num_examples.get('test', 0)} test, {len(splits.class_names)} classes, images at {image_size}px")

    # Model and plan.
    strategy = strategies.make_strategy(opts.strategy)
    with strategy.scope():
        model = models.build_classifier(opts.backbone, len(splits.class_names), image_size, opts.weights,
                                        opts.head_hidden, opts.dropout)
    plan = freezing.make_plan(spec, model, opts.freeze_up_to, opts.rules)
    with strategy.scope():
        # Fail on a plan the freeze mode cannot apply now, not after stage 1 has trained (stage 1 re-applies).
        freezing.training_graph(model, plan, opts.freeze_mode, opts.train_bn)
    weights = models.resolve_weights(spec, opts.weights)
    log(f"model: {opts.backbone} ({weights or 'random init'}), {plan.frozen_params:,} frozen / "
        f"{plan.trainable_params:,} trainable parameters in stage 2, freeze mode {opts.freeze_mode}, "
        f"{strategy.num_replicas_in_sync} replica(s)")

    run = rundir.RunDir(opts.output_dir or rundir.default_path(opts.backbone, opts.dataset))
    config = {**dataclasses.asdict(opts), "image_size": image_size, "weights_resolved": weights,
              "num_classes": len(splits.class_names), "num_examples": {**splits.num_examples, "train": n_train},
              "dataset_fingerprint": splits.fingerprint, "versions": versions(), "command": sys.argv}
    run.write_json(rundir.CONFIG, config)
    run.write_json(rundir.CLASSES, list(splits.class_names))
    run.write_json(rundir.PLAN, plan.to_json())
    log(f"run directory: {run.path}")

    cfg = TrainConfig(optimizer=opts.optimizer,
                      weight_decay=opts.weight_decay, schedule=opts.schedule, warmup_epochs=opts.warmup_epochs,
                      step_size=opts.step_size, gamma=opts.gamma, label_smoothing=opts.label_smoothing,
                      early_stopping=opts.early_stopping)
    trainer = Trainer(strategy, model, len(splits.class_names), cfg, log)
    val_steps = -(-splits.num_examples["val"] // batch)
    backbone_lr = opts.backbone_lr if opts.backbone_lr is not None else opts.lr / 10
    log(Trainer.header())

    stages = [("head", freezing.head_only_plan(plan), opts.head_epochs), ("finetune", plan, opts.epochs)]
    for name, stage_plan, epochs in stages:
        if epochs <= 0 or trainer.stopped_early:
            continue
        with strategy.scope():
            graph = freezing.training_graph(model, stage_plan, opts.freeze_mode, opts.train_bn)
        groups = [ParamGroup("backbone", graph.backbone_variables, backbone_lr), ParamGroup("head", graph.head_variables, opts.lr)]
        trainer.run_stage(name, graph.model, groups, epochs, train_ds, val_ds, steps_per_epoch, batch, val_steps)
        run.write_history(_history_rows(trainer))
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
    return metrics


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
