"""A compact native CNN (~0.33 M parameters): a student that is really smaller and faster than the Lite teachers,
with nothing to download. It has no pretrained weights; it is trained from scratch (or distilled into).

    stem    stem_conv 3x3/1 24, BN, ReLU
    block1  block1a 3x3/2 48, block1b 3x3/1 48   (1/2)
    block2  block2a 3x3/2 96, block2b 3x3/1 96   (1/4)
    block3  block3a 3x3/2 160                    (1/8)
    head    top_conv 1x1 256, BN, ReLU

Every conv is conv -> BN -> ReLU; layer names follow the Lite models' (`stem_conv`, `block2a_conv`, `top_bn`), so
the canonical stages are the names' own prefixes. BatchNormalization uses momentum 0.9: random-init training with
Keras' 0.99 left the moving statistics behind the weights (see tfl.recipes.stages.SCRATCH_BN_MOMENTUM).
"""

from __future__ import annotations

from tfl.backbones.catalog import register
from tfl.backbones.spec import BackboneSpec, Preprocessing, Stage
from tfl.errors import UsageError

NAME = "compact_cnn"
# (stage, [(block letter, filters, stride)])
BLOCKS = (("block1", (("a", 48, 2), ("b", 48, 1))),
          ("block2", (("a", 96, 2), ("b", 96, 1))),
          ("block3", (("a", 160, 2),)))
STEM_FILTERS, HEAD_FILTERS = 24, 256
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-3
INPUT_SIZE = 32


def build_compact_cnn(input_shape=None, weights=None, include_top: bool = False):
    """include_top=True adds avg_pool and a 1000-way `predictions` (logits), only for the shape of the contract."""
    import keras
    from keras import layers

    if weights is not None:
        raise UsageError(f"--weights {weights!r}: {NAME} has no pretrained weights; use --weights none (random "
                         "init), or --init-from FILE to copy weights by name")
    shape = (INPUT_SIZE, INPUT_SIZE, 3) if input_shape is None else tuple(input_shape)
    inputs = keras.Input(shape=shape, name="input_layer")

    def conv_bn(x, filters, kernel, stride, prefix):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}conv")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{prefix}bn")(x)
        return layers.ReLU(name=f"{prefix}relu")(x)

    x = conv_bn(inputs, STEM_FILTERS, 3, 1, "stem_")
    for stage, blocks in BLOCKS:
        for letter, filters, stride in blocks:
            x = conv_bn(x, filters, 3, stride, f"{stage}{letter}_")
    x = conv_bn(x, HEAD_FILTERS, 1, 1, "top_")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, name="predictions")(x)
    return keras.Model(inputs, x, name=NAME)


def _stages() -> list[Stage]:
    stages = [Stage("stem", r"input_layer|stem_.*", "stem_conv 3x3/1, 24 channels")]
    for stage, blocks in BLOCKS:
        widths = ", ".join(f"{stage}{letter} 3x3/{stride} {filters}" for letter, filters, stride in blocks)
        stages.append(Stage(stage, rf"{stage}[a-z]_.*", widths))
    stages.append(Stage("head", r"top_.*|avg_pool|predictions", f"top_conv 1x1 to {HEAD_FILTERS}"))
    return stages


register(
    BackboneSpec(
        name=NAME,
        family="compact_cnn",
        build=build_compact_cnn,
        input_size=INPUT_SIZE,
        preprocessing=Preprocessing.tf(),
        stages=_stages(),
        default_freeze_up_to="block2",  # block3 + top train: 53% of the parameters (block3 would leave 12%)
        weight_sources={},
        default_weights=None,
        top_activation="linear",
        classifier=("predictions",),
        description=f"native compact CNN (~0.33 M parameters, {INPUT_SIZE}px default), random init only: a small, "
                    "fast student for tfl distill",
    )
)
