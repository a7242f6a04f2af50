"""Every Keras Applications classifier as a tfl backbone, generated from one table of families.

Each family is described once: the Keras constructors of its variants, input size, preprocessing, and a
stage table (regex fullmatch over the layer names of the include_top=False model, first match wins).
Stages are `stem`, `block1`..`blockN`, `head`, in model order; `head` matches nothing where a family
ends on its last block.

Some Keras models leave layers unnamed, so Keras numbers them (`conv2d_17`, `activation_5`) from a
per-thread counter. `build` runs the constructor with fresh counters, which makes those names the same
every time, so the tables below can list them by number (`_auto`). The numbers were read off Keras
3.15; tests/test_keras_apps.py checks that every layer is covered and every stage is contiguous.

Keras is imported inside `build` only: importing this module (to list backbones) stays cheap.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import warnings
from typing import Mapping, Sequence

from tfl.backbones.download import weights_download_errors
from tfl.backbones.catalog import register
from tfl.backbones.spec import BackboneSpec, Preprocessing, Stage
from tfl.errors import UsageError

NOTHING = r"(?!)"  # a pattern that matches no layer name (for a family without a head)


def _auto(prefix: str, first: int, last: int) -> str:
    """Keras names its n-th unnamed `prefix` layer `prefix` (n=0) or `prefix_n`; match n in [first, last]."""
    alternatives = [prefix] if first == 0 else []
    numbers = range(max(first, 1), last + 1)
    if numbers:
        alternatives.append(f"{prefix}_(?:{'|'.join(map(str, numbers))})")
    return "|".join(alternatives)


def _any(*patterns: str) -> str:
    return "|".join(f"(?:{pattern})" for pattern in patterns)


def _conv_bn_relu(first: int, last: int) -> str:
    """Inception's unnamed conv2d_bn units: conv2d_n, batch_normalization_n, activation_n."""
    return _any(*(_auto(p, first, last) for p in ("conv2d", "batch_normalization", "activation")))


def _nasnet_cells(*cells: str | int) -> str:
    """Named layers of NASNet cells, which end in the cell id (`_stem_1`, `_reduce_4`, `_7`)."""
    ids = [c if isinstance(c, str) else rf"(?<!reduce_)(?<!stem_){c}" for c in cells]
    return rf"(?:adjust|normal|reduction|separable)_\w*_(?:{'|'.join(ids)})"


def _expanded_conv(*indices: int) -> str:
    """MobileNetV3's inverted-residual blocks: `expanded_conv_*` (index 0) or `expanded_conv_<i>_*`."""
    numbered = rf"expanded_conv_(?:{'|'.join(map(str, indices))})_\w+"
    return _any(r"expanded_conv_(?!\d)\w+", numbered) if 0 in indices else numbered


@dataclasses.dataclass(frozen=True)
class StageTable:
    """stem pattern, one (pattern, doc) per block, head pattern; the input layer is added to the stem."""

    stem: str
    stem_doc: str
    blocks: tuple[tuple[str, str], ...]
    head: str = NOTHING
    head_doc: str = "none: the last block's output is the feature map"

    def stages(self) -> tuple[Stage, ...]:
        stem = Stage("stem", _any(r"input_layer(?:_\d+)?", self.stem), self.stem_doc)
        blocks = (Stage(f"block{i}", p, doc) for i, (p, doc) in enumerate(self.blocks, start=1))
        return (stem, *blocks, Stage("head", self.head, self.head_doc))


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # tfl's public name
    constructor: str  # attribute of keras.applications
    input_size: int  # Keras' default (and ImageNet-weights) resolution
    params_m: float  # millions of parameters without the top, as built by Keras 3.15
    stages: StageTable | None = None  # when layer numbering differs between variants of a family
    default_freeze_up_to: str | None = None  # when the family's does not fit this variant's parameter spread


@dataclasses.dataclass(frozen=True)
class Family:
    family: str
    preprocessing: Preprocessing
    stage_summary: str  # for descriptions
    variants: tuple[Variant, ...]  # smallest first
    stages: StageTable | None = None  # shared by all variants unless a variant has its own
    keras_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # Keras builds a different graph (and the stage table no longer fits) when height/width are None.
    static_input: bool = False
    # The default --freeze-up-to (BackboneSpec.default_freeze_up_to) unless a variant names its own. The comment
    # beside each says which share of the backbone's parameters it leaves trainable (scripts/freeze_defaults.py).
    default_freeze_up_to: str | None = None


def _numbered_blocks(count: int, pattern: str, docs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    return tuple((pattern.format(k=k), docs[k - 1]) for k in range(1, count + 1))


_IN_MODEL = "Keras' own rescaling/normalization layers (raw 0-255 RGB in)"

_RESNET = StageTable(
    stem=r"conv1_.*|pool1_.*",
    stem_doc="conv1 7x7/2 + pool1 3x3/2 (1/4 resolution)",
    blocks=(
        (r"conv2_.*", "conv2_x (1/4)"),
        (r"conv3_.*", "conv3_x (1/8)"),
        (r"conv4_.*", "conv4_x (1/16)"),
        (r"conv5_.*", "conv5_x (1/32)"),
    ),
)

# Keras ResNetV2 puts each stack's stride on its last block; that block's shortcut is an unnamed max-pool.
_RESNET_V2 = StageTable(
    stem=r"conv1_.*|pool1_.*",
    stem_doc="conv1 7x7/2 + pool1 3x3/2 (1/4); no BN/ReLU here, pre-activation starts in block1",
    blocks=(
        (_any(r"conv2_.*", _auto("max_pooling2d", 0, 0)), "conv2_x (1/4, last block strides to 1/8)"),
        (_any(r"conv3_.*", _auto("max_pooling2d", 1, 1)), "conv3_x (last block strides to 1/16)"),
        (_any(r"conv4_.*", _auto("max_pooling2d", 2, 2)), "conv4_x (last block strides to 1/32)"),
        (r"conv5_.*", "conv5_x (1/32)"),
    ),
    head=r"post_bn|post_relu",
    head_doc="post_bn + post_relu, the final pre-activation",
)

_VGG = StageTable(
    stem=NOTHING,
    stem_doc="the input layer only (VGG has no stem)",
    blocks=_numbered_blocks(
        5, r"block{k}_.*", [f"block{k}_conv* + block{k}_pool (1/{2**k})" for k in range(1, 6)]
    ),
)

_MOBILENET = StageTable(
    stem=r"conv1|conv1_bn|conv1_relu",
    stem_doc="conv1 3x3/2 (1/2)",
    blocks=tuple(
        (rf"conv_(?:dw|pw|pad)_(?:{'|'.join(map(str, units))})(?:_bn|_relu)?", doc)
        for units, doc in (
            ((1,), "depthwise-separable unit 1 (1/2)"),
            ((2, 3), "units 2-3 (1/4)"),
            ((4, 5), "units 4-5 (1/8)"),
            ((6, 7, 8, 9, 10, 11), "units 6-11 (1/16)"),
            ((12, 13), "units 12-13 (1/32)"),
        )
    ),
)

# The paper's seven bottleneck groups (Table 2: channels 16, 24, 32, 64, 96, 160, 320); each group's first
# block carries its stride. Same layout as EfficientNet's block1..block7.
_MOBILENET_V2 = StageTable(
    stem=r"Conv1|bn_Conv1|Conv1_relu",
    stem_doc="Conv1 3x3/2 (1/2)",
    blocks=(
        (r"expanded_conv_.*", "expanded_conv: t=1, 16 ch (1/2)"),
        (r"block_(?:1|2)_.*", "block_1-2: 24 ch (1/4)"),
        (r"block_(?:3|4|5)_.*", "block_3-5: 32 ch (1/8)"),
        (r"block_(?:6|7|8|9)_.*", "block_6-9: 64 ch (1/16)"),
        (r"block_(?:10|11|12)_.*", "block_10-12: 96 ch (1/16)"),
        (r"block_(?:13|14|15)_.*", "block_13-15: 160 ch (1/32)"),
        (r"block_16_.*", "block_16: 320 ch (1/32)"),
    ),
    head=r"Conv_1|Conv_1_bn|out_relu",
    head_doc="Conv_1 1x1 to 1280 ch + out_relu",
)

_MOBILENET_V3_STEM = _any(r"rescaling|conv|conv_bn", _auto("activation", 0, 0))
_MOBILENET_V3_STEM_DOC = f"{_IN_MODEL} + conv 3x3/2 + hard-swish (1/2)"

# Blocks grouped by output channels (the rows of the paper's Tables 1-2 with one width), stride first.
_MOBILENET_V3_SMALL = StageTable(
    stem=_MOBILENET_V3_STEM,
    stem_doc=_MOBILENET_V3_STEM_DOC,
    blocks=(
        (_any(_expanded_conv(0), _auto("re_lu", 0, 1)), "expanded_conv: 16 ch, SE (1/4)"),
        (_any(_expanded_conv(1, 2), _auto("re_lu", 2, 5)), "expanded_conv_1-2: 24 ch (1/8)"),
        (
            _any(_expanded_conv(3, 4, 5), _auto("activation", 1, 6), _auto("re_lu", 6, 8)),
            "expanded_conv_3-5: 40 ch (1/16)",
        ),
        (
            _any(_expanded_conv(6, 7), _auto("activation", 7, 10), _auto("re_lu", 9, 10)),
            "expanded_conv_6-7: 48 ch (1/16)",
        ),
        (
            _any(_expanded_conv(8, 9, 10), _auto("activation", 11, 16), _auto("re_lu", 11, 13)),
            "expanded_conv_8-10: 96 ch (1/32)",
        ),
    ),
    head=_any(r"conv_1|conv_1_bn", _auto("activation", 17, 17)),
    head_doc="conv_1 1x1 to 576 ch + hard-swish",
)

_MOBILENET_V3_LARGE = StageTable(
    stem=_MOBILENET_V3_STEM,
    stem_doc=_MOBILENET_V3_STEM_DOC,
    blocks=(
        (_any(_expanded_conv(0), _auto("re_lu", 0, 0)), "expanded_conv: 16 ch (1/2)"),
        (_any(_expanded_conv(1, 2), _auto("re_lu", 1, 4)), "expanded_conv_1-2: 24 ch (1/4)"),
        (_any(_expanded_conv(3, 4, 5), _auto("re_lu", 5, 13)), "expanded_conv_3-5: 40 ch, SE (1/8)"),
        (_any(_expanded_conv(6, 7, 8, 9), _auto("activation", 1, 8)), "expanded_conv_6-9: 80 ch (1/16)"),
        (
            _any(_expanded_conv(10, 11), _auto("activation", 9, 12), _auto("re_lu", 14, 15)),
            "expanded_conv_10-11: 112 ch, SE (1/16)",
        ),
        (
            _any(_expanded_conv(12, 13, 14), _auto("activation", 13, 18), _auto("re_lu", 16, 18)),
            "expanded_conv_12-14: 160 ch, SE (1/32)",
        ),
    ),
    head=_any(r"conv_1|conv_1_bn", _auto("activation", 19, 19)),
    head_doc="conv_1 1x1 to 960 ch + hard-swish",
)

_EFFICIENTNET_STEM = r"rescaling|normalization|stem_.*"
_EFFICIENTNET_STEM_DOC = f"{_IN_MODEL} + stem_conv 3x3/2 (1/2)"
_EFFICIENTNET_HEAD = r"top_.*"
_EFFICIENTNET_HEAD_DOC = "top_conv 1x1 + top_bn + top_activation"
_EFFICIENTNET_DOCS = [
    f"Keras block{k}* ({res})"
    for k, res in enumerate(("1/2", "1/4", "1/8", "1/16", "1/16", "1/32", "1/32"), start=1)
]


def _efficientnet_table(block_count: int) -> StageTable:
    return StageTable(
        stem=_EFFICIENTNET_STEM,
        stem_doc=_EFFICIENTNET_STEM_DOC,
        blocks=_numbered_blocks(block_count, r"block{k}[a-z]+_.*", _EFFICIENTNET_DOCS),
        head=_EFFICIENTNET_HEAD,
        head_doc=_EFFICIENTNET_HEAD_DOC,
    )


_DENSENET = StageTable(
    stem=_any(r"conv1_.*|pool1", _auto("zero_padding2d", 0, 1)),
    stem_doc="conv1 7x7/2 + pool1 3x3/2 (1/4)",
    blocks=(
        (r"conv2_.*|pool2_.*", "dense block 1 (conv2_*, 1/4) + transition pool2 (to 1/8)"),
        (r"conv3_.*|pool3_.*", "dense block 2 (conv3_*) + transition pool3 (to 1/16)"),
        (r"conv4_.*|pool4_.*", "dense block 3 (conv4_*) + transition pool4 (to 1/32)"),
        (r"conv5_.*", "dense block 4 (conv5_*, 1/32)"),
    ),
    head=r"bn|relu",
    head_doc="final bn + relu",
)

# Inception stems: five unnamed conv2d_bn units (conv2d .. conv2d_4) and two max-pools, to 35x35.
_INCEPTION_STEM = _any(_conv_bn_relu(0, 4), _auto("max_pooling2d", 0, 1))
_INCEPTION_STEM_DOC = "five conv2d_bn units + 2 max-pools (299 -> 35x35)"

_INCEPTION_V3 = StageTable(
    stem=_INCEPTION_STEM,
    stem_doc=_INCEPTION_STEM_DOC,
    blocks=(
        (
            _any(r"mixed[0-2]", _conv_bn_relu(5, 25), _auto("average_pooling2d", 0, 2)),
            "mixed0-2: Inception-A (35x35)",
        ),
        (
            _any(
                r"mixed[3-7]",
                _conv_bn_relu(26, 69),
                _auto("max_pooling2d", 2, 2),
                _auto("average_pooling2d", 3, 6),
            ),
            "mixed3 reduction + mixed4-7 Inception-B (17x17)",
        ),
        (
            _any(
                r"mixed(?:8|9|10|9_0|9_1)",
                _conv_bn_relu(70, 93),
                _auto("max_pooling2d", 3, 3),
                _auto("average_pooling2d", 7, 8),
                _auto("concatenate", 0, 1),
            ),
            "mixed8 reduction + mixed9-10 Inception-C (8x8)",
        ),
    ),
)

_INCEPTION_RESNET_V2 = StageTable(
    stem=_INCEPTION_STEM,
    stem_doc=_INCEPTION_STEM_DOC,
    blocks=(
        (
            _any(
                r"mixed_5b|block35_.*",
                _conv_bn_relu(5, 71),
                _auto("average_pooling2d", 0, 0),
                _auto("custom_scale_layer", 0, 9),
            ),
            "mixed_5b + block35_1-10: Inception-ResNet-A (35x35)",
        ),
        (
            _any(
                r"mixed_6a|block17_.*",
                _conv_bn_relu(72, 155),
                _auto("max_pooling2d", 2, 2),
                _auto("custom_scale_layer", 10, 29),
            ),
            "mixed_6a reduction + block17_1-20: Inception-ResNet-B (17x17)",
        ),
        (
            _any(
                r"mixed_7a|block8_.*",
                _conv_bn_relu(156, 202),
                _auto("max_pooling2d", 3, 3),
                _auto("custom_scale_layer", 30, 39),
            ),
            "mixed_7a reduction + block8_1-10: Inception-ResNet-C (8x8)",
        ),
    ),
    head=r"conv_7b|conv_7b_bn|conv_7b_ac",
    head_doc="conv_7b 1x1 to 1536 ch",
)

# Xception's own blocks regrouped by resolution; each residual block's shortcut conv/bn/add are unnamed.
_XCEPTION = StageTable(
    stem=r"block1_.*",
    stem_doc="entry-flow block1: two plain convs (1/2)",
    blocks=(
        (_any(r"block2_.*", *(_auto(p, 0, 0) for p in ("conv2d", "batch_normalization", "add"))), "block2 (1/4)"),
        (_any(r"block3_.*", *(_auto(p, 1, 1) for p in ("conv2d", "batch_normalization", "add"))), "block3 (1/8)"),
        (
            _any(
                r"block(?:[4-9]|1[0-2])_.*",
                _auto("conv2d", 2, 2),
                _auto("batch_normalization", 2, 2),
                _auto("add", 2, 10),
            ),
            "entry-flow block4 (1/16) + middle flow block5-12",
        ),
        (
            _any(r"block1[34]_.*", _auto("conv2d", 3, 3), _auto("batch_normalization", 3, 3), _auto("add", 11, 11)),
            "exit flow block13-14 (1/32)",
        ),
    ),
)

# NASNet cells pass two tensors on, so Keras interleaves the start of one cell's skip path with the previous
# cell. Stage boundaries sit before reduction cells, where no parametric layer interleaves; stem_2's
# parameter-free skip-path head (relu, pad, crop) sits inside stem_1 and is counted there.


def _nasnet_table(cells_per_stack: int, last_activation: tuple[int, int, int, int]) -> StageTable:
    """NASNet with static input shape: `cells_per_stack` normal cells after each reduction; the unnamed
    relus are numbered in model order, and `last_activation` is the last one of block1..block4."""
    n = cells_per_stack
    first_activation = (0, *(last + 1 for last in last_activation[:3]))
    relus = [_auto("activation", a, b) for a, b in zip(first_activation, last_activation)]
    skip_path = [[_auto(p, k, k) for p in ("add", "zero_padding2d", "cropping2d")] for k in range(4)]
    return StageTable(
        stem=r"stem_conv1|stem_bn1",
        stem_doc="stem_conv1 3x3/2 (1/2)",
        blocks=(
            (
                _any(_nasnet_cells("stem_1"), r"adjust_relu_1_stem_2", relus[0], *skip_path[0]),
                "reduction cell stem_1 (1/4)",
            ),
            (
                _any(
                    _nasnet_cells("stem_2", *range(0, n)), relus[1], _auto("concatenate", 0, 1), *skip_path[1]
                ),
                f"reduction cell stem_2 + normal cells 0-{n - 1} (1/8)",
            ),
            (
                _any(
                    _nasnet_cells(f"reduce_{n}", *range(n + 1, 2 * n + 1)),
                    relus[2],
                    _auto("concatenate", 2, 2),
                    *skip_path[2],
                ),
                f"reduction cell reduce_{n} + normal cells {n + 1}-{2 * n} (1/16)",
            ),
            (
                _any(
                    _nasnet_cells(f"reduce_{2 * n}", *range(2 * n + 1, 3 * n + 1)),
                    relus[3],
                    _auto("concatenate", 3, 3),
                    *skip_path[3],
                ),
                f"reduction cell reduce_{2 * n} + normal cells {2 * n + 1}-{3 * n} (1/32)",
            ),
        ),
        head=_auto("activation", last_activation[3] + 1, last_activation[3] + 1),
        head_doc="final relu",
    )


_CONVNEXT = StageTable(
    stem=r"convnext_[a-z]+_(?:prestem_normalization|stem)",
    stem_doc=f"{_IN_MODEL} + 4x4/4 patchify stem (1/4)",
    blocks=(
        (r"convnext_[a-z]+_stage_0_.*", "stage 0 (1/4)"),
        (r"convnext_[a-z]+_(?:downsampling_block_0|stage_1_.*)", "downsampling_block_0 + stage 1 (1/8)"),
        (r"convnext_[a-z]+_(?:downsampling_block_1|stage_2_.*)", "downsampling_block_1 + stage 2 (1/16)"),
        (r"convnext_[a-z]+_(?:downsampling_block_2|stage_3_.*)", "downsampling_block_2 + stage 3 (1/32)"),
    ),
    head=_auto("layer_normalization", 0, 0),
    head_doc="final LayerNormalization",
)

FAMILIES: tuple[Family, ...] = (
    Family(
        "resnet",
        Preprocessing.caffe(),
        "stem=conv1+pool1, block1-4=conv2_x..conv5_x",
        (
            Variant("resnet50", "ResNet50", 224, 23.59),
            Variant("resnet101", "ResNet101", 224, 42.66),
            Variant("resnet152", "ResNet152", 224, 58.37),
        ),
        _RESNET,
        default_freeze_up_to="block3",  # conv5_x trains: 64% (50), 35% (101), 26% (152)
    ),
    Family(
        "resnet_v2",
        Preprocessing.tf(),
        "stem=conv1+pool1, block1-4=conv2_x..conv5_x, head=post_bn/relu",
        (
            Variant("resnet50_v2", "ResNet50V2", 224, 23.56),
            Variant("resnet101_v2", "ResNet101V2", 224, 42.63),
            Variant("resnet152_v2", "ResNet152V2", 224, 58.33),
        ),
        _RESNET_V2,
        default_freeze_up_to="block3",  # conv5_x + post_bn train: 64% (50), 35% (101), 26% (152)
    ),
    Family(
        "vgg",
        Preprocessing.caffe(),
        "block1-5=Keras block1..block5 (convs + pool)",
        (Variant("vgg16", "VGG16", 224, 14.71), Variant("vgg19", "VGG19", 224, 20.02)),
        _VGG,
        default_freeze_up_to="block4",  # block5 trains: 48% (16), 47% (19)
    ),
    Family(
        "mobilenet",
        Preprocessing.tf(),
        "stem=conv1, block1-5=separable units by resolution (1 | 2-3 | 4-5 | 6-11 | 12-13)",
        (Variant("mobilenet", "MobileNet", 224, 3.23),),
        _MOBILENET,
        default_freeze_up_to="block4",  # units 12-13 train: 50%
    ),
    Family(
        "mobilenet_v2",
        Preprocessing.tf(),
        "stem=Conv1, block1-7=the paper's bottleneck groups, head=Conv_1",
        (Variant("mobilenet_v2", "MobileNetV2", 224, 2.26),),
        _MOBILENET_V2,
        default_freeze_up_to="block6",  # block_16 + Conv_1 train: 40%
    ),
    Family(
        "mobilenet_v3",
        Preprocessing.identity(),
        "stem=rescaling+conv, blocks=expanded_conv groups by width, head=conv_1",
        (
            # The last block group and conv_1 hold most parameters: one stage deeper would leave 6% (small) / 5%.
            Variant("mobilenet_v3_small", "MobileNetV3Small", 224, 0.94, _MOBILENET_V3_SMALL, "block4"),  # 79%
            Variant("mobilenet_v3_large", "MobileNetV3Large", 224, 3.00, _MOBILENET_V3_LARGE, "block5"),  # 73%
        ),
        keras_kwargs={"include_preprocessing": True},
    ),
    Family(
        "efficientnet",
        Preprocessing.identity(),
        "stem=rescaling+stem_conv, block1-7=Keras block1*..block7*, head=top_*",
        tuple(
            Variant(f"efficientnet_b{i}", f"EfficientNetB{i}", size, params)
            for i, (size, params) in enumerate(
                (
                    (224, 4.05),
                    (240, 6.58),
                    (260, 7.77),
                    (300, 10.78),
                    (380, 17.67),
                    (456, 28.51),
                    (528, 40.96),
                    (600, 64.10),
                )
            )
        ),
        _efficientnet_table(7),
        default_freeze_up_to="block6",  # block7 + top train: 28% (b0) to 42% (b2)
    ),
    Family(
        "efficientnet_v2",
        Preprocessing.identity(),
        "stem=rescaling+stem_conv, blocks=Keras block1*..blockN*, head=top_*",
        (
            # Six groups: block6 holds ~70% of the parameters, so block5 leaves 74-77% (block6 would leave 2-4%).
            Variant("efficientnet_v2_b0", "EfficientNetV2B0", 224, 5.92, _efficientnet_table(6)),
            Variant("efficientnet_v2_b1", "EfficientNetV2B1", 240, 6.93, _efficientnet_table(6)),
            Variant("efficientnet_v2_b2", "EfficientNetV2B2", 260, 8.77, _efficientnet_table(6)),
            Variant("efficientnet_v2_b3", "EfficientNetV2B3", 300, 12.93, _efficientnet_table(6)),
            Variant("efficientnet_v2_s", "EfficientNetV2S", 384, 20.33, _efficientnet_table(6)),
            Variant("efficientnet_v2_m", "EfficientNetV2M", 480, 53.15, _efficientnet_table(7), "block6"),  # 35%
            Variant("efficientnet_v2_l", "EfficientNetV2L", 480, 117.75, _efficientnet_table(7), "block6"),  # 35%
        ),
        keras_kwargs={"include_preprocessing": True},
        default_freeze_up_to="block5",
    ),
    Family(
        "densenet",
        Preprocessing.torch(),
        "stem=conv1+pool1, block1-4=dense blocks conv2..conv5 (+ transitions), head=bn/relu",
        (
            Variant("densenet121", "DenseNet121", 224, 7.04),
            Variant("densenet169", "DenseNet169", 224, 12.64),
            Variant("densenet201", "DenseNet201", 224, 18.32),
        ),
        _DENSENET,
        default_freeze_up_to="block3",  # dense block 4 + bn train: 31% (121), 47% (169), 39% (201)
    ),
    Family(
        "inception_v3",
        Preprocessing.tf(),
        "stem=5 convs, block1=mixed0-2, block2=mixed3-7, block3=mixed8-10",
        (Variant("inception_v3", "InceptionV3", 299, 21.80),),
        _INCEPTION_V3,
        default_freeze_up_to="block2",  # mixed8-10 train: 59% (block3 is the last stage)
    ),
    Family(
        "inception_resnet_v2",
        Preprocessing.tf(),
        "stem=5 convs, block1=mixed_5b+block35, block2=mixed_6a+block17, block3=mixed_7a+block8, head=conv_7b",
        (Variant("inception_resnet_v2", "InceptionResNetV2", 299, 54.34),),
        _INCEPTION_RESNET_V2,
        default_freeze_up_to="block2",  # mixed_7a + block8 + conv_7b train: 51% (block3 would leave 6%)
    ),
    Family(
        "xception",
        Preprocessing.tf(),
        "stem=block1, block1-2=block2-3, block3=block4-12, block4=block13-14",
        (Variant("xception", "Xception", 299, 20.86),),
        _XCEPTION,
        default_freeze_up_to="block3",  # the exit flow trains: 33%
    ),
    Family(
        "nasnet",
        Preprocessing.tf(),
        "stem=stem_conv1, block1=cell stem_1, block2-4=cells grouped by reduction, head=final relu",
        (
            Variant("nasnet_mobile", "NASNetMobile", 224, 4.27, _nasnet_table(4, (10, 68, 127, 186))),
            Variant("nasnet_large", "NASNetLarge", 331, 84.92, _nasnet_table(6, (10, 92, 175, 258))),
        ),
        static_input=True,
        default_freeze_up_to="block3",  # the last reduction's cells train: 75% (mobile), 76% (large)
    ),
    Family(
        "convnext",
        Preprocessing.identity(),
        "stem=normalization+patchify, block1-4=stages 0-3, head=layer_normalization",
        (
            Variant("convnext_tiny", "ConvNeXtTiny", 224, 27.82),
            Variant("convnext_small", "ConvNeXtSmall", 224, 49.45),
            Variant("convnext_base", "ConvNeXtBase", 224, 87.57),
            Variant("convnext_large", "ConvNeXtLarge", 224, 196.23),
            Variant("convnext_xlarge", "ConvNeXtXLarge", 224, 348.15),
        ),
        _CONVNEXT,
        keras_kwargs={"include_preprocessing": True},
        default_freeze_up_to="block3",  # stage 3 trains: 56% (tiny), 31% (small to xlarge)
    ),
)


# --- building ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _fresh_layer_names():
    """Run a Keras constructor with its auto-name counters at zero, so unnamed layers get stable names.

    Afterwards each counter is the larger of its old and new value: layers made later never reuse a name
    this model took. (Layers made *before* may share names with it; nest the models rather than
    flattening two such graphs into one functional model.)
    """
    from keras.src.backend.common import global_state

    key = "object_name_uids"  # keras.src.utils.naming keeps its counters here (per thread)
    outer = global_state.get_global_attribute(key) or collections.defaultdict(int)
    inner = collections.defaultdict(int)
    global_state.set_global_attribute(key, inner)
    try:
        yield
    finally:
        merged = collections.defaultdict(int, outer)
        for prefix, count in inner.items():
            merged[prefix] = max(merged[prefix], count)
        global_state.set_global_attribute(key, merged)


def _checked_weights(backbone: str, weights):
    if weights is None or weights == "imagenet":
        return weights
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if os.path.isfile(path):
            return path
        if os.path.isdir(path):
            raise UsageError(
                f"weights={path!r} for backbone {backbone!r} is a directory; Keras Applications read one weights "
                "file (a Keras Applications .h5, or one written by model.save_weights('x.weights.h5')). To copy "
                "weights by name from a TF checkpoint or SavedModel directory use `tfl finetune --weights none "
                "--init-from DIR`"
            )
        raise UsageError(
            f"weights={path!r} for backbone {backbone!r}: no such file. Pass None (random init), "
            "'imagenet' (Keras' download), or the path of an existing weights file "
            "(a Keras Applications .h5, or one written by model.save_weights('x.weights.h5'))."
        )
    raise UsageError(
        f"weights={weights!r} for backbone {backbone!r}: expected None, 'imagenet' or a file path, "
        f"got a {type(weights).__name__}"
    )


def _build(variant: Variant, family: Family, input_shape=None, weights=None, include_top=False):
    """Build the Keras model: include_top=False gives the last feature map (no pooling) at `input_shape`
    (default: the variant's size); include_top=True gives the 1000-class softmax classifier at that size."""
    import keras

    default_shape = (variant.input_size, variant.input_size, 3)
    shape = default_shape if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise UsageError(
            f"input_shape={input_shape!r} for backbone {variant.name!r}: expected (height, width, channels), "
            f"e.g. {default_shape}"
        )
    if family.static_input and None in shape:
        raise UsageError(
            f"input_shape={input_shape!r} for backbone {variant.name!r}: Keras builds {variant.constructor} "
            f"differently without a fixed height and width; pass numbers, e.g. {default_shape}"
        )
    if include_top and shape != default_shape:
        raise UsageError(
            f"input_shape={input_shape!r} with include_top=True for backbone {variant.name!r}: the ImageNet "
            f"classifier is built at {default_shape}; omit input_shape, or use include_top=False"
        )
    weights = _checked_weights(variant.name, weights)
    kwargs = dict(family.keras_kwargs, include_top=include_top, weights=weights, input_shape=shape)
    if include_top:
        kwargs.update(classes=1000, classifier_activation="softmax")
    else:
        kwargs.update(pooling=None)
    constructor = getattr(keras.applications, variant.constructor)
    downloads = weights_download_errors(variant.name) if weights == "imagenet" else contextlib.nullcontext()
    with downloads, _fresh_layer_names(), _weights_file_errors(variant.name, weights):
        return constructor(**kwargs)


@contextlib.contextmanager
def _weights_file_errors(backbone: str, weights):
    """What Keras raises when it cannot load a weights file the user named (another architecture's, names that
    are not UTF-8, not Keras' at all) as a UsageError naming the file, instead of a Keras traceback (and without
    the dozens of per-layer warnings Keras prints on its way to that failure)."""
    if weights is None or weights == "imagenet":
        yield
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    except Exception as err:  # noqa: BLE001 - Keras raises ValueError, KeyError, UnicodeDecodeError, OSError, ...
        if isinstance(err, UsageError):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsageError(
            f"weights={weights!r} for backbone {backbone!r}: Keras cannot load this file into it "
            f"({type(err).__name__}{': ' + first if first else ''}). Pass a Keras Applications .h5 for "
            f"{backbone}, or copy weights by name from any file `tfl inspect-checkpoint` reads with "
            "`tfl finetune --weights none --init-from FILE`"
        ) from None
    for w in caught:  # loaded after all: what Keras had to say stands
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _spec(family: Family, variant: Variant) -> BackboneSpec:
    table = variant.stages or family.stages
    return BackboneSpec(
        name=variant.name,
        family=family.family,
        build=functools.partial(_build, variant, family),
        input_size=variant.input_size,
        preprocessing=family.preprocessing,
        stages=table.stages(),
        default_freeze_up_to=variant.default_freeze_up_to or family.default_freeze_up_to,
        weight_sources={"imagenet": "Keras Applications ImageNet-1k weights (Keras downloads to ~/.keras/models/)"},
        default_weights="imagenet",
        top_activation="softmax",
        # The ImageNet classifier layers (names differ across families); a class-count mismatch there is expected.
        classifier=("predictions", "conv_preds", "Logits"),
        description=(
            f"Keras {variant.constructor}: {variant.params_m:.1f}M params without top, "
            f"{variant.input_size}x{variant.input_size} input; {family.stage_summary}"
        ),
    )


SPECS: tuple[BackboneSpec, ...] = tuple(register(_spec(f, v)) for f in FAMILIES for v in f.variants)
