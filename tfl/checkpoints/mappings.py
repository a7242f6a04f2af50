"""Family mappings: a raw PyTorch-style state dict -> canonical Keras weight names, in Keras layout.

A canonical name is what Keras 3 calls a weight, `variable.path` == "<layer>/<weight>" (`layer1_0_conv1/kernel`,
`stem_bn/moving_variance`). Each family says which torch module becomes which Keras layer and what kind of
layer it is; the kind decides how every parameter is renamed and transposed:

    conv2d      weight OIHW -> kernel HWIO, bias -> bias
    depthwise   weight (C, 1, kH, kW) -> kernel (kH, kW, C, 1), bias -> bias
    dense       weight (out, in) -> kernel (in, out), bias -> bias
    batch_norm  weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance
    layer_norm  weight/bias -> gamma/beta (LayerNorm, and ConvNeXt V2's GlobalResponseNorm)
    pointwise   weight (out, in) or a 1x1 conv's (out, in, 1, 1) -> Dense kernel (in, out), bias -> bias

Keys no rule explains keep their raw name, so whoever loads the result reports them as unexpected instead of
losing them; keys the mapping `ignore`s (BatchNorm's num_batches_tracked counter) are dropped on purpose.
Pure numpy: nothing here imports Keras or torch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from tfl.errors import UsageError


def _same(value: np.ndarray) -> np.ndarray:
    return value


def _conv_kernel(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 1, 0)


def _depthwise_kernel(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 0, 1)


def _dense_kernel(value: np.ndarray) -> np.ndarray:
    return value.T


def _pointwise_kernel(value: np.ndarray) -> np.ndarray:
    # timm writes a ConvNeXt MLP as Linear layers or, with conv_mlp, as 1x1 convs: one Dense kernel either way.
    if value.ndim == 4:
        if value.shape[2:] != (1, 1):
            raise UsageError(f"a pointwise weight of shape {value.shape} is not a 1x1 convolution")
        value = value[:, :, 0, 0]
    return value.T


# kind -> {torch parameter: (Keras weight, layout change)}
KINDS: dict[str, dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]] = {
    "conv2d": {"weight": ("kernel", _conv_kernel), "bias": ("bias", _same)},
    "depthwise": {"weight": ("kernel", _depthwise_kernel), "bias": ("bias", _same)},
    "dense": {"weight": ("kernel", _dense_kernel), "bias": ("bias", _same)},
    "batch_norm": {
        "weight": ("gamma", _same),
        "bias": ("beta", _same),
        "running_mean": ("moving_mean", _same),
        "running_var": ("moving_variance", _same),
    },
    "layer_norm": {"weight": ("gamma", _same), "bias": ("beta", _same)},
    "pointwise": {"weight": ("kernel", _pointwise_kernel), "bias": ("bias", _same)},
    "layer_scale": {"gamma": ("gamma", _same)},
    # timm ViT's top-level parameters, kept in one Keras layer (tfl/backbones/vit.py `tokens`)
    "vit_tokens": {"cls_token": ("cls_token", _same), "reg_token": ("reg_token", _same),
                   "pos_embed": ("pos_embed", _same)},
}

# (torch module regex (fullmatch), kind, Keras layer: a re template like r"layer\1_\2_conv\3", or a function of
# the match). The first rule whose regex matches a module decides it.
Rule = tuple[str, str, "str | Callable[[re.Match], str]"]


@dataclasses.dataclass(frozen=True)
class Mapping:
    name: str
    convert: Callable[..., dict]  # convert(state, sources=None) -> {canonical name: array in Keras layout}
    ignore: str  # regex (fullmatch) of raw keys dropped on purpose


def convert_by_rules(state: dict, rules: Sequence[Rule], sources: dict | None = None) -> dict[str, np.ndarray]:
    """Rename and transpose every key a rule explains; pass the others through under their raw names.

    `sources`, if given, is filled with {canonical name: raw key} so errors can name the file's own key.
    """
    compiled = [(re.compile(pattern), kind, layer) for pattern, kind, layer in rules]
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        name, array = key, value
        for pattern, kind, layer in compiled:
            match = pattern.fullmatch(module)
            if match and param in KINDS[kind]:
                weight, layout = KINDS[kind][param]
                target = layer(match) if callable(layer) else match.expand(layer)
                name, array = f"{target}/{weight}", layout(np.asarray(value))
                break
        if name in origin:
            raise UsageError(f"the state dict keys {origin[name]!r} and {key!r} both map to {name!r}")
        out[name], origin[name] = array, key
    if sources is not None:
        sources.update(origin)
    return out


# --- torchvision ResNet (and timm's, whose keys are the same) ----------------------------------------------------
# Keras layers are named after the torch modules with "." -> "_" (tfl/backbones/resnet.py).

_TORCHVISION_RESNET_RULES: tuple[Rule, ...] = (
    (r"conv1", "conv2d", "conv1"),
    (r"bn1", "batch_norm", "bn1"),
    (r"layer(\d+)\.(\d+)\.conv(\d+)", "conv2d", r"layer\1_\2_conv\3"),
    (r"layer(\d+)\.(\d+)\.bn(\d+)", "batch_norm", r"layer\1_\2_bn\3"),
    (r"layer(\d+)\.(\d+)\.downsample\.0", "conv2d", r"layer\1_\2_downsample_0"),
    (r"layer(\d+)\.(\d+)\.downsample\.1", "batch_norm", r"layer\1_\2_downsample_1"),
    (r"fc", "dense", "fc"),
)


def _convert_torchvision_resnet(state: dict, sources: dict | None = None) -> dict[str, np.ndarray]:
    return convert_by_rules(state, _TORCHVISION_RESNET_RULES, sources)


# --- lukemelas EfficientNet(-Lite) ---------------------------------------------------------------------------------
# lukemelas numbers the MBConv blocks 0..N-1; Keras names them by group and letter (`block3b`). Every block group
# of EfficientNet(-Lite) has its own output width, so a new group starts where `_project_conv` changes width.


def _lukemelas_block_names(state: dict) -> dict[int, str]:
    indices = sorted({int(m[1]) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))})
    names, group, letter, width = {}, 0, 0, None
    for index in indices:
        project = state.get(f"_blocks.{index}._project_conv.weight")
        block_width = None if project is None else np.shape(project)[0]
        if width is None or (block_width is not None and block_width != width):
            group, letter = group + 1, 0
        else:
            letter += 1
        width = block_width if block_width is not None else width
        names[index] = f"block{group}{chr(ord('a') + letter)}"
    return names


def _convert_lukemelas_efficientnet(state: dict, sources: dict | None = None) -> dict[str, np.ndarray]:
    blocks = _lukemelas_block_names(state)

    def block(suffix: str) -> Callable[[re.Match], str]:
        return lambda match: f"{blocks[int(match[1])]}_{suffix}"

    rules: tuple[Rule, ...] = (
        (r"_conv_stem", "conv2d", "stem_conv"),
        (r"_bn0", "batch_norm", "stem_bn"),
        (r"_blocks\.(\d+)\._expand_conv", "conv2d", block("expand_conv")),
        (r"_blocks\.(\d+)\._bn0", "batch_norm", block("expand_bn")),
        (r"_blocks\.(\d+)\._depthwise_conv", "depthwise", block("dwconv")),
        (r"_blocks\.(\d+)\._bn1", "batch_norm", block("bn")),
        (r"_blocks\.(\d+)\._project_conv", "conv2d", block("project_conv")),
        (r"_blocks\.(\d+)\._bn2", "batch_norm", block("project_bn")),
        (r"_conv_head", "conv2d", "top_conv"),
        (r"_bn1", "batch_norm", "top_bn"),
        (r"_fc", "dense", "predictions"),
    )
    return convert_by_rules(state, rules, sources)


# --- timm ConvNeXt V2 -------------------------------------------------------------------------------------------
# Keras layers are named after timm's modules with "." -> "_" (tfl/backbones/convnext_v2.py).


def _underscored(match: re.Match) -> str:
    return match[0].replace(".", "_")


_TIMM_CONVNEXT_RULES: tuple[Rule, ...] = (
    (r"stem\.0|stages\.\d+\.downsample\.1", "conv2d", _underscored),
    (r"stem\.1|stages\.\d+\.downsample\.0|stages\.\d+\.blocks\.\d+\.norm|head\.norm", "layer_norm", _underscored),
    (r"stages\.\d+\.blocks\.\d+\.conv_dw", "depthwise", _underscored),
    (r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]", "pointwise", _underscored),
    (r"stages\.\d+\.blocks\.\d+\.mlp\.grn", "layer_norm", _underscored),
    (r"head\.fc", "dense", _underscored),
)


def _convert_timm_convnext(state: dict, sources: dict | None = None) -> dict[str, np.ndarray]:
    return convert_by_rules(state, _TIMM_CONVNEXT_RULES, sources)


# --- timm EfficientNet(V2) -----------------------------------------------------------------------------------------
# Keras layers are named after timm's modules with "." -> "_" (tfl/backbones/efficientnet_v2.py).

_TIMM_EFFICIENTNET_RULES: tuple[Rule, ...] = (
    (r"blocks\.\d+\.\d+\.conv_dw", "depthwise", _underscored),
    (r"conv_stem|conv_head|blocks\.\d+\.\d+\.(?:conv|conv_exp|conv_pw|conv_pwl|se\.conv_reduce|se\.conv_expand)",
     "conv2d", _underscored),
    (r"bn\d|blocks\.\d+\.\d+\.bn\d", "batch_norm", _underscored),
    (r"classifier", "dense", _underscored),
)


def _convert_timm_efficientnet(state: dict, sources: dict | None = None) -> dict[str, np.ndarray]:
    return convert_by_rules(state, _TIMM_EFFICIENTNET_RULES, sources)


# --- timm VisionTransformer (ViT, DeiT, DINOv2) ---------------------------------------------------------------------
# Keras layers are named after timm's modules with "." -> "_" (tfl/backbones/vit.py); the top-level cls_token,
# reg_token and pos_embed (module "") fill the layer `tokens`.

_TIMM_VIT_RULES: tuple[Rule, ...] = (
    (r"", "vit_tokens", "tokens"),
    (r"patch_embed\.proj", "conv2d", "patch_embed_proj"),
    (r"blocks\.(\d+)\.norm([12])", "layer_norm", r"blocks_\1_norm\2"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)", "dense", r"blocks_\1_attn_\2"),
    (r"blocks\.(\d+)\.ls([12])", "layer_scale", r"blocks_\1_ls\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])", "dense", r"blocks_\1_mlp_\2"),
    (r"(norm|fc_norm)", "layer_norm", r"\1"),
    (r"head", "dense", "head"),
)


def _convert_timm_vit(state: dict, sources: dict | None = None) -> dict[str, np.ndarray]:
    return convert_by_rules(state, _TIMM_VIT_RULES, sources)


_BATCH_COUNTER = r"(?:.*\.)?num_batches_tracked"

MAPPINGS: dict[str, Mapping] = {
    m.name: m
    for m in (
        Mapping("torchvision_resnet", _convert_torchvision_resnet, _BATCH_COUNTER),
        # timm's ResNet state dicts use torchvision's module names (conv1, bn1, layer1.0.conv1, fc).
        Mapping("timm_resnet", _convert_torchvision_resnet, _BATCH_COUNTER),
        Mapping("lukemelas_efficientnet", _convert_lukemelas_efficientnet, _BATCH_COUNTER),
        Mapping("timm_convnext", _convert_timm_convnext, _BATCH_COUNTER),
        Mapping("timm_efficientnet", _convert_timm_efficientnet, _BATCH_COUNTER),
        # DINOv2's own files carry the masked-image-modelling token, which inference never uses.
        Mapping("timm_vit", _convert_timm_vit, r"mask_token"),
    )
}


def get_mapping(name: str) -> Mapping:
    try:
        return MAPPINGS[name]
    except KeyError:
        raise UsageError(f"unknown checkpoint mapping {name!r}; choose one of: {', '.join(sorted(MAPPINGS))}") from None


def to_keras(state: dict, mapping: str | Mapping, sources: dict | None = None) -> dict[str, np.ndarray]:
    """The state dict under canonical Keras names, in Keras layout, without the keys the mapping ignores."""
    mapping = get_mapping(mapping) if isinstance(mapping, str) else mapping
    kept = {k: v for k, v in state.items() if not re.fullmatch(mapping.ignore, k)}
    return mapping.convert(kept, sources)
