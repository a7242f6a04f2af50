"""Seeded batch augmentation: flip, shift (pad-and-crop) and rotation as one resampling per image.

All three are folded into one projective transform per image, so each output pixel is interpolated once
(three sequential ops would blur three times). Shifts and flips alone land on whole pixels and stay exact.
Uncovered border pixels are reflected, as reflect-padding before a random crop would give.
"""

from __future__ import annotations

import math

import tensorflow as tf

MAX_SHIFT_FRACTION = 0.125  # of the image side, each direction (4 px on a 32 px image, as in CIFAR recipes)
MAX_ROTATION_DEGREES = 10.0


def augment_batch(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """images float32 [B, H, W, C] in 0..255 -> same shape and range; `seed` int64 [2] (stateless RNG)."""
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    flip_seed, dx_seed, dy_seed, angle_seed = tf.unstack(tf.random.split(seed, 4))
    flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
    max_dx = tf.cast(tf.round(MAX_SHIFT_FRACTION * tf.cast(width, tf.float32)), tf.int32)
    max_dy = tf.cast(tf.round(MAX_SHIFT_FRACTION * tf.cast(height, tf.float32)), tf.int32)
    dx = tf.random.stateless_uniform([batch], dx_seed, minval=-max_dx, maxval=max_dx + 1, dtype=tf.int32)
    dy = tf.random.stateless_uniform([batch], dy_seed, minval=-max_dy, maxval=max_dy + 1, dtype=tf.int32)
    max_angle = math.radians(MAX_ROTATION_DEGREES)
    angle = tf.random.stateless_uniform([batch], angle_seed, minval=-max_angle, maxval=max_angle)
    transforms = _output_to_input(flip, tf.cast(dx, tf.float32), tf.cast(dy, tf.float32), angle, height, width)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return tf.clip_by_value(tf.ensure_shape(out, images.shape), 0.0, 255.0)


def _output_to_input(flip, dx, dy, angle, height, width) -> tf.Tensor:
    """[B, 8] rows (a0 a1 a2 b0 b1 b2 0 0): output pixel (x, y) samples input (a0x+a1y+a2, b0x+b1y+b2).

    The input point is: rotate (x, y) about the centre by `angle`, move by (dx, dy), then mirror in x if `flip`.
    """
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    sign = tf.where(flip, -1.0, 1.0)
    mirror = tf.where(flip, 2.0 * cx, 0.0)
    a0, a1 = sign * cos, -sign * sin
    a2 = sign * (-cos * cx + sin * cy + cx + dx) + mirror
    b0, b1 = sin, cos
    b2 = -sin * cx - cos * cy + cy + dy
    zeros = tf.zeros_like(angle)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
