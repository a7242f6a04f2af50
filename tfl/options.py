"""The choices every option can take, in one place, light to import: the library validates against these
and the CLI offers them (defaults live in the options dataclasses, tfl.job.JobOptions and the recipes')."""

from __future__ import annotations

import dataclasses

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
FREEZE_MODES = ("trainable", "stop_gradient")
# --freeze-up-to words besides a stage or layer name: the backbone's own default depth (BackboneSpec.
# default_freeze_up_to), nothing frozen (also None), and `tfl advise`'s choice (tfl.recipes.advise.AUTO).
FREEZE_DEFAULT, FREEZE_NONE, FREEZE_AUTO = "default", "none", "auto"
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
CACHE_MODES = ("auto", "on", "off")
MIXED_PRECISION = ("auto", "on", "off")  # --mixed-precision (tfl.precision)
PRECISIONS = ("float32", "bfloat16", "float16")  # what a run computes in; config.json "precision"
EXPORT_FORMATS = ("saved_model", "tflite")
TFLITE_MODES = ("float32", "float16", "int8")
BENCH_CASES = ("head_only", "partial_finetune", "resnet50_forward", "resnet50_forward_bf16", "serving")
UNFREEZE = ("two_stage", "gradual")
SPLITS = ("train", "val", "test")
# Image files tfl reads, for training, evaluation and predict alike (Pillow decodes WebP and TIFF; an export's
# serving_default decodes JPEG, PNG, GIF and BMP bytes, as TF Serving does). EXIF orientation is ignored everywhere.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEACHER_LOGITS = ("auto", "cached", "online")  # tfl distill: teacher outputs computed once, or per batch
CL_SCENARIOS = ("class-il", "task-il")  # tfl forgetting --scenario
CL_STRATEGIES = ("naive", "replay", "lwf", "ewc", "joint")  # tfl forgetting --strategies
DANN_SHIFTS = ("invert", "tint", "texture")  # tfl dann --target-shift: the shifted copy of the dataset made as target
BALANCE = ("none", "sampler", "loss")  # tfl finetune --balance: class-balanced sampling or class-weighted loss
PRETEXT_OBJECTIVES = ("rotation", "simclr")  # tfl pretext --objective


DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_DATASET = "fashion_mnist"


@dataclasses.dataclass
class JobOptions:
    """Every option a training command shares; the CLI's defaults are these."""

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
    label_fraction: float | None = None  # keep this share of each class's train examples (seeded, stratified)
    freeze_up_to: str | None = FREEZE_DEFAULT  # a stage, layer name or prefix; "default", "none" (or None), "auto"
    rules: tuple[tuple[str, str], ...] = ()
    freeze_mode: str = "trainable"
    train_bn: bool = False
    head_hidden: tuple[int, ...] = ()
    dropout: float = 0.2
    head_epochs: int = 10
    epochs: int = 4  # stage 2; the embedded default within 20 min (6 epochs: test 0.9460, but 21 min on 2 cores)
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
    overwrite: bool = False  # start anew in a non-empty output_dir, deleting the earlier run's files there
    export: bool = False  # then export a SavedModel to saved_models/<run name>/<next version>/
    cache: str = "auto"  # boundary caching (tfl.training.boundary): auto = when valid, on = insist, off
    cache_budget: str | None = None  # memory for cached arrays, e.g. "4G"; default min(25% of RAM, 4 GiB)
    cache_dir: str | None = None  # persisted cache entries; default $TFL_CACHE_DIR or ~/.cache/tfl
    jit: bool = False  # XLA-compile the train/eval steps and the cache extraction
    mixed_precision: str = "auto"  # auto | on | off: half-precision compute where measured faster (tfl.precision)
    tensorboard: bool = True  # event files under <run>/tensorboard/
