"""Image files -> tf.data of decoded (image uint8 [H, W, 3], label int64) pairs, decoded in parallel."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfl.data.errors import DataError, shown
from tfl.data.image_check import BadImage, inspect_image, pillow_rgb


def decode_files(paths: Sequence[str], labels: Sequence[int], needs_pillow: Sequence[bool]) -> tf.data.Dataset:
    """Decode with TF ops; only files flagged `needs_pillow` go through Pillow (via tf.numpy_function).

    Paths go to TensorFlow as the file system's bytes (os.fsencode): a file name that is not UTF-8 (legal on
    Linux, common on disks from other systems) is a str with stand-in characters that tf.constant cannot encode."""
    flags = np.asarray(needs_pillow, dtype=bool).reshape(-1)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant([os.fsencode(p) for p in paths], tf.string),
         tf.constant(np.asarray(labels, np.int64).reshape(-1)), flags)
    )
    # With no Pillow file, keep numpy_function out of the graph entirely: no GIL in the hot path.
    decode = _decode_with_fallback if flags.any() else _decode_native_pair
    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _decode_native(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.ensure_shape(image, [None, None, 3])


def _decode_pillow(path: tf.Tensor) -> tf.Tensor:
    image = tf.numpy_function(pillow_rgb, [path], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [None, None, 3])


def _decode_native_pair(path, label, needs_pillow):
    return _decode_native(path), label


def _decode_with_fallback(path, label, needs_pillow):
    image = tf.cond(needs_pillow, lambda: _decode_pillow(path), lambda: _decode_native(path))
    return image, label


def read_image(path: str) -> np.ndarray:
    """One file -> uint8 [H, W, 3] RGB, decoded by the same rules as training (for predict)."""
    try:
        info = inspect_image(path)
    except BadImage as error:
        raise DataError(f"{shown(path)}: not a readable image ({error})") from None
    if info.needs_pillow:
        return pillow_rgb(path)
    return _decode_native(tf.constant(os.fsencode(path))).numpy()
