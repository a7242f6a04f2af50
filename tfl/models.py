"""Classifier = in-model preprocessing + backbone (features) + a new head. Models take raw 0-255 RGB pixels.

Layer names are stable: `image` (input), `preprocess`, the backbone under its registry name, then
`head_pool`, `head_dropout`, `head_hidden1..`, `logits`. The model outputs logits; softmax is applied by
whoever needs probabilities (predict, export).
"""

from __future__ import annotations

import keras
from keras import layers, ops

from tfl.backbones import registry
from tfl.backbones.spec import BackboneSpec, Preprocessing

HEAD_PREFIX = "head_"
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
    def from_preprocessing(cls, spec: Preprocessing, name="preprocess"):
        return cls(mean=spec.mean, std=spec.std, bgr=spec.bgr, name=name)


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str | None:
    """CLI value -> what spec.build takes: "default" means the spec's default, "none" means random init."""
    if weights in (None, "default"):
        return spec.default_weights
    if weights == "none":
        return None
    return weights


def build_classifier(
    backbone: str,
    num_classes: int,
    image_size: int | None = None,
    weights: str | None = "default",
    head_hidden: tuple[int, ...] = (),
    dropout: float = 0.2,
    mixed_precision: bool = False,
) -> keras.Model:
    """mixed_precision: every layer computes in bfloat16 with float32 variables, except the logits (float32, so
    softmax and the loss see float32)."""
    previous = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        return _classifier(backbone, num_classes, image_size, weights, head_hidden, dropout)
    finally:
        keras.config.set_dtype_policy(previous)


def _classifier(backbone, num_classes, image_size, weights, head_hidden, dropout) -> keras.Model:
    spec = registry.get(backbone)
    size = image_size or spec.input_size
    features = spec.build(input_shape=(size, size, 3), weights=resolve_weights(spec, weights), include_top=False)
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = ImagePreprocessing.from_preprocessing(spec.preprocessing)(inputs)
    x = features(x)
    x = layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "pool")(x)
    x = layers.Dropout(dropout, name=HEAD_PREFIX + "dropout")(x)
    for i, units in enumerate(head_hidden, start=1):
        x = layers.Dense(units, activation="relu", name=f"{HEAD_PREFIX}hidden{i}")(x)
    outputs = layers.Dense(num_classes, name=LOGITS, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def build_imagenet_classifier(backbone: str, weights: str | None = "default") -> keras.Model:
    """The backbone with its own 1000-class ImageNet top, preprocessing inside; outputs probabilities."""
    spec = registry.get(backbone)
    size = spec.input_size
    net = spec.build(input_shape=(size, size, 3), weights=resolve_weights(spec, weights), include_top=True)
    inputs = keras.Input(shape=(size, size, 3), name="image")
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
        raise ValueError(f"backbone {backbone!r} declares no classifier layer (BackboneSpec.classifier), so its "
                         "own classifier cannot be rebuilt; use a backbone that has one (e.g. resnet18)")
    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    features = spec.build(input_shape=shape, weights=None, include_top=False)
    inputs = keras.Input(shape=shape, name="image")
    x = ImagePreprocessing.from_preprocessing(spec.preprocessing)(inputs) if with_preprocessing else inputs
    x = layers.GlobalAveragePooling2D(name="global_pool")(features(x))
    outputs = layers.Dense(num_classes, activation=spec.top_activation, name=spec.classifier[-1])(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_converted")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model inside a classifier built by build_classifier."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"{model.name} has no nested backbone model; was it built by tfl?")


def head_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX) or layer.name == LOGITS]
