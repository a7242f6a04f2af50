"""Image files -> tf.data of decoded (image uint8 [H, W, 3], label int64) pairs, decoded in parallel."""

from __future__ import annotations

import dataclasses
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
    files = ImageFiles(np.array([os.fsencode(p) for p in paths], dtype=object),
                       np.asarray(labels, np.int64).reshape(-1), np.asarray(needs_pillow, dtype=bool).reshape(-1))
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(files.paths), tf.string), tf.constant(files.labels), files.needs_pillow)
    )
    # With no Pillow file, keep numpy_function out of the graph entirely: no GIL in the hot path.
    decode = _decode_with_fallback if files.needs_pillow.any() else _decode_native_pair
    return with_files(ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), files)


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The files behind a decode_files dataset, row for row: what a streamed split (tfl.data.pipeline.
    StreamedImages) reads again each epoch instead of keeping the decoded pixels."""

    paths: np.ndarray  # object array of bytes (os.fsencode)
    labels: np.ndarray  # int64
    needs_pillow: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows) -> "ImageFiles":
        rows = np.asarray(rows, np.int64)
        return ImageFiles(self.paths[rows], self.labels[rows], self.needs_pillow[rows])


_FILES = "_tfl_image_files"  # the attribute a dataset made from files carries


def with_files(ds: tf.data.Dataset, files: ImageFiles) -> tf.data.Dataset:
    """Mark `ds` as decoding exactly `files`, in order (tfl.data.subset keeps the mark on a subset)."""
    setattr(ds, _FILES, files)
    return ds


def image_files(ds) -> ImageFiles | None:
    """The files `ds` decodes, row for row, when it is an image folder split (or a subset of one); else None (IDX
    arrays, tfds)."""
    return getattr(ds, _FILES, None)


def decode_path(path: tf.Tensor, needs_pillow: tf.Tensor | None = None) -> tf.Tensor:
    """One file -> uint8 [H, W, 3], exactly as decode_files decodes it (needs_pillow: a bool tensor, or None when
    no file needs Pillow)."""
    if needs_pillow is None:
        return _decode_native(path)
    return tf.cond(needs_pillow, lambda: _decode_pillow(path), lambda: _decode_native(path))


def _decode_native(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.ensure_shape(image, [None, None, 3])


def _decode_pillow(path: tf.Tensor) -> tf.Tensor:
    image = tf.numpy_function(pillow_rgb, [path], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [None, None, 3])


def _decode_native_pair(path, label, needs_pillow):
    return _decode_native(path), label


def _decode_with_fallback(path, label, needs_pillow):
    return decode_path(path, needs_pillow), label


def read_image(path: str) -> np.ndarray:
    """One file -> uint8 [H, W, 3] RGB, decoded by the same rules as training (for predict)."""
    try:
        info = inspect_image(path)
    except BadImage as error:
        raise DataError(f"{shown(path)}: not a readable image ({error})") from None
    if info.needs_pillow:
        return pillow_rgb(path)
    return _decode_native(tf.constant(os.fsencode(path))).numpy()
