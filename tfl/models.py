"""Classifier = in-model preprocessing + backbone (features) + a new head. Models take raw 0-255 RGB pixels.

The parts are named once, here: INPUT (`image`), PREPROCESS, the backbone (a nested model under its registry
name, `backbone_of`), then the head: POOL, DROPOUT, `head_hidden1..`, LOGITS (`head_layers`). Everything else
(freezing, boundary caching, bench, export) finds the parts through these names and helpers, and cuts a model
between two tensors with `submodel`. The model outputs logits; softmax is applied by whoever needs
probabilities (predict, export).
"""

from __future__ import annotations

import keras
from keras import layers, ops

from tfl.backbones import registry
from tfl.backbones.spec import Preprocessing
from tfl.dtype_policy import policy_name
from tfl.errors import UsageError

INPUT = "image"
PREPROCESS = "preprocess"
HEAD_PREFIX = "head_"
POOL = HEAD_PREFIX + "pool"  # global average pooling right after the backbone: no weights, no randomness
DROPOUT = HEAD_PREFIX + "dropout"
LOGITS = "logits"


@keras.saving.register_keras_serializable(package="tfl")
class ImagePreprocessing(layers.Layer):
    """out = (x[..., order] - mean) / std, so exported models take raw pixels (0-255, RGB)."""

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bgr=False, **kwargs):
        super().__init__(**kwargs)
        self.mean, self.std, self.bgr = tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(bgr)

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.bgr:
            x = ops.flip(x, axis=-1)
        if self.mean != (0.0, 0.0, 0.0):
            x = x - ops.convert_to_tensor(self.mean, dtype="float32")
        if self.std != (1.0, 1.0, 1.0):
            x = x / ops.convert_to_tensor(self.std, dtype="float32")
        return x

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "bgr": self.bgr}

    @classmethod
    def from_preprocessing(cls, spec: Preprocessing, name=PREPROCESS):
        return cls(mean=spec.mean, std=spec.std, bgr=spec.bgr, name=name)


MAX_IMAGE_SIZE = 2048  # beyond this one image's activations alone take gigabytes: a typo, not a setting


def check_image_size(spec, size: int | None) -> None:
    """Refuse an input side the backbone cannot use (below its min_input_size) or that cannot fit in memory."""
    if size is None:
        return
    if size < spec.min_input_size:
        raise UsageError(f"--image-size {size} is too small for {spec.name}: its deepest stage downsamples "
                         f"{spec.min_input_size}x, so use at least {spec.min_input_size} (its native size is "
                         f"{spec.input_size})")
    if size > MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size {size} is too large: tfl accepts at most {MAX_IMAGE_SIZE} px (one "
                         f"{size}x{size} image's activations alone would take gigabytes); {spec.name}'s native size is "
                         f"{spec.input_size}")


def build_classifier(
    backbone: str,
    num_classes: int,
    image_size: int | None = None,
    weights: str | None = "default",
    head_hidden: tuple[int, ...] = (),
    dropout: float = 0.2,
    precision: str = "float32",
) -> keras.Model:
    """precision (tfl.precision chooses it; tfl.dtype_policy maps it): "float32", or "bfloat16" / "float16": every
    layer computes in that with float32 variables, except the logits (float32, so softmax and the loss see
    float32)."""
    policy = policy_name(precision)
    previous = keras.config.dtype_policy()
    if precision != "float32":
        keras.config.set_dtype_policy(policy)
    try:
        return _classifier(backbone, num_classes, image_size, weights, head_hidden, dropout)
    finally:
        keras.config.set_dtype_policy(previous)


def _classifier(backbone, num_classes, image_size, weights, head_hidden, dropout) -> keras.Model:
    spec = registry.get(backbone)
    size = image_size or spec.input_size
    check_image_size(spec, size)
    features = spec.build(input_shape=(size, size, 3), weights=spec.resolve_weights(weights), include_top=False)
    inputs = keras.Input(shape=(size, size, 3), name=INPUT)
    x = ImagePreprocessing.from_preprocessing(spec.preprocessing)(inputs)
    x = features(x)
    x = layers.GlobalAveragePooling2D(name=POOL)(x)
    x = layers.Dropout(dropout, name=DROPOUT)(x)
    for i, units in enumerate(head_hidden, start=1):
        x = layers.Dense(units, activation="relu", name=f"{HEAD_PREFIX}hidden{i}")(x)
    outputs = layers.Dense(num_classes, name=LOGITS, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def build_imagenet_classifier(backbone: str, weights: str | None = "default") -> keras.Model:
    """The backbone with its own 1000-class ImageNet top, preprocessing inside; outputs probabilities."""
    spec = registry.get(backbone)
    size = spec.input_size
    net = spec.build(input_shape=(size, size, 3), weights=spec.resolve_weights(weights), include_top=True)
    inputs = keras.Input(shape=(size, size, 3), name=INPUT)
    x = net(ImagePreprocessing.from_preprocessing(spec.preprocessing)(inputs))
    if spec.top_activation != "softmax":
        x = layers.Softmax(name="probabilities")(x)
    return keras.Model(inputs, x, name=f"{backbone}_imagenet")


def build_backbone_model(
    backbone: str, num_classes: int, image_size: int | None = None, with_preprocessing: bool = False
) -> keras.Model:
    """The backbone with its own classifier (global pool, then the spec's classifier layer), random weights.

    What a converted checkpoint becomes: the layer names are the backbone's own, so a file of the same family
    restores into it by name. image_size None accepts any size (fully convolutional up to the pool). Without
    preprocessing the model takes what the source network took, in NHWC; the output is what the spec's top
    gives (logits or probabilities).
    """
    spec = registry.get(backbone)
    if not spec.classifier:
        raise UsageError(f"backbone {backbone!r} declares no classifier layer (BackboneSpec.classifier), so its "
                         "own classifier cannot be rebuilt; use a backbone that has one (e.g. resnet18)")
    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    features = spec.build(input_shape=shape, weights=None, include_top=False)
    inputs = keras.Input(shape=shape, name=INPUT)
    x = ImagePreprocessing.from_preprocessing(spec.preprocessing)(inputs) if with_preprocessing else inputs
    x = layers.GlobalAveragePooling2D(name="global_pool")(features(x))
    outputs = layers.Dense(num_classes, activation=spec.top_activation, name=spec.classifier[-1])(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_converted")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model inside a classifier built by build_classifier."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise UsageError(f"{model.name} has no nested backbone model; was it built by tfl?")


def head_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX) or layer.name == LOGITS]


def preprocess_layer(model: keras.Model) -> keras.layers.Layer:
    return model.get_layer(PREPROCESS)


def pooled(model: keras.Model) -> bool:
    """Whether the head starts with tfl's global average pool (then pooled features are a cache boundary)."""
    return isinstance(model.get_layer(POOL), layers.GlobalAveragePooling2D)


class NoSingleCut(ValueError):
    """No single tensor separates the two parts (a skip connection crosses the cut)."""


def submodel(model: keras.Model, start: str | None = None, end: str | None = None,
             name: str | None = None) -> keras.Model:
    """The part of `model` from layer `start`'s output (None: the input) to layer `end`'s output (None: the
    output), sharing its layers and weights."""
    inputs = model.input if start is None else model.get_layer(start).output
    outputs = model.output if end is None else model.get_layer(end).output
    try:
        return keras.Model(inputs, outputs, name=name)
    except Exception as err:  # Keras reports a cut crossed by a skip connection as a disconnected graph
        raise NoSingleCut(f"a skip connection crosses the cut after {start} [{str(err).splitlines()[0]}]") from None
