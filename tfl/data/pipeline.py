"""make_pipeline: decoded (image, label) elements -> shuffled, resized, optionally augmented float batches."""

from __future__ import annotations

import tensorflow as tf

from tfl.data.augment import augment_batch
from tfl.data.errors import DataError

# The shuffle buffer holds whole images; cap its memory rather than its length.
SHUFFLE_BUDGET_BYTES = 512 * 2**20


def make_pipeline(
    ds: tf.data.Dataset,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int,
    augment: bool = False,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """(images float32 [B, S, S, 3] in 0..255, labels int32 [B]) from (image uint8 [H, W, 3], label) elements.

    training=True shuffles with `seed`: the same seed gives the same order every run, and each epoch
    (each iteration over the dataset) gets a new order that is itself fixed by the seed. `augment` draws
    its randomness from the seed the same way.
    """
    _check_args(ds, image_size, batch_size)
    image_spec = ds.element_spec[0]
    if image_spec.shape.is_fully_defined():
        # One size for all (MNIST, CIFAR): shuffle small native images, then resize whole batches at once.
        if training:
            ds = _shuffle(ds, image_spec.shape.num_elements() * image_spec.dtype.size, seed)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(lambda images, labels: (_resize(images, image_size), _labels(labels)), tf.data.AUTOTUNE)
    else:
        # Sizes differ, so batching needs resized images; resizing first also bounds the shuffle buffer's
        # memory by image_size instead of by the largest photo. uint8 in the buffer keeps it 4x smaller.
        ds = ds.map(lambda image, label: (_resize_uint8(image, image_size), label), tf.data.AUTOTUNE)
        if training:
            ds = _shuffle(ds, image_size * image_size * 3, seed)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(lambda images, labels: (tf.cast(images, tf.float32), _labels(labels)), tf.data.AUTOTUNE)
    if augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda batch, batch_seed: (augment_batch(batch[0], batch_seed), batch[1]), tf.data.AUTOTUNE
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def _check_args(ds, image_size, batch_size) -> None:
    if not isinstance(ds, tf.data.Dataset):
        raise DataError(f"make_pipeline needs a tf.data.Dataset (e.g. DatasetSplits.train), got {type(ds).__name__}")
    spec = ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2 and spec[0].shape.rank == 3 and spec[0].shape[-1] in (3, None)):
        raise DataError(f"make_pipeline needs (image [H, W, 3], label) elements as load_dataset returns, got {spec}")
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def _shuffle(ds, bytes_per_element: int, seed: int):
    count = int(ds.cardinality())
    cap = max(1, SHUFFLE_BUDGET_BYTES // max(1, bytes_per_element))
    buffer = min(count, cap) if count > 0 else cap
    return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)


def _resize(images: tf.Tensor, size: int) -> tf.Tensor:
    if images.shape[-3] == size and images.shape[-2] == size:
        return tf.cast(images, tf.float32)
    # antialias only changes anything when shrinking (then it avoids aliasing); growing is plain bilinear.
    return tf.image.resize(images, [size, size], method="bilinear", antialias=True)


def _resize_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
    return tf.saturate_cast(tf.round(_resize(image, size)), tf.uint8)


def _labels(labels: tf.Tensor) -> tf.Tensor:
    return tf.cast(labels, tf.int32)
