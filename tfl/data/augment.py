"""Seeded batch augmentation: the policies of --augment, --random-erasing, --mixup and --cutmix (Policy).

basic (augment_batch): flip, shift (pad-and-crop) and rotation as one resampling per image.

All three are folded into one projective transform per image, so each output pixel is interpolated once
(three sequential ops would blur three times). Shifts and flips alone land on whole pixels and stay exact.
Uncovered border pixels are reflected, as reflect-padding before a random crop would give.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from tfl.data import mixing
from tfl.data.keys import FEATURES, IMAGE

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


# -- RandAugment (Cubuk et al. 2020), per image, seeded: timm's rand-m9-n2 on 0..255 pixels ---------------------------
RANDAUGMENT_OPS = 2  # ops applied one after another to every image
RANDAUGMENT_MAGNITUDE = 9  # of 10: timm's default level
# The ops each image picks from (uniformly, with replacement). Geometric ops are one projective transform per image;
# the colour ops are elementwise. timm's equalize and sharpness are left out (a per-image histogram and a blur
# kernel per op slot cost more than the rest together on a CPU).
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
COLOUR_OPS = ("identity", "auto_contrast", "brightness", "contrast", "color", "solarize", "posterize")
RANDAUGMENT_CHOICES = GEOMETRIC_OPS + COLOUR_OPS
GRAY = 128.0  # what geometric ops move into the image from outside it (timm's fillcolor)


def randaugment_batch(images: tf.Tensor, seed: tf.Tensor, ops: int = RANDAUGMENT_OPS,
                      magnitude: float = RANDAUGMENT_MAGNITUDE) -> tf.Tensor:
    """images float32 [B, H, W, 3] in 0..255 -> each image through `ops` ops drawn for it (RANDAUGMENT_CHOICES) at
    `magnitude` (0..10), each op's direction random; `seed` int [2] fixes every draw."""
    level = magnitude / 10.0
    for slot in range(ops):
        slot_seed = tf.random.experimental.stateless_fold_in(seed, slot)
        choice_seed, sign_seed = tf.unstack(tf.random.split(slot_seed, 2))
        batch = tf.shape(images)[0]
        choice = tf.random.stateless_uniform([batch], choice_seed, maxval=len(RANDAUGMENT_CHOICES), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([batch], sign_seed) < 0.5, -1.0, 1.0)
        images = _colour_ops(_geometric_ops(images, choice, sign, level), choice, sign, level)
    return images


def _geometric_ops(images, choice, sign, level):
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    zeros, ones = tf.zeros_like(sign), tf.ones_like(sign)
    angle = sign * math.radians(30.0) * level
    shear = sign * 0.3 * level
    shift = sign * 0.45 * level  # of the side
    rows = {  # output pixel (x, y) samples input (a0x+a1y+a2, b0x+b1y+b2)
        "rotate": _output_to_input(tf.zeros_like(sign, tf.bool), zeros, zeros, angle, height, width)[:, :6],
        "shear_x": tf.stack([ones, shear, -shear * cy, zeros, ones, zeros], 1),
        "shear_y": tf.stack([ones, zeros, zeros, shear, ones, -shear * cx], 1),
        "translate_x": tf.stack([ones, zeros, shift * w, zeros, ones, zeros], 1),
        "translate_y": tf.stack([ones, zeros, zeros, zeros, ones, shift * h], 1),
    }
    transform = tf.stack([ones, zeros, zeros, zeros, ones, zeros], 1)  # identity for the colour ops
    for name, row in rows.items():
        picked = tf.equal(choice, RANDAUGMENT_CHOICES.index(name))[:, None]
        transform = tf.where(picked, row, transform)
    transform = tf.concat([transform, tf.zeros_like(transform[:, :2])], 1)
    out = tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transform, output_shape=[height, width],
                                                fill_value=GRAY, interpolation="BILINEAR", fill_mode="CONSTANT")
    geometric = choice < len(GEOMETRIC_OPS)
    # images that picked a colour op keep their pixels exactly (no resampling round trip)
    return tf.where(geometric[:, None, None, None], tf.ensure_shape(out, images.shape), images)


def _colour_ops(images, choice, sign, level):
    factor = (1.0 + sign * 0.9 * level)[:, None, None, None]  # enhance factor: 0.1..1.9 at magnitude 10
    gray = tf.image.rgb_to_grayscale(images)
    low = tf.reduce_min(images, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2], keepdims=True)
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-6), 1.0)
    threshold = 256.0 - 256.0 * level  # solarize: invert pixels at or above it
    bits = 8 - int(4 * level)  # posterize: keep this many bits
    step = float(2 ** (8 - bits))
    results = {
        "auto_contrast": tf.where(high > low, (images - low) * scale, images),
        "brightness": images * factor,
        "contrast": tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True) * (1.0 - factor) + images * factor,
        "color": gray * (1.0 - factor) + images * factor,
        "solarize": tf.where(images >= threshold, 255.0 - images, images),
        "posterize": tf.floor(images / step) * step,
    }
    for name, result in results.items():
        picked = tf.equal(choice, RANDAUGMENT_CHOICES.index(name))[:, None, None, None]
        images = tf.where(picked, result, images)
    return tf.clip_by_value(images, 0.0, 255.0)


# -- random erasing (Zhong et al. 2020), timm's "pixel" mode: one rectangle of noise per chosen image ---------------
ERASE_AREA = (0.02, 1.0 / 3.0)  # of the image
ERASE_ASPECT = (0.3, 1.0 / 0.3)  # height / width, drawn log-uniformly


def random_erasing_batch(images: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
    """With `probability`, each image gets one rectangle (ERASE_AREA of it, aspect ERASE_ASPECT) of uniform noise in
    0..255; `seed` int [2] fixes every draw."""
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    pick_seed, area_seed, aspect_seed, y_seed, x_seed, noise_seed = tf.unstack(tf.random.split(seed, 6))
    chosen = tf.random.stateless_uniform([batch], pick_seed) < probability
    area = tf.random.stateless_uniform([batch], area_seed, *ERASE_AREA) * h * w
    log_aspect = tf.random.stateless_uniform([batch], aspect_seed, math.log(ERASE_ASPECT[0]),
                                             math.log(ERASE_ASPECT[1]))
    eh = tf.minimum(tf.round(tf.sqrt(area * tf.exp(log_aspect))), h)
    ew = tf.minimum(tf.round(tf.sqrt(area / tf.exp(log_aspect))), w)
    top = tf.floor(tf.random.stateless_uniform([batch], y_seed) * (h - eh + 1.0))
    left = tf.floor(tf.random.stateless_uniform([batch], x_seed) * (w - ew + 1.0))
    rows = tf.range(h)[None, :, None]
    cols = tf.range(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None]) & chosen[:, None, None])
    noise = tf.floor(tf.random.stateless_uniform(tf.shape(images), noise_seed, 0.0, 256.0))
    return tf.where(inside[..., None], noise, images)


# -- the policy: what a training batch goes through, in timm's order (per-image ops, erasing, then mixing) ----------
@dataclasses.dataclass(frozen=True)
class Policy:
    """The augmentation of a run's training batches (tfl.options: --augment, --random-erasing, --mixup, --cutmix,
    --mixup-on). Every draw comes from the batch's seed, so a seed gives the same batches every run."""

    augment: str = "none"  # none | basic | randaugment (basic, then RANDAUGMENT_OPS ops per image)
    mixup: float = 0.0  # Beta alpha; 0: off
    cutmix: float = 0.0  # Beta alpha; 0: off (with both on, each batch takes one of the two, as timm does)
    random_erasing: float = 0.0  # probability per image
    mixup_on: str = "auto"  # auto: cached features where a stage trains on them, else pixels; features; pixels
    num_classes: int = 0  # the soft targets' width (mixing only)

    @classmethod
    def from_options(cls, opts, num_classes: int) -> "Policy":
        return cls(augment_name(opts.augment), opts.mixup, opts.cutmix, opts.random_erasing, opts.mixup_on,
                   num_classes)

    def pixel_flags(self) -> list[str]:
        """The options that change the images before any freeze boundary (so nothing below it can be cached)."""
        flags = [f"--augment {self.augment}"] if self.augment != "none" else []
        flags += [f"--random-erasing {self.random_erasing:g}"] if self.random_erasing else []
        flags += [f"--cutmix {self.cutmix:g}"] if self.cutmix else []
        flags += [f"--mixup {self.mixup:g} --mixup-on pixels"] if self.mixup and self.mixup_on == "pixels" else []
        return flags

    @property
    def changes_pixels(self) -> bool:
        return bool(self.pixel_flags())

    @property
    def mixes_features(self) -> bool:
        """MixUp on cached activations: mixup alone (cutmix is spatial and turns the cache off anyway), not pinned to
        pixels."""
        return bool(self.mixup) and not self.changes_pixels

    @property
    def active(self) -> bool:
        return self.changes_pixels or bool(self.mixup)

    def images(self, batch: dict, seed: tf.Tensor) -> dict:
        """A training batch of images through the policy; `seed` int [2] (the batch's)."""
        images = batch[IMAGE]
        if self.augment != "none":
            images = augment_batch(images, seed)  # the basic draws of a seed are those of earlier versions
        if self.augment == "randaugment":
            images = randaugment_batch(images, tf.random.experimental.stateless_fold_in(seed, 1))
        if self.random_erasing:
            images = random_erasing_batch(images, tf.random.experimental.stateless_fold_in(seed, 2),
                                          self.random_erasing)
        return self._mixed({**batch, IMAGE: images}, IMAGE, tf.random.experimental.stateless_fold_in(seed, 3))

    def features(self, batch: dict, seed: tf.Tensor) -> dict:
        """A training batch of cached activations mixed (MixUp; see mixes_features)."""
        return self._mixed(batch, FEATURES, seed) if self.mixes_features else batch

    def _mixed(self, batch: dict, key: str, seed: tf.Tensor) -> dict:
        if not (self.mixup or self.cutmix):
            return batch
        if self.mixup and self.cutmix:
            pick_seed, seed = tf.unstack(tf.random.split(seed, 2))
            return tf.cond(tf.random.stateless_uniform([], pick_seed) < 0.5,
                           lambda: mixing.mixup(batch, key, seed, self.mixup, self.num_classes),
                           lambda: mixing.cutmix(batch, key, seed, self.cutmix, self.num_classes))
        if self.cutmix:
            return mixing.cutmix(batch, key, seed, self.cutmix, self.num_classes)
        return mixing.mixup(batch, key, seed, self.mixup, self.num_classes)


def augment_name(value) -> str:
    """--augment's value; True and False (the flag's meaning before it took a policy) are basic and none."""
    if value is True:
        return "basic"
    return "none" if value is False or value is None else value


def as_policy(augment) -> Policy:
    """A Policy from a Policy, an --augment name, or a bool (True: basic)."""
    return augment if isinstance(augment, Policy) else Policy(augment_name(augment))
