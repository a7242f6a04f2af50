"""Regularised fine-tuning (tfl.training.regularize): L2-SP and Batch Spectral Shrinkage against numpy references,
on the tfl classifier they are attached to."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfl import models
from tfl.data.pipeline import LABEL
from tfl.freezing import head_layers
from tfl.options import parse_regularize
from tfl.training import regularize
from tfl.training.trainer import CrossEntropy


def _classifier():
    keras.utils.set_random_seed(0)
    return models.build_classifier("compact_cnn", 3, 32, weights=None)


def test_parse_regularize_fills_in_the_defaults():
    assert parse_regularize("l2sp:0.01") == ("l2sp", (0.01, 0.0))
    assert parse_regularize("l2sp:0.01,0.1") == ("l2sp", (0.01, 0.1))
    assert parse_regularize("bss:0.001") == ("bss", (0.001, 1))
    with pytest.raises(ValueError, match="expected l2sp:ALPHA"):
        parse_regularize("l2sp:1,2,3")


def test_l2sp_pulls_the_backbone_to_its_start_and_the_head_to_zero_as_numpy_says():
    model = _classifier()
    strategy = tf.distribute.get_strategy()
    counts = regularize.attach_l2sp(model, 0.3, 0.05, strategy)
    head = {id(v) for layer in head_layers(model) for v in layer.weights}
    trainable = [v for v in model.weights if v.trainable]
    assert counts == {"backbone": sum(id(v) not in head for v in trainable), "head": sum(id(v) in head for v in trainable)}
    origins = [np.array(v.numpy(), np.float64) for v in trainable]
    rng = np.random.RandomState(1)
    for v in trainable:
        v.assign(v.numpy() + rng.normal(0, 0.1, v.shape).astype("float32"))
    values = [v.numpy() for v in trainable]
    expected = regularize.l2sp_penalty([x for v, x in zip(trainable, values) if id(v) not in head],
                                       [o for v, o in zip(trainable, origins) if id(v) not in head], 0.3,
                                       [x for v, x in zip(trainable, values) if id(v) in head], 0.05)
    by_hand = sum(0.5 * (0.05 if id(v) in head else 0.3)
                  * np.sum((x.astype(np.float64) - (0 if id(v) in head else o)) ** 2)
                  for v, x, o in zip(trainable, values, origins))
    assert expected == pytest.approx(by_hand)
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-5)
    models.backbone_of(model).trainable = False  # a frozen backbone adds nothing: only the head's term is left
    head_only = sum(0.5 * 0.05 * np.sum(x.astype(np.float64) ** 2) for v, x in zip(trainable, values) if id(v) in head)
    assert float(tf.add_n(model.losses)) == pytest.approx(head_only, rel=1e-5)


def test_bss_adds_eta_times_the_smallest_squared_singular_values_of_the_pooled_features_in_training_only():
    model = _classifier()
    base = CrossEntropy(3)
    hook = regularize.for_job("bss:0.5,2", model, base, tf.distribute.get_strategy(), log=lambda *_: None)
    images = np.random.RandomState(2).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    batch = {LABEL: tf.constant([0, 1, 2, 0, 1, 2, 0, 1])}
    kernel = models.backbone_of(model).trainable_weights[0]  # the first convolution's

    @tf.function
    def step(training):
        with tf.GradientTape() as tape:
            outputs = model(images, training=training)
            loss, plain = hook(batch, outputs), base(batch, outputs)
            added = tf.reduce_sum(loss - plain)
        return loss, plain, tape.gradient(added, kernel)

    # the pooled features of a training call (BatchNorm on batch statistics), as the step computes them
    pooled = keras.Model(model.input, model.get_layer(models.POOL).output)(images, training=True).numpy()
    pooled = pooled.astype(np.float64)
    singular = np.linalg.svd(pooled, compute_uv=False)
    penalty = 0.5 * np.sum(np.sort(singular)[:2] ** 2)
    loss, plain, grad = step(True)
    np.testing.assert_allclose(loss.numpy() - plain.numpy(), penalty, rtol=1e-3, atol=1e-6)
    assert np.any(grad.numpy())  # the penalty trains the backbone
    loss, plain, _ = step(False)  # validation and test: the plain loss
    np.testing.assert_array_equal(loss.numpy(), plain.numpy())
    assert float(regularize.bss_penalty(tf.constant(pooled, tf.float32), 2)) == pytest.approx(penalty / 0.5, rel=1e-3)
