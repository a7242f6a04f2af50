"""Seeded batch mixing with soft targets: MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019), as timm does them.

Each batch is mixed with itself reversed (the batch order is already a seeded shuffle), with one mixing weight
`lam` per batch drawn from Beta(alpha, alpha). The result carries TARGET, the soft label rows
lam * onehot(label) + (1 - lam) * onehot(label reversed), which the loss hook trains on, and LABEL becomes each
row's larger share (argmax of TARGET), which the accuracy metric reads.

MixUp needs nothing spatial, so it mixes cached boundary activations (FEATURES) as well as images: a linear mix
of fixed features keeps the cache valid. CutMix pastes a box, so it mixes images only.
"""

from __future__ import annotations

import tensorflow as tf

from tfl.data.keys import LABEL, TARGET


def beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
    """One draw of Beta(alpha, alpha) (a scalar), from two stateless gamma draws."""
    g = tf.random.stateless_gamma([2], tf.random.split(seed, 1)[0], alpha=alpha)
    return g[0] / tf.maximum(g[0] + g[1], 1e-12)


def soft_targets(labels: tf.Tensor, lam: tf.Tensor, num_classes: int) -> tf.Tensor:
    """lam * onehot(labels) + (1 - lam) * onehot(labels reversed): float32 [B, num_classes]."""
    onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    return lam * onehot + (1.0 - lam) * tf.reverse(onehot, [0])


def _with_targets(batch: dict, key: str, mixed: tf.Tensor, lam: tf.Tensor, num_classes: int) -> dict:
    target = soft_targets(batch[LABEL], lam, num_classes)
    return {**batch, key: mixed, TARGET: target, LABEL: tf.argmax(target, -1, output_type=tf.int32)}


def mixup(batch: dict, key: str, seed: tf.Tensor, alpha: float, num_classes: int) -> dict:
    """batch[key] (images or features, [B, ...]) mixed with its reverse by lam ~ Beta(alpha, alpha)."""
    lam = beta(seed, alpha)
    x = batch[key]
    return _with_targets(batch, key, lam * x + (1.0 - lam) * tf.reverse(x, [0]), lam, num_classes)


def cutmix(batch: dict, key: str, seed: tf.Tensor, alpha: float, num_classes: int) -> dict:
    """A box of (1 - lam) of the image area, lam ~ Beta(alpha, alpha), pasted from the reversed batch (one box per
    batch, clipped at the borders; lam is then the share the box left uncovered)."""
    lam_seed, y_seed, x_seed = tf.unstack(tf.random.split(seed, 3))
    images = batch[key]
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    cut = tf.sqrt(1.0 - beta(lam_seed, alpha))
    cy = tf.floor(tf.random.stateless_uniform([], y_seed) * h)
    cx = tf.floor(tf.random.stateless_uniform([], x_seed) * w)
    top, bottom = tf.clip_by_value(cy - tf.round(cut * h / 2), 0, h), tf.clip_by_value(cy + tf.round(cut * h / 2), 0, h)
    left, right = tf.clip_by_value(cx - tf.round(cut * w / 2), 0, w), tf.clip_by_value(cx + tf.round(cut * w / 2), 0, w)
    rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mixed = tf.where(inside[None, :, :, None], tf.reverse(images, [0]), images)
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    return _with_targets(batch, key, mixed, lam, num_classes)
