"""Keras layers the native backbones need and Keras lacks. Registered for deserialisation and listed in
tfl.trusted_layers, so a model.keras holding them reloads (and exports) like any other."""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="tfl")
class GlobalResponseNorm(layers.Layer):
    """ConvNeXt V2's GRN on NHWC input, as timm computes it:

        g = ||x||_2 over H, W (per image and channel);  n = g / (mean_c(g) + epsilon)
        out = x + beta + gamma * (x * n)

    gamma and beta start at zero, so a fresh layer is the identity. The statistic is taken in float32 so a sum of
    squares over a large map cannot overflow float16.
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(shape=(channels,), initializer="zeros", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        g = ops.sqrt(ops.sum(ops.square(x32), axis=(1, 2), keepdims=True))
        n = ops.cast(g / (ops.mean(g, axis=-1, keepdims=True) + self.epsilon), x.dtype)
        gamma, beta = ops.cast(self.gamma, x.dtype), ops.cast(self.beta, x.dtype)
        return x + beta + gamma * (x * n)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
