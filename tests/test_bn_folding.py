"""BatchNorm folded into the convolution before it (tfl.training.bn_folding): the same values, fewer layers."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from tfl import models
from tfl.training.boundary import POOLED, frozen_forward
from tfl.training.bn_folding import foldable_pairs, folded_call


def _moved_statistics(model, seed=0):
    """BN statistics and affine parameters away from their init, so a wrong fold cannot pass."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.2, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.2, n))


@pytest.mark.parametrize("backbone", ["compact_cnn", "mobilenet", "efficientnet_lite0"])
def test_folded_backbones_compute_what_the_original_does(backbone):
    keras.utils.set_random_seed(0)
    model = models.build_classifier(backbone, 3, 32, "none")
    net = models.backbone_of(model)
    _moved_statistics(net)
    pairs = foldable_pairs(net)
    bns = [l for l in net.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert pairs and len(pairs) == len(bns)  # every BN of these follows a linear convolution
    x = tf.constant(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32))
    expected = net(x, training=False).numpy()
    got = folded_call(net)(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert folded_call(net).folded == len(pairs)


def test_depthwise_kernels_fold_per_channel_and_multiplier():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=True)(inputs)
    outputs = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, outputs)
    _moved_statistics(model, seed=2)
    model.layers[1].bias.assign(np.arange(6, dtype=np.float32) / 10)  # the conv's own bias folds too
    x = tf.constant(np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype(np.float32))
    np.testing.assert_allclose(folded_call(model)(x).numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_a_bn_that_cannot_fold_runs_as_it_is():
    inputs = keras.Input((8, 8, 3))
    relu_conv = keras.layers.Conv2D(4, 3, activation="relu")(inputs)  # BN after a nonlinearity: no fold
    a = keras.layers.BatchNormalization(name="after_relu")(relu_conv)
    shared = keras.layers.Conv2D(4, 1, name="shared")(a)  # read by the BN and by the add: no fold
    b = keras.layers.BatchNormalization(name="after_shared")(shared)
    dense = keras.layers.Dense(4, name="dense")(keras.layers.Add()([b, shared]))
    c = keras.layers.BatchNormalization(name="after_dense")(dense)  # after a Dense: no fold
    last = keras.layers.Conv2D(4, 1, name="last")(c)
    outputs = keras.layers.BatchNormalization(name="foldable")(last)
    model = keras.Model(inputs, outputs)
    _moved_statistics(model, seed=4)
    assert [(conv.name, bn.name) for conv, (bn, _) in foldable_pairs(model).items()] == [("last", "foldable")]
    x = tf.constant(np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype(np.float32))
    np.testing.assert_allclose(folded_call(model)(x).numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_the_cache_extraction_matches_the_models_own_inference_pass_and_keeps_the_model():
    keras.utils.set_random_seed(0)
    model = models.build_classifier("mobilenet", 3, 32, "none")
    _moved_statistics(models.backbone_of(model))
    images = np.random.default_rng(6).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    features = models.submodel(model, end=models.POOL)
    expected = features(images, training=False).numpy()
    layers_before = [l.name for l in models.backbone_of(model).layers]
    np.testing.assert_allclose(frozen_forward(model, POOLED)(images).numpy(), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
    assert [l.name for l in models.backbone_of(model).layers] == layers_before  # the model itself is untouched
    np.testing.assert_array_equal(features(images, training=False).numpy(), expected)
