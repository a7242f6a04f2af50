"""What tfl knows about a backbone, as data: code reads the spec, it never branches on a model name."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

from tfl.errors import UsageError

# Per-channel mean/std in the 0-255 pixel scale, applied inside the model (tfl.models.ImagePreprocessing).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw 0-255 RGB pixels become the backbone's input: out = (x[..., order] - mean) / std."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bgr: bool = False  # Caffe-style models (VGG, ResNet v1) want BGR channel order.

    @classmethod
    def identity(cls) -> "Preprocessing":
        """For models that normalise inside themselves (Keras EfficientNet, ConvNeXt, MobileNetV3)."""
        return cls()

    @classmethod
    def tf(cls) -> "Preprocessing":
        """Scale to [-1, 1] (Keras 'tf' mode: MobileNet, Inception, Xception, ResNet v2, NASNet)."""
        return cls(mean=(127.5,) * 3, std=(127.5,) * 3)

    @classmethod
    def caffe(cls) -> "Preprocessing":
        """BGR, ImageNet mean subtracted, no scaling (Keras 'caffe' mode: VGG, ResNet v1)."""
        return cls(mean=(103.939, 116.779, 123.68), bgr=True)

    @classmethod
    def torch(cls) -> "Preprocessing":
        """ImageNet mean/std on [0, 1] pixels (Keras 'torch' mode: DenseNet; PyTorch-trained weights)."""
        return cls(mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A canonical stage (`stem`, `block1`, ..., `head`) and the real layer names it covers (regex fullmatch)."""

    name: str
    pattern: str
    doc: str = ""  # the backbone's own name for it, e.g. "conv3_x" for ResNet50's block2

    def matches(self, layer_name: str) -> bool:
        return re.fullmatch(self.pattern, layer_name) is not None


# Canonical stage names: what --freeze-up-to takes as a stage. A value of this form that is not one of a
# backbone's stages is refused, never read as a layer-name prefix (Xception's own `block5_*` layers are not
# its canonical block5; the prefix `block5_` still selects them).
CANONICAL_STAGE = re.compile(r"stem|block\d+|head")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Everything tfl needs to build, preprocess, stage and load one backbone.

    `build(input_shape, weights, include_top)` returns a functional Keras model. With include_top=False
    its output is the last feature map (no pooling); with include_top=True, ImageNet logits or
    probabilities as `top_activation` says. `weights` is None, a name from `weight_sources`, or a path.
    """

    name: str
    family: str
    build: Callable[..., "object"]
    input_size: int
    preprocessing: Preprocessing
    stages: Sequence[Stage]
    # The stage --freeze-up-to means by default: the one leaving about a quarter to a third of the backbone's
    # parameters trainable, measured per backbone by scripts/freeze_defaults.py (where a measured run pins it,
    # the spec says why). Never the last stage with weights: stage 2 of a fine-tune must train some backbone.
    default_freeze_up_to: str
    weight_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> description
    default_weights: str | None = "imagenet"
    top_activation: str = "softmax"  # what the ImageNet top returns: "softmax" or "linear" (logits)
    description: str = ""
    # tfl.checkpoints.mappings name that turns this family's PyTorch-style state dicts into Keras names.
    checkpoint_mapping: str | None = None
    # Keras layer names of the backbone's own ImageNet classifier (include_top=True), e.g. ("fc",).
    classifier: tuple[str, ...] = ()
    # The smallest input side that still leaves the deepest stage a feature map (its total stride: 32 for the
    # ImageNet families). Smaller inputs are refused instead of training on a degenerate map.
    min_input_size: int = 32

    def __post_init__(self):
        if self.default_freeze_up_to not in self.stage_names:
            raise UsageError(f"backbone {self.name!r}: default_freeze_up_to={self.default_freeze_up_to!r} is not one "
                             f"of its stages ({', '.join(self.stage_names)})")

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def resolve_weights(self, weights: str | None) -> str | None:
        """A --weights value -> what build takes: "default" (or None) means default_weights, "none" random init."""
        if weights in (None, "default"):
            return self.default_weights
        if weights == "none":
            return None
        return weights

    def stage_of(self, layer_name: str) -> str | None:
        """The first stage whose pattern fully matches the layer name (first match wins)."""
        for stage in self.stages:
            if stage.matches(layer_name):
                return stage.name
        return None
