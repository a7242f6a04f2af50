"""Native Keras EfficientNetV2 B0..B3 and S, layer for layer timm's `tf_efficientnetv2_*` (the TF-ported weights).

Layers are named after timm's modules with "." -> "_" (`conv_stem`, `blocks_3_1_conv_dw`, `blocks_3_1_se_conv_reduce`,
`conv_head`), which is all the "timm_efficientnet" mapping in tfl/checkpoints/mappings.py needs. The tf_ models
use TF "same" padding (timm's Conv2dSame pads the extra pixel at the bottom/right, as Keras "same" does) and
BatchNorm eps 1e-3; activations are SiLU, squeeze-excite gates are sigmoid. Block kinds, as timm's arch strings:
`cn` (3x3 conv-BN-SiLU), `er` (fused MBConv: 3x3 expand conv, 1x1 project) and `ir` (MBConv with SE).

Stages: stem = conv_stem + bn1; block1..block6 = timm's blocks.0..5 (the six block groups of the paper's table,
and of Keras' EfficientNetV2); head = conv_head + bn2 (the 1x1 conv to 1280+ features, part of the feature map
tfl pools), then the pool and `classifier` with include_top.
"""

from __future__ import annotations

import dataclasses
import math

from tfl.backbones import timm_files
from tfl.backbones.catalog import register
from tfl.backbones.spec import BackboneSpec, Preprocessing, Stage
from tfl.checkpoints.restore import restore
from tfl.errors import UsageError

BN_EPSILON = 1e-3  # timm's BN_EPS_TF_DEFAULT for the tf_ ports
BN_MOMENTUM = 0.9  # Keras weighs the old statistic; torch's momentum=0.1 weighs the new one
CHECKPOINT_MAPPING = "timm_efficientnet"
CLASSIFIER = ("classifier",)
HEAD_FEATURES = 1280

# timm's arch strings as (kind, repeats, kernel, stride, expand ratio, output channels, squeeze-excite ratio);
# `cn` blocks keep a residual only where the string says `skip` (both architectures do).
BASE_GROUPS = (
    ("cn", 1, 3, 1, 1, 16, None),
    ("er", 2, 3, 2, 4, 32, None),
    ("er", 2, 3, 2, 4, 48, None),
    ("ir", 3, 3, 2, 4, 96, 0.25),
    ("ir", 5, 3, 1, 6, 112, 0.25),
    ("ir", 8, 3, 2, 6, 192, 0.25),
)
S_GROUPS = (
    ("cn", 2, 3, 1, 1, 24, None),
    ("er", 4, 3, 2, 4, 48, None),
    ("er", 4, 3, 2, 4, 64, None),
    ("ir", 6, 3, 2, 4, 128, 0.25),
    ("ir", 9, 3, 1, 6, 160, 0.25),
    ("ir", 15, 3, 2, 6, 256, 0.25),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    groups: tuple
    stem: int
    width: float  # timm's channel_multiplier
    depth: float  # timm's depth_multiplier
    round_limit: float  # make_divisible's limit: 0 for B0-B3 (timm's _gen_efficientnetv2_base), 0.9 for S
    resolution: int
    preprocessing: Preprocessing
    # scripts/freeze_defaults.py; the comment gives the trainable share (block6 would leave 2-4%, as for Keras'
    # EfficientNetV2 B0-S)
    default_freeze_up_to: str


# Mean/std of the in1k weights' pretrained configs: ImageNet's for B0-B3, 0.5/0.5 for S. Resolutions: timm's
# test sizes (as Keras' EfficientNetV2).
VARIANTS = {
    "tf_efficientnetv2_b0": Variant(BASE_GROUPS, 32, 1.0, 1.0, 0.0, 224, Preprocessing.torch(), "block5"),  # 76%
    "tf_efficientnetv2_b1": Variant(BASE_GROUPS, 32, 1.0, 1.1, 0.0, 240, Preprocessing.torch(), "block5"),  # 74%
    "tf_efficientnetv2_b2": Variant(BASE_GROUPS, 32, 1.1, 1.2, 0.0, 260, Preprocessing.torch(), "block5"),  # 76%
    "tf_efficientnetv2_b3": Variant(BASE_GROUPS, 32, 1.2, 1.4, 0.0, 300, Preprocessing.torch(), "block5"),  # 77%
    "tf_efficientnetv2_s": Variant(S_GROUPS, 24, 1.0, 1.0, 0.9, 384, Preprocessing.tf(), "block5"),  # 74%
}
_CONFIG_ARGS = ("channel_multiplier", "depth_multiplier")


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, bumped up when it falls below round_limit * value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def block_plan(variant: Variant, width: float, depth: float) -> list[dict]:
    """Every block in order: timm's group and index, kind, kernel, stride, channels in/mid/out, SE width, residual."""
    def channels(c):
        return make_divisible(c * width, round_limit=variant.round_limit)

    blocks, in_chs = [], channels(variant.stem)
    for group, (kind, repeats, kernel, stride, expand, out, se_ratio) in enumerate(variant.groups):
        out_chs = channels(out)
        for i in range(int(math.ceil(repeats * depth))):
            s = stride if i == 0 else 1
            mid = make_divisible(in_chs * expand) if kind != "cn" else out_chs
            # timm's builder: SE width from the block input (rd_ratio / expand of the mid width), Python's round
            se = round(mid * (se_ratio / expand)) if se_ratio else None
            blocks.append(dict(prefix=f"blocks_{group}_{i}_", kind=kind, kernel=kernel, stride=s, in_chs=in_chs,
                               mid=mid, out=out_chs, se=se, skip=s == 1 and in_chs == out_chs))
            in_chs = out_chs
    return blocks


def build_efficientnet_v2(
    name: str,
    input_shape=None,
    weights=None,
    include_top: bool = False,
    width: float | None = None,
    depth: float | None = None,
    num_classes: int | None = None,
):
    """Build timm's `name` in Keras.

    weights: None (random init) or the path of a timm/HF model.safetensors or pytorch_model.bin; a config.json
    beside it sets channel_multiplier/depth_multiplier (its `model_args`) and the class count of the top.
    include_top=False ends on the head's 1x1 conv features; include_top=True adds the pool and `classifier`.
    """
    import keras
    from keras import layers

    variant = VARIANTS[name]
    path, config = timm_files.checkpoint(name, weights, _CONFIG_ARGS)
    width = width or config["model_args"].get("channel_multiplier") or variant.width
    depth = depth or config["model_args"].get("depth_multiplier") or variant.depth
    num_classes = num_classes or config["num_classes"] or 1000
    shape = (variant.resolution, variant.resolution, 3) if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise UsageError(f"input_shape={input_shape!r} for backbone {name!r}: expected (height, width, channels)")
    conv_init = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")

    def conv(x, filters, kernel, stride, layer_name, use_bias=False, activation=None):
        return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=use_bias,
                             activation=activation, kernel_initializer=conv_init, name=layer_name)(x)

    def bn(x, layer_name, act=True):
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=layer_name)(x)
        return layers.Activation("silu", name=layer_name + "_act")(x) if act else x

    inputs = keras.Input(shape=shape, name="input_layer")
    x = bn(conv(inputs, make_divisible(variant.stem * width, round_limit=variant.round_limit), 3, 2, "conv_stem"),
           "bn1")
    for b in block_plan(variant, width, depth):
        p, shortcut = b["prefix"], x
        if b["kind"] == "cn":
            x = bn(conv(x, b["out"], b["kernel"], b["stride"], p + "conv"), p + "bn1")
        elif b["kind"] == "er":
            x = bn(conv(x, b["mid"], b["kernel"], b["stride"], p + "conv_exp"), p + "bn1")
            x = bn(conv(x, b["out"], 1, 1, p + "conv_pwl"), p + "bn2", act=False)
        else:
            x = bn(conv(x, b["mid"], 1, 1, p + "conv_pw"), p + "bn1")
            x = layers.DepthwiseConv2D(b["kernel"], strides=b["stride"], padding="same", use_bias=False,
                                       depthwise_initializer=conv_init, name=p + "conv_dw")(x)
            x = bn(x, p + "bn2")
            if b["se"]:
                se = layers.GlobalAveragePooling2D(keepdims=True, name=p + "se_pool")(x)
                se = conv(se, b["se"], 1, 1, p + "se_conv_reduce", use_bias=True, activation="silu")
                se = conv(se, b["mid"], 1, 1, p + "se_conv_expand", use_bias=True, activation="sigmoid")
                x = layers.Multiply(name=p + "se_gate")([x, se])
            x = bn(conv(x, b["out"], 1, 1, p + "conv_pwl"), p + "bn3", act=False)
        if b["skip"]:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = bn(conv(x, make_divisible(HEAD_FEATURES * width, round_limit=variant.round_limit), 1, 1, "conv_head"), "bn2")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)
        x = layers.Dense(num_classes, name=CLASSIFIER[0])(x)
    model = keras.Model(inputs, x, name=name)
    if path is not None:
        restore(model, timm_files.read_torch_style(path, name), mapping=CHECKPOINT_MAPPING, classifier=CLASSIFIER)
    return model


def _stages(variant: Variant) -> list[Stage]:
    stages = [Stage("stem", r"input_layer|conv_stem|bn1(?:_act)?", "conv_stem 3x3/2 + bn1 (1/2)")]
    stride = 2
    for k, (kind, repeats, _, group_stride, _, out, _) in enumerate(variant.groups, start=1):
        stride *= group_stride
        stages.append(Stage(f"block{k}", rf"blocks_{k - 1}_\d+_.*",
                            f"blocks.{k - 1}: {repeats}x{variant.depth:g} {kind} blocks, {out} channels (1/{stride})"))
    stages.append(Stage("head", r"conv_head|bn2(?:_act)?|global_pool|classifier",
                        "conv_head 1x1 + bn2; pool + classifier only with include_top"))
    return stages


def _register() -> None:
    for name, variant in VARIANTS.items():

        def build(input_shape=None, weights=None, include_top=False, _name=name):
            return build_efficientnet_v2(_name, input_shape, weights, include_top)

        register(
            BackboneSpec(
                name=name,
                family="timm_efficientnet_v2",
                build=build,
                input_size=variant.resolution,
                preprocessing=variant.preprocessing,
                stages=_stages(variant),
                default_freeze_up_to=variant.default_freeze_up_to,
                weight_sources={"PATH": timm_files.SOURCE},
                default_weights=None,
                top_activation="linear",
                description=(
                    f"native timm EfficientNetV2 ({'S' if variant.groups is S_GROUPS else 'base'} arch, width "
                    f"{variant.width}, depth {variant.depth}, TF 'same' padding), {variant.resolution}px; weights: "
                    "--weights PATH to a timm/HF model.safetensors or pytorch_model.bin, or hf://ORG/NAME"
                ),
                checkpoint_mapping=CHECKPOINT_MAPPING,
                classifier=CLASSIFIER,
            )
        )


_register()
