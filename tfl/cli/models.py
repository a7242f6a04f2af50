"""Commands about models and checkpoints: backbones, inspect, inspect-checkpoint, convert."""

from __future__ import annotations

import math

import click

from tfl.cli.core import call, cli, echo_json
from tfl.cli.params import OrderedRulesCommand, field_option, positive, rule_options
from tfl.options import ADAPTER_NONE, FREEZE_DEFAULT, FREEZE_UP_TO_HELP, UNSAFE_HELP, AdapterOptions


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones(as_json):
    """List the backbones: input size, canonical stages, the default freeze depth, weight sources."""
    from tfl.backbones import registry

    specs = registry.all_specs()
    rows = [{"name": s.name, "family": s.family, "input_size": s.input_size, "stages": s.stage_names,
             "default_freeze_up_to": s.default_freeze_up_to, "weights": dict(s.weight_sources),
             "default_weights": s.default_weights, "description": s.description}
            for s in specs]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        weights = ", ".join(f"{k}: {v}" for k, v in r["weights"].items()) or "none"
        click.echo(f"{r['name']:<22} {r['input_size']:>4}px  stages {r['stages'][0]}..{r['stages'][-1]} "
                   f"({len(r['stages'])})  frozen up to {r['default_freeze_up_to']:<7} weights {weights}")


def _adapter_options(f):
    """--adapter, --lora-rank, --lora-alpha as `tfl finetune` has them (tfl.options.AdapterOptions)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(AdapterOptions)
    fields = [f for f in dataclasses.fields(AdapterOptions) if f.name in ("adapter", "lora_rank", "lora_alpha")]
    f.__click_params__ = getattr(f, "__click_params__", []) + [field_option(fd, hints[fd.name])
                                                               for fd in reversed(fields)]
    return f


def _with_rules(f):
    f.__click_params__ = getattr(f, "__click_params__", []) + list(reversed(rule_options()))
    return f


@cli.command(cls=OrderedRulesCommand)
@click.argument("backbone")
@click.option("--freeze-up-to", metavar="X", default=FREEZE_DEFAULT, show_default=True,
              help=FREEZE_UP_TO_HELP + " 'default': the depth `tfl finetune` uses for this backbone; 'none' freezes "
                   "nothing.")
@_with_rules
@click.option("--num-classes", default=10, show_default=True, callback=positive, help="Classes of the new head.")
@click.option("--image-size", type=int, callback=positive, help="Input size (default: the backbone's).")
@_adapter_options
@click.option("--json", "as_json", is_flag=True,
              help='Print {"backbone", "layers", "trainable_params", "frozen_params"}.')
def inspect(backbone, freeze_up_to, freeze_rules, unfreeze_rules, num_classes, image_size, adapter, lora_rank,
            lora_alpha, as_json):
    """Show the freeze plan for BACKBONE: each layer's stage, frozen or not, parameter count (with --adapter lora:
    which layers get an adapter, and its size).

    Builds the model with random weights (nothing is downloaded), so it works offline for every backbone.
    """
    from tfl import adapters, freezing, models
    from tfl.backbones import registry

    rules = click.get_current_context().meta["tfl_rules"]
    spec = call(registry.get, backbone)
    model = call(models.build_classifier, backbone, num_classes, image_size, "none")
    plan = call(freezing.make_plan, spec, model, freeze_up_to, rules)
    if adapter != ADAPTER_NONE:
        call(adapters.add_lora, model, plan, lora_rank, lora_alpha)
        plan = call(freezing.make_plan, spec, model, freeze_up_to, rules)
    if as_json:
        echo_json(plan.to_json())
        return
    click.echo(f"{'layer':<40} {'stage':<11} {'frozen':<7} {'params':>12}" + ("   adapter" if plan.adapter else ""))
    for layer in plan.layers:
        extra = f"   {layer.adapter} {layer.adapter_params:,}" if layer.adapter else ""
        click.echo(f"{layer.name:<40} {layer.stage:<11} {'yes' if layer.weights_frozen else 'no':<7} "
                   f"{layer.params:>12,}{extra}")
    click.echo(f"trainable params: {plan.trainable_params:,}   frozen params: {plan.frozen_params:,}   "
               f"boundary: {plan.boundary() or 'none (not prefix-shaped)'}")


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
    from tfl.reuse import read_checkpoint

    checkpoint = call(read_checkpoint, file, unsafe=unsafe)
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
@click.option("--output", required=True, type=click.Path(dir_okay=False), metavar="OUT.keras",
              help="Where to save the model.")
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

    call(convert_checkpoint, file, backbone, output, num_classes, image_size, with_preprocessing, unsafe,
         log=click.echo)
    click.echo(f"saved {output}")
