"""Option facts in one place, light to import: the choices every option can take, and `JobOptions`, the options
every training command shares, each field with its default, help text and check.

A command's options are a dataclass (JobOptions, or a recipe's subclass of it). The command line is generated
from the fields (tfl.cli.params): the flag, its help, metavar, choices and checks come from `option(...)`'s
metadata, so a default or a help text is written once; `tfl.finetune(...)` and the other API functions take the
same names as keyword arguments and apply the same checks (`check_options`).
"""

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
DECODED_IMAGES = ("auto", "keep", "stream")  # --decoded-images: train/val images decoded once and kept, or streamed
MIXED_PRECISION = ("auto", "on", "off")  # --mixed-precision (tfl.precision)
PRECISIONS = ("float32", "bfloat16", "float16")  # what a run computes in; config.json "precision"
EXPORT_FORMATS = ("saved_model", "tflite", "onnx")
TFLITE_MODES = ("float32", "float16", "int8")
BENCH_CASES = ("head_only", "partial_finetune", "resnet50_forward", "resnet50_forward_bf16", "serving",
               "input_pipeline")
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
# --augment: per-image augmentation of training batches (tfl.data.augment); a bare --augment means basic
AUGMENTS = ("none", "basic", "randaugment")
AUGMENT_BARE = "basic"
MIXUP_ON = ("auto", "features", "pixels")  # --mixup-on: where MixUp mixes (cached boundary activations or images)
# tfl calibrate --tta / finetune --tta: test-time augmentation's views (tfl.tta), kept only if val says so
TTA_NONE = "none"
TTA_MODES = (TTA_NONE, "flip", "flip+crops")
# tfl finetune --lr find / --backbone-lr find: a learning-rate range test chooses the rate (tfl.recipes.lr_find)
LR_FIND = "find"
# --regularize KIND:V[,V]: the penalty and its numbers (tfl.training.regularize): name -> (argument names, defaults
# of the optional ones)
REGULARIZERS = {"l2sp": (("ALPHA", "BETA"), (0.0,)), "bss": (("ETA", "K"), (1,))}


def parse_regularize(text: str) -> tuple[str, tuple]:
    """--regularize "l2sp:0.01,0.1" -> ("l2sp", (0.01, 0.1)); optional numbers filled in; ValueError says what is
    wrong and how to write it."""
    kind, _, args = text.partition(":")
    if kind not in REGULARIZERS:
        raise ValueError(f"{text!r}: the kind must be one of {', '.join(REGULARIZERS)} (e.g. l2sp:0.01 or bss:0.001)")
    names, defaults = REGULARIZERS[kind]
    form = f"{kind}:{names[0]}" + "".join(f"[,{n}]" for n in names[1:])
    try:
        values = [float(v) for v in args.split(",")] if args.strip() else []
    except ValueError:
        raise ValueError(f"{text!r}: expected {form} with numbers") from None
    if not 1 <= len(values) <= len(names):
        raise ValueError(f"{text!r}: expected {form}")
    values += list(defaults[len(values) - 1:])
    if kind == "bss":
        if not values[0] > 0 or not float(values[1]).is_integer() or values[1] < 1:
            raise ValueError(f"{text!r}: ETA must be > 0 and K a whole number >= 1, e.g. bss:0.001")
        values[1] = int(values[1])
    elif not all(v >= 0 for v in values) or not any(v > 0 for v in values):
        raise ValueError(f"{text!r}: ALPHA and BETA must be >= 0 and one of them > 0, e.g. l2sp:0.01,0.01")
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError(f"{text!r}: the numbers must be finite")
    return kind, tuple(values)


def regularize_problem(text: str) -> str | None:
    """--regularize's check: what is wrong with the text, or None."""
    try:
        parse_regularize(text)
    except ValueError as err:
        return str(err)
    return None
# --adapter lora (tfl.adapters)
ADAPTER_NONE = "none"
ADAPTERS = (ADAPTER_NONE, "lora")
DEFAULT_LORA_RANK = 8


DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_DATASET = "fashion_mnist"


# Option groups, in the order --help lists them after a command's own options.
GROUPS = ("data", "model", "train", "distribution", "run")


def option(default=None, help: str = "", *, group: str | None = None, flag: str | None = None,
           metavar: str | None = None, choices: tuple | None = None, check=None, parse: str | None = None,
           repeat: bool = False, required: bool = False, cli: bool = True, show_default: bool = True,
           bare=None, words: tuple = ()):
    """A dataclass field of a command's options, with what the command line and the checks need to know.

    flag: the command-line spelling (default --<name with dashes>; booleans may give "--on/--off");
    check: "positive", "non_negative", or (low, high, low_open, high_open) for a range (None: unbounded);
    parse: how the command line's text becomes the value, where the type does not say ("size", "disk_size",
    "hidden", "renames", "hosts", "task_weights"); repeat: the flag may be given several times; required: the
    command needs a value (the default is a placeholder); cli=False: library only; bare: the value of the flag given
    without one (e.g. a bare --augment); words: words a number field also takes (--lr find), which its check lets
    through.
    """
    meta = {"help": help, "group": group, "flag": flag, "metavar": metavar, "choices": choices, "check": check,
            "parse": parse, "repeat": repeat, "required": required, "cli": cli, "show_default": show_default,
            "bare": bare, "words": tuple(words)}
    return dataclasses.field(default=default, metadata=meta)


def flag_of(field: dataclasses.Field) -> str:
    """The field's command-line spelling (its first name for an on/off pair)."""
    return (field.metadata.get("flag") or "--" + field.name.replace("_", "-")).split("/")[0]


def check_value(field: dataclasses.Field, value, named: bool = True) -> str | None:
    """What is wrong with `value` for `field`, as a sentence (naming the flag unless named=False); None when fine."""
    if value is None:
        return None
    meta = field.metadata
    name = flag_of(field) + " " if named else ""
    listed = isinstance(value, tuple) and not meta.get("parse")
    if listed and not value and field.default:
        return f"{name}(none): give at least one, e.g. {','.join(map(str, field.default))}"
    for v in value if listed else (value,):
        if meta.get("words") and isinstance(v, str):
            if v in meta["words"]:
                continue
            return f"{name}{v!r} is not a number or {' or '.join(meta['words'])}"
        if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
            return f"{name}{v}: must be a finite number"
        if meta.get("choices") and v not in meta["choices"]:
            choices = ", ".join(map(str, meta["choices"]))
            return f"{name}{v!r}: choose from {choices}" if listed else f"{name}{v!r} is not one of {choices}"
        check = meta.get("check")
        if check == "positive" and not v > 0:
            return f"{name}{v}: must be > 0"
        if check == "non_negative" and not v >= 0:
            return f"{name}{v}: must be >= 0"
        if callable(check):
            problem = check(v)
            if problem:
                return f"{name}{problem}"
        if isinstance(check, tuple):
            low, high, low_open, high_open = check
            if (low is not None and (v < low or (low_open and v == low))) or (
                    high is not None and (v > high or (high_open and v == high))):
                return f"{name}{v}: must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return None


def check_options(opts) -> None:
    """Apply every field's check (the ones the command line applies) to an options object; UsageError names the
    first bad value and its flag."""
    from tfl.errors import UsageError

    unused = set(getattr(opts, "unused", ()))
    for field in dataclasses.fields(opts):
        value = getattr(opts, field.name)
        if field.name in unused:
            if value != field.default and field.default is not dataclasses.MISSING:
                raise UsageError(f"{flag_of(field)} {value!r}: {type(opts).__name__} does not use it; leave it unset")
            continue
        problem = check_value(field, value)
        if problem:
            raise UsageError(problem)


# What --deterministic, --jit and --readback-every mean when not given ("auto"), per device kind of the strategy's
# replicas (tfl.training.device). Determinism: on for CPUs, where it costs little and every pinned number relies on
# it; off for accelerators, where TensorFlow documents determinism as costing performance. XLA: off on a CPU, where
# it made the step slower (measured: docs/concepts/training.md); on for GPUs as Keras' own default
# (compile(jit_compile="auto")) is, except under op determinism, where Keras turns it off too since not every op
# has a deterministic XLA kernel; not asked for on TPUs, whose steps TPUStrategy compiles with XLA anyway.
# Read-back: a CPU every step (a read costs nothing measurable next to a CPU step, and the progress line and a
# SIGTERM act at once); an accelerator every 50 steps, as each read drains its queue of work.
DETERMINISTIC_BY_DEVICE = {"cpu": True, "gpu": False, "tpu": False}
JIT_BY_DEVICE = {"cpu": False, "gpu": True, "tpu": False}
READBACK_BY_DEVICE = {"cpu": 1, "gpu": 50, "tpu": 50}


DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_DATASET = "fashion_mnist"
# Stage 2 backbone lr = 0.3 x the head lr unless --backbone-lr says. Measured on the embedded default: block4 with
# 0.3 x lr reached 0.9375 test accuracy in 19 min, block5 with lr/10 0.9228 in 15 min (2 fine-tune epochs each).
BACKBONE_LR_FACTOR = 0.3
FREEZE_UP_TO_HELP = ("Freeze every layer from the input through the last layer of X: a canonical stage (stem, "
                     "block1..blockN, head), a real layer name, or a layer-name prefix.")
UNSAFE_HELP = ("Read a .keras archive whose config names code (Lambda layers, unregistered classes) anyway: its "
               "weights come as raw <layer>/vars/<i> names; nothing from the file is run.")
SIZE_HELP = "Memory for cached arrays and decoded images, e.g. 4G or 512M."
CACHE_DIR_HELP = "  [default: $TFL_CACHE_DIR or ~/.cache/tfl]"
FRACTION = (0, 1, True, False)  # a share of the labels: 0 < F <= 1


@dataclasses.dataclass
class JobOptions:
    """Every option a training command shares; the command line's defaults and help are these fields'."""

    # data
    dataset: str = option(DEFAULT_DATASET, group="data", help=(
        "fashion_mnist or mnist (IDX files: --data-dir, /usr/share/datasets/fashion-mnist, the Keras cache, then "
        "download), an image folder ROOT/{train,val,test}/<class>/*.jpg, or a tfds name such as cifar10."))
    data_dir: str | None = option(None, group="data", metavar="DIRECTORY",
                                  help="Where datasets are read from (tfds data_dir, IDX files).")
    val_split: float = option(0.1, group="data", check=(0.01, 0.9, False, False), help=(
        "Fraction of train held out (stratified, seeded) when there is no validation split."))
    skip_bad_images: bool = option(False, group="data", help=(
        "Skip unreadable image files instead of stopping (they are listed)."))
    image_size: int | None = option(None, group="data", check="positive", help=(
        "Input size. Default: the backbone's, or 4x the native size for small-image datasets (112px for "
        "Fashion-MNIST)."))
    limit_train: int | None = option(None, group="data", check="positive", metavar="N",
                                     help="Train on a seeded random subset of N examples.")
    label_fraction: float | None = option(None, group="data", check=FRACTION, metavar="F", help=(
        "Train on a seeded, stratified share F of each class's training examples (0 < F <= 1)."))
    # model
    backbone: str = option(DEFAULT_BACKBONE, group="model", help="A name from `tfl backbones`.")
    weights: str | None = option("default", group="model", help=(
        "'default' (the backbone's ImageNet weights: offline for efficientnet_lite0-2, Keras' download for Keras "
        "Applications, timm's Hugging Face checkpoint for the ViTs), 'none' (random init), a path to a weights "
        "file, or hf://ORG/NAME (a timm checkpoint on the Hugging Face Hub; the ViTs and the timm CNNs)."))
    init_from: str | None = option(None, group="model", metavar="FILE", help=(
        "After building the model, before training, copy weights by name from FILE (any format `tfl "
        "inspect-checkpoint` reads; PyTorch files go through the backbone's mapping). Strict: restore_report.json "
        "in the run directory says what was loaded, skipped and why."))
    reuse: tuple[str, ...] = option((), group="model", repeat=True, metavar="REGEX", help=(
        "With --init-from: restore only model weights or layers whose name fully matches REGEX (repeatable; e.g. "
        "'hidden[123]'); each must be in FILE. Default: every weight FILE has."))
    reuse_exclude: tuple[str, ...] = option((), group="model", repeat=True, metavar="REGEX",
                                            help="With --init-from: never restore these (repeatable).")
    rename: tuple[tuple[str, str], ...] = option((), group="model", repeat=True, parse="renames", metavar="SRC=DST",
                                                 help=(
        r"With --init-from: rename FILE's tensors, regex SRC (fullmatch) to DST with \1 groups, e.g. "
        r"'(.*)/weights=\1/kernel'. Repeatable; applied in order."))
    init_unsafe: bool = option(False, group="model", flag="--unsafe", help=UNSAFE_HELP)
    freeze_up_to: str | None = option(FREEZE_DEFAULT, group="model", metavar="X", help=FREEZE_UP_TO_HELP + (
        " 'default': the backbone's own depth (`tfl backbones` lists it; it leaves roughly the top quarter to a "
        "third of the backbone trainable; block4 for efficientnet_lite0, the embedded default's measured best "
        "within 20 minutes on a 2-core CPU). 'none' unfreezes the whole backbone after the head stage. 'auto' lets "
        "`tfl advise` choose, by short runs of this recipe above every other boundary on at most 1,000 images with "
        "this run's epochs and options (and the input size, unless --image-size is given; k-fold on a small val "
        "split, see --proxy-folds; advice.json says why). A shallower "
        "boundary adapts more layers at more cost per epoch (Fashion-MNIST at 112px on a 2-core AVX-512 CPU: 146s "
        "an epoch at block4, 3s with everything frozen)."))
    # --freeze REGEX / --unfreeze REGEX, in command-line order (the last matching rule wins): tfl.cli.params
    rules: tuple[tuple[str, str], ...] = option((), group="model", cli=False)
    freeze_mode: str = option("trainable", group="model", choices=FREEZE_MODES, help=(
        "trainable: frozen layers get trainable=False. stop_gradient: a gradient stop at the boundary tensor "
        "(prefix-shaped freezes only). Both give identical results."))
    train_bn: bool = option(False, group="model", flag="--train-bn/--no-train-bn", help=(
        "Train BatchNormalization layers above the freeze boundary. Default: every BN layer stays in inference "
        "mode with frozen statistics, as the Keras fine-tuning guide recommends. Frozen BN layers never change "
        "either way."))
    head_hidden: tuple[int, ...] = option((), group="model", parse="hidden", metavar="N[,N]", show_default=False,
                                          help="Hidden Dense layers in the head, e.g. 256.")
    dropout: float = option(0.2, group="model", check=(0, 0.95, False, False), help="Dropout before the head.")
    # train
    head_epochs: int = option(10, group="train", check="non_negative", help=(
        "Stage 1: epochs training only the new head on the frozen backbone (seconds each with the boundary "
        "cache)."))
    # The embedded default within 20 min (6 epochs: test 0.9460, but 21 min on 2 cores).
    epochs: int = option(4, group="train", check="non_negative",
                         help="Stage 2: epochs with the layers above --freeze-up-to unfrozen.")
    batch_size: int = option(64, group="train", check="positive", help=(
        "Batch size per replica. The global batch is this x the number of replicas (--devices x workers); on one "
        "device they are the same."))
    optimizer: str = option("adam", group="train", choices=OPTIMIZERS, help="sgd uses momentum 0.9.")
    lr: float = option(1e-3, group="train", check="positive", help="Learning rate of the head.")
    backbone_lr: float | None = option(None, group="train", check="positive", help=(
        f"Learning rate of the backbone once it trains (default: {BACKBONE_LR_FACTOR} x --lr)."))
    weight_decay: float | None = option(None, group="train", check="non_negative",
                                        help="Decoupled weight decay (default: 0.01 for adamw, else 0).")
    schedule: str = option("cosine", group="train", choices=SCHEDULES, help=(
        "Per stage, after warmup. step: multiply by --gamma every --step-size epochs (PyTorch StepLR)."))
    warmup_epochs: float = option(0.0, group="train", check="non_negative",
                                  help="Linear warmup from zero over this many epochs (fractions allowed).")
    step_size: int = option(7, group="train", check="positive", help="Epochs between steps (--schedule step).")
    gamma: float = option(0.1, group="train", check="positive", help="Step factor (--schedule step).")
    label_smoothing: float = option(0.0, group="train", check=(0, 0.5, False, False), help=(
        "Mix this much of a uniform distribution into the one-hot targets of the loss."))
    augment: str = option("none", group="train", choices=AUGMENTS, bare=AUGMENT_BARE, help=(
        "Per-image augmentation of the training batches, seeded. basic: random flip, pad-and-crop and small "
        "rotation; randaugment: basic, then 2 RandAugment ops per image at magnitude 9 (timm's rand-m9-n2, without "
        "equalize and sharpness). A bare --augment means basic. Changes the pixels, so no boundary cache."))
    random_erasing: float = option(0.0, group="train", check=(0, 1, False, False), metavar="P", help=(
        "Erase one random rectangle (2-33% of the image, filled with noise) of each training image with probability "
        "P. Changes the pixels, so no boundary cache."))
    mixup: float = option(0.0, group="train", check="non_negative", metavar="ALPHA", help=(
        "MixUp: mix each training batch with itself reversed, weight ~ Beta(ALPHA, ALPHA), and train on the mixed "
        "soft labels (0: off; 0.2 is common). Mixes the cached boundary activations where a stage trains on them, "
        "which keeps the cache (see --mixup-on)."))
    cutmix: float = option(0.0, group="train", check="non_negative", metavar="ALPHA", help=(
        "CutMix: paste a box of the reversed batch into each training batch, area ~ Beta(ALPHA, ALPHA), with soft "
        "labels by area (0: off; 1.0 is common). With --mixup too, each batch takes one of the two. Changes the "
        "pixels, so no boundary cache."))
    mixup_on: str = option("auto", group="train", choices=MIXUP_ON, help=(
        "Where --mixup mixes. auto: the cached boundary activations of a stage that trains on them, else the "
        "images; features: only cached activations (a stage that would train on images is refused); pixels: the "
        "images (turns the boundary cache off)."))
    early_stopping: int | None = option(None, group="train", check="positive", metavar="N", help=(
        "End a stage after N epochs without val improvement (the next stage still runs)."))
    seed: int = option(0, group="train", help="Seeds data order, init and dropout: runs repeat on CPU.")
    ema: float | None = option(None, group="train", check=(0, 1, True, True), metavar="DECAY", help=(
        "Keep an exponential moving average of the weights (timm's EMA with its warm-up: the decay used at update "
        "n is min(DECAY, 1 - n^-2/3), so the average starts as the weights and slows towards DECAY, e.g. 0.999), "
        "validated after every epoch; the run's model is the average when it beats the trained weights on val."))
    swa_epochs: int = option(0, group="train", check="non_negative", metavar="N", help=(
        "Stochastic weight averaging: average the weights of the last N epochs of the final stage, recompute the "
        "BatchNorm statistics of the BN layers that train on the train data, validate; the run's model is the "
        "average when it beats the trained weights on val. 0: off."))
    regularize: str | None = option(None, group="train", check=regularize_problem, metavar="SPEC", help=(
        "Regularised fine-tuning. l2sp:ALPHA[,BETA]: ALPHA/2 ||w - w0||^2 over the backbone's weights (w0: "
        "their values when the run starts) plus BETA/2 ||w||^2 over the new head's (BETA default 0), e.g. "
        "l2sp:0.01,0.01 (Li et al. 2018). bss:ETA[,K]: ETA x the sum of the K (default 1) smallest squared "
        "singular values of each batch's pooled features, e.g. bss:0.001 (Chen et al. 2019)."))
    cache: str = option("auto", group="train", choices=CACHE_MODES, help=(
        "Boundary caching: compute the frozen layers' output once and train the layers above it on the cached "
        "tensors (head stage: pooled features; later stages: their freeze boundary). auto: whenever valid (no "
        "pixel augmentation (--augment, --random-erasing, --cutmix, --mixup-on pixels), a prefix-shaped freeze); on: "
        "fail if impossible; off: recompute every epoch."))
    cache_budget: str | None = option(None, group="train", parse="size", metavar="SIZE", help=SIZE_HELP + (
        " What does not fit is read from disk under --cache-dir.  [default: 25% of RAM, at most 4G]"))
    cache_dir: str | None = option(None, group="train", metavar="DIRECTORY", help=(
        "Where cached activations persist, so a later run with the same backbone, weights, boundary, image size "
        "and data skips extraction." + CACHE_DIR_HELP))
    cache_disk_limit: str | None = option(None, group="train", parse="disk_size", metavar="SIZE", help=(
        "Cap of --cache-dir, e.g. 20G: least recently used entries are deleted beyond it, and a cache entry bigger "
        "than it (and than --cache-budget) is refused, so that stage runs its frozen layers every epoch instead "
        "(the log says so).  [default: 20G]"))
    decoded_images: str = option("auto", group="train", choices=DECODED_IMAGES, help=(
        "Train and val images of an image folder: keep decodes them once and keeps them (in memory within "
        "--cache-budget, else a decoded copy under --cache-dir); stream decodes the files again every epoch "
        "(parallel, in the same seeded order: the same batches, memory independent of the number of images, "
        "nothing written to disk); auto keeps them when they fit --cache-budget, else streams. IDX datasets "
        "(fashion_mnist, mnist) are arrays in memory and tfds datasets are decoded once as before, whatever this "
        "says."))
    jit: bool | None = option(None, group="train", flag="--jit/--no-jit", choices=(True, False), help=(
        "XLA-compile the train and eval steps and the cache extraction. Default: off on a CPU (XLA made the "
        "step slower there), on for GPUs unless --deterministic (TPUs compile with XLA anyway).  "
        "[default: by device]"))
    deterministic: bool | None = option(None, group="train", flag="--deterministic/--no-deterministic",
                                        choices=(True, False), help=(
        "Op determinism (tf.config.experimental.enable_op_determinism): the same --seed gives the same numbers on "
        "the same machine. Default: on for CPUs (cheap there), off for GPUs and TPUs (their deterministic kernels "
        "are slower); config.json records the choice.  [default: by device]"))
    readback_every: int | None = option(None, group="train", check="positive", metavar="STEPS", help=(
        f"Steps between reads of the training numbers (loss, metrics, a SIGTERM on another worker, a non-finite "
        "loss) from the device; they add up on the device meanwhile and are always read at the end of an epoch, "
        "so the results do not depend on it. Default: {READBACK_BY_DEVICE['cpu']} on a CPU, "
        f"{READBACK_BY_DEVICE['gpu']} on GPUs and TPUs, whose queue of work each read drains.  [default: by device]"))
    mixed_precision: str = option("auto", group="train", choices=MIXED_PRECISION, help=(
        "Compute in half precision (float32 weights, logits and loss): auto times a few train steps in float32 and "
        "in the device's fast half precision (bfloat16 on CPUs with avx512_bf16/amx_bf16; bfloat16 or float16 on "
        "GPUs by compute capability) and keeps the faster, remembered in the cache directory; on forces it, off is "
        "float32. $TFL_MIXED_PRECISION sets what auto means."))
    tensorboard: bool = option(True, group="train", flag="--tensorboard/--no-tensorboard", help=(
        "Write TensorBoard event files under <run>/tensorboard/ (per-step and per-epoch loss, accuracy and "
        "learning rates, the options as hparams, the freeze plan): `tensorboard --logdir runs/`."))
    # distribution
    strategy: str = option("auto", group="distribution", choices=STRATEGIES, help=(
        "tf.distribute strategy. one_device: the first GPU, else the CPU. mirrored: every GPU, or --devices N. "
        "multi_worker: MultiWorkerMirroredStrategy over the workers in TF_CONFIG (or --worker-hosts); the chief "
        "(worker 0) writes the run directory. tpu: TPUStrategy on $TPU_NAME (default 'local'). auto: multi_worker "
        "with 2+ workers, mirrored with --devices 2+ or 2+ GPUs, else default."))
    devices: int | None = option(None, group="distribution", check="positive", metavar="N", help=(
        "Replicas on this machine: the first N GPUs, or with no GPU the CPU split into N logical devices."))
    worker_hosts: tuple[str, ...] = option((), group="distribution", parse="hosts", metavar="HOST:PORT,...",
                                           show_default=False, help=(
        "Every worker's address, chief first, the same list on each worker; with --task-index it writes TF_CONFIG "
        "for multi_worker."))
    task_index: int | None = option(None, group="distribution", check="non_negative", metavar="I",
                                    help="This worker's position in --worker-hosts (0 is the chief).")
    scale_lr: bool = option(False, group="distribution", help=(
        "Multiply --lr and --backbone-lr by the number of replicas (linear scaling for the larger global batch)."))
    # run
    output_dir: str | None = option(None, group="run", metavar="DIRECTORY", help=(
        "Run directory (default: runs/<time>-<backbone>-<dataset>). If it holds a checkpoint of an interrupted run "
        "with the same settings, training continues from it; any other non-empty directory is refused (see "
        "--overwrite). The run locks it while it trains."))
    resume: bool = option(False, group="run", help=(
        "Insist on continuing the run in --output-dir from its last finished epoch: fail if it has no checkpoint. "
        "A changed model, head, class set or training setting is refused either way."))
    overwrite: bool = option(False, group="run", help=(
        "Start a new run in a non-empty --output-dir, deleting the earlier run's files there (config, history, "
        "model, metrics, checkpoints, figures, TensorBoard events; nothing else). Without it a non-empty directory "
        "that is not a resumable run of the same settings is refused."))
    export: bool = option(False, group="run", help=(
        "Then export the best model as a SavedModel for TF Serving to saved_models/<run name>/<next version>/, as "
        "`tfl export --run` does with its defaults."))

    def __post_init__(self):
        # --augment was on/off before it took a policy: True and False keep their meaning (basic, none)
        if isinstance(self.augment, bool):
            self.augment = "basic" if self.augment else "none"


AUGMENTATION = ("augment", "random_erasing", "mixup", "cutmix", "mixup_on")
"""The augmentation options, for a command that trains on fixed inputs."""
MIXING = ("mixup", "cutmix", "mixup_on")
"""The options that mix labels, for a command whose loss or batches need each row's own label."""


@dataclasses.dataclass
class AdapterOptions:
    """Low-rank adapters instead of full fine-tuning, for a command that fine-tunes (tfl.adapters): mixed into its
    options class, e.g. `class FinetuneOptions(JobOptions, AdapterOptions)`."""

    adapter: str = option(ADAPTER_NONE, group="model", choices=ADAPTERS, help=(
        "lora: instead of training the backbone layers above --freeze-up-to, add a trainable low-rank update "
        "B.A to every Dense, EinsumDense and Conv kernel there (their own weights, and every other backbone "
        "layer, stay frozen; the new head trains fully; batch norm as --train-bn says). model.keras and every "
        "export get the merged kernels, so serving needs nothing new."))
    lora_rank: int = option(DEFAULT_LORA_RANK, group="model", check="positive", metavar="R",
                            help="With --adapter lora: the rank of each update (its A is fan-in x R, B is R x out).")
    lora_alpha: float | None = option(None, group="model", check="positive", metavar="A", help=(
        "With --adapter lora: the update is scaled by A / R.  [default: R, a scale of 1]"))
    save_adapters_only: bool = option(False, group="run", help=(
        "With --adapter lora: write adapters.safetensors (the adapters and the head: what training changed) and "
        "adapters.json instead of model.keras. `--init-from <run>/adapters.safetensors` with the same backbone, "
        "weights and --adapter options loads them into a new run."))


ADAPTER_OPTIONS = tuple(f.name for f in dataclasses.fields(AdapterOptions))

# -- tfl advise's proxy (--freeze-up-to auto too) -------------------------------------------------------------------
PROXY_FOLDS_AUTO = "auto"
# auto: k-fold below this many val examples. The binomial standard error of an accuracy p on n examples is
# sqrt(p (1 - p) / n): at p = 0.8 it is 0.018 at 500 and 0.04 at 100, larger than the 0.4-2 points that separate
# neighbouring depths in the calibration (docs/results/advise.md), so one small val split cannot rank them.
PROXY_SMALL_VAL = 500
DEFAULT_PROXY_FOLDS = 3  # auto's k on a small val split: 3x the proxy's runs, each on 2/3 of train+val
MAX_PROXY_FOLDS = 10
# Of the depths whose proxy accuracy is within PROXY_TIE_BAND_SE standard errors of the best mean, which one
# (tfl.recipes.advise.TIE_RULES holds what each does). scripts/calibrate_advise.py --rules scores every rule from
# advise.json: on the eight calibration sets with 3-fold proxies, shallowest gave up 0.40 points of test accuracy
# against the best depth on average (4/8 within one stage), best_mean 0.85 (1/8), deepest 0.86 (4/8), middle 0.77
# (3/8); docs/results/advise.md.
TIE_RULES = ("best_mean", "deepest", "shallowest", "middle")
DEFAULT_TIE_RULE = "shallowest"
PROXY_TIE_BAND_SE = 1.0
# The run's train-better options: the proxy trains with them when the run does (advise.json "proxy" "applied").
TRAIN_BETTER = ("augment", "random_erasing", "mixup", "cutmix", "mixup_on", "ema", "swa_epochs", "regularize", "lr")


def proxy_folds_problem(value) -> str | None:
    """--proxy-folds' check (besides the word auto): 1 (one val score) or 2..MAX_PROXY_FOLDS folds."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROXY_FOLDS:
        return (f"{value!r}: must be auto, 1 (score on the val split alone) or 2-{MAX_PROXY_FOLDS} folds of "
                "train+val, e.g. 3")
    return None


@dataclasses.dataclass
class ProxyOptions:
    """How tfl advise's proxy scores the depths, for every command that takes --freeze-up-to auto (and tfl
    advise): mixed into its options class."""

    proxy_folds: int | str = option(PROXY_FOLDS_AUTO, group="model", words=(PROXY_FOLDS_AUTO,),
                                    check=proxy_folds_problem, metavar="K|auto", help=(
        "The proxy of --freeze-up-to auto / tfl advise scores each depth by stratified K-fold cross-validation "
        "over the train+val rows it may use (K runs per depth, mean and standard error recorded), or with 1 on "
        f"the val split alone. auto: {DEFAULT_PROXY_FOLDS} folds when the val split has fewer than "
        f"{PROXY_SMALL_VAL} examples (its binomial standard error, 2-4 points, is larger than the gaps between "
        "depths), else 1."))
    proxy_tie_rule: str = option(DEFAULT_TIE_RULE, group="model", choices=TIE_RULES, help=(
        f"Of the depths whose proxy accuracy is within {PROXY_TIE_BAND_SE:g} standard error of the best mean: "
        "best_mean takes the best (exact ties: the deeper), deepest freezes the most, shallowest the least, middle "
        "the middle one."))


PROXY_OPTIONS = tuple(f.name for f in dataclasses.fields(ProxyOptions))

SWEEP_RUN = ("strategy", "worker_hosts", "task_index", "scale_lr", "resume", "overwrite", "export")
"""What a command that trains many runs in one process does not take: multi-worker (--devices only) and the
single run's --resume/--overwrite/--export (rerunning into the same --output-dir continues it)."""
FROZEN_BACKBONE = ("freeze_up_to", "rules", "freeze_mode", "train_bn")
"""The freeze options, for a command whose backbone always stays frozen."""


def augmentation_flags(opts) -> list[str]:
    """The augmentation options `opts` turns on (its training batches then change every epoch), as flags."""
    flags = [f"--augment {opts.augment}"] if opts.augment not in ("none", False, None) else []
    return flags + [f"{flag_of(f)} {getattr(opts, f.name):g}" for f in dataclasses.fields(JobOptions)
                    if f.name in ("random_erasing", "mixup", "cutmix") and getattr(opts, f.name)]


def all_but(*used: str) -> tuple[str, ...]:
    """The JobOptions fields a command ignores, for a command that uses only a few of them."""
    return tuple(f.name for f in dataclasses.fields(JobOptions) if f.name not in used)
