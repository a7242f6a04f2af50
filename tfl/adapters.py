"""LoRA adapters (Hu et al. 2021) on the trainable part of a classifier, with Keras 3's own `enable_lora`.

`--adapter lora --lora-rank R [--lora-alpha A]`: every Dense, EinsumDense and Conv1D/2D/3D layer of the backbone
above the freeze boundary gets `layer.enable_lora(R, lora_alpha=A)`: its kernel becomes W + (A / R) * a @ b, with
a (fan-in x R, He-uniform) and b (R x out, zeros) trainable and W and the bias frozen; every other backbone layer
(depthwise convolutions, batch norm unless --train-bn) is frozen too, and the new head trains fully. The freeze
plan (tfl.freezing) reads which layers carry an adapter from the model, so every plan made from it agrees.

Keras' `trainable` setter resets every variable of a layer to the layer's flag, so `freeze_base` runs after every
change of flags (tfl.freezing.training_graph). Keras saves a LoRA layer's merged kernel (its `save_own_variables`
merges), but its config keeps `lora_rank`; `merged` builds the plain model (no adapters in config or graph) that
model.keras and the exports are made from. `adapter_file` holds only what training changed.

Depthwise kernels get no adapter: Keras has none for them, and a 3x3 depthwise kernel has 9 weights per channel,
fewer than any rank-R update of it.
"""

from __future__ import annotations

import json
import os
import tempfile

import keras
import numpy as np

from tfl.errors import UsageError
from tfl.options import ADAPTER_NONE, DEFAULT_LORA_RANK

LORA = "lora"
METADATA_KEY = "tfl_adapters"  # in the safetensors header: the manifest, as JSON
LORA_VARIABLES = ("lora_kernel_a", "lora_kernel_b")


def lora_layer_types() -> tuple:
    """The layer classes that get an adapter: the ones whose `enable_lora` adapts a kernel (Embedding's adapts a
    lookup table, which tfl's classifiers do not have)."""
    layers = keras.layers
    return (layers.Dense, layers.EinsumDense, layers.Conv1D, layers.Conv2D, layers.Conv3D)


def check_options(opts) -> None:
    """Refuse LoRA settings that would be ignored: --lora-rank, --lora-alpha or --save-adapters-only without
    --adapter lora."""
    adapter = getattr(opts, "adapter", ADAPTER_NONE)
    if adapter == ADAPTER_NONE:
        given = [flag for flag, on in (("--lora-rank", opts.lora_rank != DEFAULT_LORA_RANK),
                                       ("--lora-alpha", opts.lora_alpha is not None),
                                       ("--save-adapters-only", opts.save_adapters_only)) if on]
        if given:
            raise UsageError(f"{', '.join(given)} without --adapter lora, which they apply to: add --adapter lora")
    elif adapter != LORA:
        raise UsageError(f"--adapter {adapter!r} is not one of {ADAPTER_NONE}, {LORA}")
    elif not opts.lora_rank > 0:  # the command line checks it too; the API may pass anything
        raise UsageError(f"--lora-rank {opts.lora_rank}: must be > 0, e.g. --lora-rank {DEFAULT_LORA_RANK}")


def lora_params(kernel_shape, rank: int) -> int:
    """Weights of one LoRA update of a kernel: a is (all but the last axis) x rank, b is rank x the last axis."""
    return rank * (int(np.prod(kernel_shape[:-1])) + int(kernel_shape[-1]))


def has_adapter(layer) -> bool:
    return bool(getattr(layer, "lora_enabled", False))


def is_adapter_variable(layer, variable) -> bool:
    return has_adapter(layer) and any(variable is getattr(layer, name) for name in LORA_VARIABLES)


def base_weights(layer) -> list:
    """The layer's own weights, without its adapter's."""
    return [v for v in layer.weights if not is_adapter_variable(layer, v)]


def adapter_weights(layer) -> list:
    return [getattr(layer, name) for name in LORA_VARIABLES] if has_adapter(layer) else []


def add_lora(model, plan, rank: int, alpha: float | None = None) -> list[str]:
    """Enable LoRA on every adaptable backbone layer that `plan` leaves trainable; returns their names.

    UsageError when there is none (everything adaptable lies below the freeze boundary)."""
    from tfl.models import backbone_of

    open_layers = set(plan.open_backbone_layers())
    targets = [layer for layer in backbone_of(model).layers
               if layer.name in open_layers and isinstance(layer, lora_layer_types())
               and not getattr(layer, "kernel_constraint", None)]
    if not targets:
        raise UsageError(
            f"--adapter lora: no Dense, EinsumDense or Conv layer of {plan.backbone} is trainable with --freeze-up-to "
            f"{plan.freeze_up_to} (LoRA adapts the layers above the freeze boundary, and the new head trains fully "
            f"anyway); freeze less, e.g. a lower stage of `tfl inspect {plan.backbone}`, or drop --adapter")
    for layer in targets:
        if not has_adapter(layer):
            layer.enable_lora(rank, lora_alpha=alpha)
    return [layer.name for layer in targets]


def freeze_base(layer) -> None:
    """Only the adapter of a LoRA layer trains: its kernel and bias stay as loaded."""
    for variable in base_weights(layer):
        variable.trainable = False


def merged(model):
    """`model` with every adapter merged into its kernel, as a plain model (no adapter in its config or graph):
    what model.keras and the exports hold. A model without adapters is returned as it is."""
    if not any(has_adapter(layer) for layer in _leaves(model)):
        return model
    # tfl's own layers in the config are registered by the modules that built the model (tfl.models).
    plain = model.__class__.from_config(_without_lora(model.get_config()))
    # Keras writes a LoRA layer's merged kernel in the place of its kernel (save_own_variables), and nothing of
    # the adapter: the weights file of the adapted model is the plain model's.
    with tempfile.TemporaryDirectory(prefix="tfl-merge-") as folder:
        path = os.path.join(folder, "merged.weights.h5")
        model.save_weights(path)
        plain.load_weights(path)
    return plain


def _leaves(model) -> list:
    if not isinstance(model, keras.Model):
        return [model]
    return [leaf for layer in model.layers for leaf in _leaves(layer)]


def _without_lora(config):
    if isinstance(config, dict):
        return {k: _without_lora(v) for k, v in config.items() if k not in ("lora_rank", "lora_alpha")}
    if isinstance(config, list):
        return [_without_lora(v) for v in config]
    return config


# -- adapter-only files ---------------------------------------------------------------------------------------------
def trained_weights(model, plan, train_bn: bool = False) -> dict:
    """{canonical weight name: variable} of what `plan` trains: the adapters of its LoRA layers and every weight of
    the layers it trains fully (the head; batch norm above the boundary with `train_bn`, statistics too), named as
    --init-from restores them."""
    from tfl.checkpoints.restore import model_targets

    by_name = {l.name: l for l in plan.layers}
    names = {id(t.variable): name for name, t in model_targets(model).items()}
    chosen = {}
    for layer in _leaves(model):
        entry = by_name.get(layer.name)
        if entry is None or entry.frozen:
            continue
        if entry.base_frozen and not has_adapter(layer) and not (entry.is_batch_norm and train_bn):
            continue
        for variable in adapter_weights(layer) if has_adapter(layer) else layer.weights:
            chosen[names[id(variable)]] = variable
    return chosen


def adapter_file(model, plan, manifest: dict, train_bn: bool = False) -> tuple[bytes, dict]:
    """The bytes of an adapter-only safetensors file (the trained weights, float32, the manifest in its header)
    and the manifest with the tensors' shapes and count; the run directory names it (tfl.training.rundir)."""
    from tfl.checkpoints.safetensors_file import encode_safetensors

    tensors = {name: np.asarray(v.numpy(), dtype=np.float32)
               for name, v in trained_weights(model, plan, train_bn).items()}
    manifest = {**manifest, "tensors": {name: list(t.shape) for name, t in tensors.items()},
                "params": int(sum(t.size for t in tensors.values()))}
    return encode_safetensors(tensors, {METADATA_KEY: json.dumps(manifest, sort_keys=True)}), manifest


def read_manifest(path: str) -> dict | None:
    """The manifest of an adapter file (adapter_file); None for any other file, readable or not."""
    from tfl.checkpoints.safetensors_file import read_metadata

    try:
        text = read_metadata(path).get(METADATA_KEY)
    except (OSError, ValueError):  # CheckpointError is a ValueError: not a safetensors file
        return None
    return json.loads(text) if text else None


def check_init_from(path: str | None, opts) -> dict | None:
    """An adapter file given to --init-from needs the adapters it holds: refuse a run without --adapter lora or with
    another rank (the shapes would not fit), naming the options the file was made with."""
    manifest = read_manifest(path) if path else None
    if manifest is None:
        return None
    wanted = f"--adapter lora --lora-rank {manifest['rank']}" + (
        f" --lora-alpha {manifest['alpha']:g}" if manifest.get("alpha") not in (None, manifest["rank"]) else "")
    if getattr(opts, "adapter", ADAPTER_NONE) != LORA or opts.lora_rank != manifest["rank"]:
        raise UsageError(f"--init-from {path}: it holds LoRA adapters of rank {manifest['rank']} for "
                         f"{manifest.get('backbone')}; run with {wanted} (and --freeze-up-to "
                         f"{manifest.get('freeze_up_to')}) to load them")
    return manifest
