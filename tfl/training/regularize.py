"""Regularised fine-tuning (--regularize): penalties that keep fine-tuning from destroying what pretraining learned.

l2sp:ALPHA[,BETA]  Li et al. 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks":
    ALPHA/2 ||w - w0||^2 over the backbone's weights, w0 their values when the run starts (after --weights or
    --init-from loaded them, before any checkpoint of a resumed run: a resumed run pulls towards the same w0), plus
    BETA/2 ||w||^2 over the new head's weights. Attached to the variables as Keras regularizers: the trainer adds
    the train graph's `losses`, which Keras makes of the weights that train, to the training loss only.
bss:ETA[,K]  Chen et al. 2019, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe
    Transfer Learning" (as TLlib's BatchSpectralShrinkage): ETA x the sum of the K smallest squared singular values
    of the batch's feature matrix, the pooled backbone features the head reads (the input of the classifier's
    dropout). A per-batch number, added to every example's training loss, so the batch mean carries it once.

Both change only the training loss: validation and test losses stay the plain cross-entropy, and the history's
train loss is the loss hook's (without the L2-SP term, which Keras adds beside it).
"""

from __future__ import annotations

import threading

import keras
import tensorflow as tf

from tfl.options import parse_regularize


def bss_penalty(features, k: int = 1):
    """The sum of the k smallest squared singular values of features [B, D] (float32)."""
    singular = tf.linalg.svd(tf.cast(features, tf.float32), compute_uv=False)  # descending
    return tf.reduce_sum(tf.square(singular[..., -k:]))


class L2SP(keras.regularizers.Regularizer):
    """weight/2 ||w - origin||^2, or weight/2 ||w||^2 without an origin."""

    def __init__(self, weight: float, origin=None):
        self.weight, self.origin = float(weight), origin

    def __call__(self, x):
        x = tf.cast(x, tf.float32)
        delta = x - self.origin if self.origin is not None else x
        return 0.5 * self.weight * tf.reduce_sum(tf.square(delta))

    def get_config(self) -> dict:
        return {"weight": self.weight}


def l2sp_penalty(values, origins, alpha: float, head_values=(), beta: float = 0.0) -> float:
    """The L2-SP term of plain arrays (what the attached regularizers add up to, for checks and reports)."""
    import numpy as np

    backbone = sum(float(np.sum((np.asarray(v, np.float64) - o) ** 2)) for v, o in zip(values, origins))
    head = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in head_values)
    return 0.5 * alpha * backbone + 0.5 * beta * head


def attach_l2sp(model: keras.Model, alpha: float, beta: float, strategy) -> dict:
    """Put L2-SP regularizers on the model's trainable variables (backbone: towards their current values; the new
    head: towards 0). Returns {"backbone": n variables, "head": n variables}."""
    from tfl.freezing import head_layers

    head = {id(v) for layer in head_layers(model) for v in layer.weights}
    counts = {"backbone": 0, "head": 0}
    with strategy.scope():
        for v in model.weights:
            if not v.trainable or not tf.as_dtype(v.dtype).is_floating:
                continue
            in_head = id(v) in head
            weight = beta if in_head else alpha
            if weight == 0:
                continue
            origin = None if in_head else tf.Variable(tf.cast(v.value, tf.float32), trainable=False,
                                                     name=f"l2sp_origin_{counts['backbone']}")
            if v.regularizer is not None and not isinstance(v.regularizer, L2SP):
                raise ValueError(f"{v.path} already has a regularizer; --regularize l2sp cannot add its own")
            v.regularizer = L2SP(weight, origin)
            counts["head" if in_head else "backbone"] += 1
    return counts


class FeatureTap:
    """Records what one layer receives in a training call (per thread: MirroredStrategy traces each replica in a
    thread of its own), for a loss hook to take in the same traced step. Inference calls are not recorded."""

    def __init__(self, layer: keras.layers.Layer):
        self._local = threading.local()
        original = layer.call

        def call(inputs, training=False, **kwargs):
            if training:
                self._local.value = (tf.compat.v1.get_default_graph(), inputs)
            return original(inputs, training=training, **kwargs)

        # Not a tracked attribute: the layer's config and saved file stay as they were.
        object.__setattr__(layer, "call", call)

    def take(self):
        """The features the layer received in this graph's training call, once; None otherwise."""
        graph, value = getattr(self._local, "value", (None, None))
        self._local.value = (None, None)
        return value if graph is tf.compat.v1.get_default_graph() else None


class BatchSpectralShrinkage:
    """A loss hook: `loss`'s per-example values plus eta x bss_penalty(features of the batch, k) in training steps."""

    def __init__(self, loss, tap: FeatureTap, eta: float, k: int = 1):
        self.loss, self.tap, self.eta, self.k = loss, tap, float(eta), int(k)

    def __call__(self, batch: dict, outputs):
        per_example = self.loss(batch, outputs)
        features = self.tap.take()
        if features is None:
            return per_example
        return per_example + tf.cast(self.eta * bss_penalty(features, self.k), per_example.dtype)


def for_job(spec: str | None, model: keras.Model, loss, strategy, log=print):
    """--regularize SPEC on a job's model: attach L2-SP, or wrap `loss` (a loss hook) in BSS. Returns the loss hook
    to train with."""
    if not spec:
        return loss
    kind, values = parse_regularize(spec)
    if kind == "l2sp":
        alpha, beta = values
        counts = attach_l2sp(model, alpha, beta, strategy)
        log(f"--regularize {spec}: L2-SP, alpha {alpha:g} towards the starting values of {counts['backbone']} "
            f"backbone variables, beta {beta:g} on {counts['head']} head variables (added while they train)")
        return loss
    from tfl.models import DROPOUT

    eta, k = values
    tap = FeatureTap(model.get_layer(DROPOUT))
    log(f"--regularize {spec}: batch spectral shrinkage, eta {eta:g} x the {k} smallest squared singular "
        "value(s) of each training batch's pooled features")
    return BatchSpectralShrinkage(loss, tap, eta, k)
