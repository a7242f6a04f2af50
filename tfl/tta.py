"""Test-time augmentation (TTA): a run's logits as the mean of its model's logits over a few fixed views of each image.

Views of an image batch float32 [N, S, S, 3] (0..255, as every model takes), in this order:
  flip        the image itself, its horizontal (left-right) mirror                                    2 views
  flip+crops  the two above, then five crops of side c = round(0.875 S): top-left, top-right,         7 views
              bottom-left, bottom-right, center (offset floor((S - c) / 2)), each resized back to S x S
              bilinearly (half-pixel centres): what the input pipeline's resize (tfl.data.pipeline.
              to_model_input, antialiased) computes when it enlarges, as one op TFLite has (the antialiased
              resize is ScaleAndTranslate, which TFLite's builtins lack)
  none        the image alone: the model's own logits, the graph unchanged

`tta_logits` is the one function everything that scores a run calls (calibrate, evaluate, predict, report and the
serving graphs of every export), so what was measured on val is what is served. The views go through the model as
one batch of V x N images. Whether a run uses TTA at all is decided on its val split by `tfl calibrate --tta`
(tfl.calibration.tta_decision) and recorded in calibration.json (RunDir.tta()).
"""

from __future__ import annotations

import tensorflow as tf

from tfl.errors import UsageError
from tfl.options import TTA_MODES, TTA_NONE

CROP_FRACTION = 0.875  # a crop's side over the image's: the standard ImageNet evaluation crop
VIEW_NAMES = {
    "none": ("identity",),
    "flip": ("identity", "flip"),
    "flip+crops": ("identity", "flip", "crop_top_left", "crop_top_right", "crop_bottom_left", "crop_bottom_right",
                   "crop_center"),
}


def check_mode(mode: str | None) -> str:
    """The mode, or `none` for None; anything else is a UsageError naming the choices."""
    mode = TTA_NONE if mode is None else mode
    if mode not in TTA_MODES:
        raise UsageError(f"--tta {mode!r} is not one of {', '.join(TTA_MODES)}")
    return mode


def crop_box(size: int) -> tuple[int, list[tuple[int, int]]]:
    """(crop side c, the (top, left) offsets of the five crops in VIEW_NAMES' order) for images of side `size`."""
    c = max(1, round(size * CROP_FRACTION))
    far, mid = size - c, (size - c) // 2
    return c, [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]


def views(images, mode: str) -> list:
    """The views of a batch [N, S, S, 3] (float32), in VIEW_NAMES[mode]'s order, each [N, S, S, 3]."""
    mode = check_mode(mode)
    images = tf.convert_to_tensor(images, tf.float32)
    out = [images]
    if mode == TTA_NONE:
        return out
    out.append(tf.reverse(images, axis=[2]))  # axis 2 of [N, H, W, C]: left-right
    if mode == "flip+crops":
        size = int(images.shape[1])
        if images.shape[2] != size:
            raise UsageError(f"TTA crops need square images, got {images.shape[1]}x{images.shape[2]}")
        c, offsets = crop_box(size)
        # Enlarging, an antialiased bilinear resize is a plain one (tests/test_tta.py compares them).
        out += [tf.image.resize(images[:, top:top + c, left:left + c, :], [size, size], method="bilinear")
                for top, left in offsets]
    return out


def view_logits(model, images, mode: str):
    """float32 [V, N, C]: the model's logits for each view (V = len(VIEW_NAMES[mode])), one forward pass."""
    batch = views(images, mode)
    n = tf.shape(batch[0])[0]
    logits = tf.cast(model(tf.concat(batch, axis=0) if len(batch) > 1 else batch[0], training=False), tf.float32)
    return tf.reshape(logits, tf.concat([[len(batch), n], tf.shape(logits)[1:]], axis=0))


def tta_logits(model, images, mode: str | None):
    """float32 [N, C]: the mean over the views of the model's logits; for `none` (or None) the model's own."""
    mode = check_mode(mode)
    if mode == TTA_NONE:
        return tf.cast(model(images, training=False), tf.float32)
    return tf.reduce_mean(view_logits(model, images, mode), axis=0)


class WithTTA:
    """A model-like callable: WithTTA(model, mode)(images, training=False) -> tta_logits(model, images, mode), for
    code that calls a model (the trainer's evaluation step)."""

    def __init__(self, model, mode: str | None):
        self.model, self.mode = model, check_mode(mode)

    def __call__(self, images, training: bool = False):
        if training:
            raise ValueError("TTA is for inference only")
        return tta_logits(self.model, images, self.mode)
