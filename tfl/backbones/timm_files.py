"""A timm / Hugging Face checkpoint for a native backbone: the weights file, and the config.json beside it.

timm saves a model for the Hub as `model.safetensors` (or the older `pytorch_model.bin`) with a `config.json`:
`architecture` (the timm model name), `num_classes`, and, for a model built with non-default arguments,
`model_args` (e.g. ConvNeXt `depths`/`dims`, EfficientNetV2 `channel_multiplier`). A builder reads that config,
when there is one, to build the network the file was saved from; files are read without torch
(tfl.checkpoints.read).
"""

from __future__ import annotations

import logging
import os

from tfl.backbones import hf_hub
from tfl.checkpoints.json_limits import loads_bounded
from tfl.checkpoints.read import read_checkpoint
from tfl.checkpoints.restore import TORCH_STYLE_FORMATS
from tfl.errors import UsageError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_MAX_CONFIG_BYTES = 1 << 20  # a timm config.json is a few KB
_FILES = "a timm/Hugging Face model.safetensors or pytorch_model.bin"
SOURCE = "timm/HF model.safetensors or pytorch_model.bin, a PATH or hf://ORG/NAME (config.json beside it is read)"


def weights_file(name: str, weights, source: str | None = None, hub_id: str | None = None) -> str:
    """The checkpoint file behind `weights`: a path (a file, or a downloaded repository's folder), `hf://ORG/NAME`
    (downloaded or from the Hugging Face cache: tfl.backbones.hf_hub), or the backbone's own source name `source`
    (timm's checkpoint hf://`hub_id`); anything else is a UsageError that names the value and the fix."""
    named = f"{source!r} (timm's hf://{hub_id}), " if source else ""
    if not isinstance(weights, (str, os.PathLike)):
        raise UsageError(f"weights={weights!r} for backbone {name!r}: expected None, {named}hf://ORG/NAME or the "
                         f"path of {_FILES}")
    path = os.fspath(weights)
    if source and path == source:
        path = hf_hub.PREFIX + hub_id
    if path.startswith(hf_hub.PREFIX):
        return hf_hub.download_checkpoint(path, backbone=name)
    if path == "imagenet":
        raise UsageError(f"backbone {name!r} has no built-in download; pass --weights hf://ORG/NAME (a timm "
                         f"checkpoint on the Hugging Face Hub), --weights PATH ({_FILES}, with its config.json beside "
                         "it) or --weights none for random initialisation")
    if os.path.isdir(path):
        for file_name in hf_hub.WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, file_name)):
                return os.path.join(path, file_name)
        raise UsageError(f"weights={path!r} for backbone {name!r} is a directory without model.safetensors or "
                         f"pytorch_model.bin; pass the path of {_FILES}")
    if not os.path.isfile(path):
        raise UsageError(f"weights={path!r} for backbone {name!r}: no such file. Pass {named}hf://ORG/NAME, the path "
                         f"of {_FILES}, or none (random init)")
    return path


def read_config(name: str, path: str) -> tuple[str, dict | None]:
    """(the path of the config.json beside the weights file `path`, its contents or None when there is none): a
    bounded JSON object whose `architecture`, when it names one, is `name` (else a UsageError naming the fix)."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    if not os.path.isfile(config_path):
        return config_path, None
    with open(config_path, "rb") as f:
        raw = f.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise UsageError(f"{config_path} is larger than {_MAX_CONFIG_BYTES} bytes: not a timm config.json")
    try:
        config = loads_bounded(raw, max_depth=16)
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{config_path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_path} is not a JSON object; fix or remove it")
    architecture = config.get("architecture")
    if architecture is not None and str(architecture).split(".")[0] != name:
        architecture = str(architecture).split(".")[0]
        raise UsageError(f"--weights {path!r}: its {CONFIG_NAME} says architecture {architecture!r}, not {name!r}; "
                         f"pass --backbone {architecture} if tfl has it (see `tfl backbones`), or the checkpoint of a "
                         f"{name}")
    return config_path, config


def checkpoint(name: str, weights, accepted_args: tuple[str, ...]) -> tuple[str | None, dict]:
    """(the weights file behind `weights`, or None for random init; model_config of it): what a timm CNN builder
    needs before it builds."""
    if weights is None:
        return None, {"num_classes": None, "model_args": {}}
    path = weights_file(name, weights)
    return path, model_config(name, path, accepted_args)


def model_config(name: str, path: str, accepted_args: tuple[str, ...]) -> dict:
    """The config.json beside `path` ({} when there is none), checked against the backbone being built.

    Returns {"num_classes": int | None, "model_args": {...}} with only the `accepted_args` that change the
    network's shape; an `architecture` other than `name`, or a model argument tfl cannot build, is refused.
    """
    config_path, config = read_config(name, path)
    if config is None:
        return {"num_classes": None, "model_args": {}}
    args = dict(config.get("model_args") or {})
    for key, value in (("in_chans", 3), ("global_pool", "avg")):
        if args.pop(key, value) != value:
            raise UsageError(f"--weights {path!r}: its {CONFIG_NAME} sets {key}={config['model_args'][key]!r}; tfl "
                             f"builds {name} with {key}={value!r}")
    unknown = sorted(set(args) - set(accepted_args) - _IGNORED_ARGS)
    if unknown:
        raise UsageError(f"--weights {path!r}: its {CONFIG_NAME} sets model_args {', '.join(unknown)}, which tfl's "
                         f"{name} does not build (it reads {', '.join(accepted_args)})")
    num_classes = config.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise UsageError(f"{config_path}: num_classes={num_classes!r} is not a positive integer")
    log.info("%s: building %s from %s (model_args %s)", path, name, config_path, args)
    return {"num_classes": num_classes, "model_args": {k: v for k, v in args.items() if k in accepted_args}}


# Arguments that do not change the weights' shapes or the inference-mode output.
_IGNORED_ARGS = {"num_classes", "drop_rate", "drop_path_rate", "pretrained_cfg", "pretrained_cfg_overlay"}


def read_torch_style(path: str, name: str):
    """The raw state dict of a .safetensors/.bin file; a Keras or TF file is refused with the --init-from fix."""
    checkpoint = read_checkpoint(path)
    if checkpoint.format not in TORCH_STYLE_FORMATS:
        raise UsageError(f"weights={path!r} is a {checkpoint.format} file, but {name} weights are read from "
                         f"{_FILES}; to copy weights by Keras name from this file use "
                         "`tfl finetune --weights none --init-from FILE`")
    return checkpoint
