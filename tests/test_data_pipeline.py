"""make_pipeline: shapes, dtypes, seeded shuffling, resizing and seeded augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from tfl.data import DataError, make_pipeline
from tfl.data.augment import _output_to_input, augment_batch

N = 23


def fixed_size(n=N, size=8) -> tf.data.Dataset:
    """Static-shape elements; every pixel of image i is i, label i."""
    images = np.repeat(np.arange(n, dtype=np.uint8), size * size * 3).reshape(n, size, size, 3)
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype=np.int64)))


def mixed_size(n=N) -> tf.data.Dataset:
    """Dynamic-shape elements, as image folders give."""

    def gen():
        for i in range(n):
            yield np.full((5 + i % 4, 7 + i % 3, 3), i, np.uint8), np.int64(i)

    signature = (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int64))
    return tf.data.Dataset.from_generator(gen, output_signature=signature)


def epochs(ds, count=2) -> list[list[int]]:
    return [[int(v) for batch in ds for v in batch["label"].numpy()] for _ in range(count)]


@pytest.mark.parametrize("source", [fixed_size, mixed_size])
def test_shapes_dtypes_and_range(source):
    batches = list(make_pipeline(source(), image_size=12, batch_size=5, training=False, seed=0))
    assert [b["image"].shape.as_list() for b in batches] == [[5, 12, 12, 3]] * 4 + [[3, 12, 12, 3]]
    for images, labels in ((b["image"], b["label"]) for b in batches):
        assert images.dtype == tf.float32 and labels.dtype == tf.int32
    # Constant images stay constant through resizing: image i is all i.
    images = np.concatenate([b["image"].numpy() for b in batches])
    expected = np.arange(N, dtype=np.float32)[:, None, None, None] * np.ones((1, 12, 12, 3))
    np.testing.assert_allclose(images, expected, atol=1e-3)
    assert [int(v) for b in batches for v in b["label"]] == list(range(N))


def test_drop_remainder():
    batches = list(make_pipeline(fixed_size(), 8, 5, training=True, seed=0, drop_remainder=True))
    assert len(batches) == 4 and all(b["image"].shape[0] == 5 for b in batches)


@pytest.mark.parametrize("source", [fixed_size, mixed_size])
def test_shuffle_is_seeded_and_reshuffles_each_epoch(source):
    a = epochs(make_pipeline(source(), 8, 4, training=True, seed=7))
    b = epochs(make_pipeline(source(), 8, 4, training=True, seed=7))
    c = epochs(make_pipeline(source(), 8, 4, training=True, seed=8))
    assert a == b  # same seed: same order in every epoch, across separately built pipelines
    assert a[0] != a[1]  # a new order each epoch
    assert c[0] != a[0]
    assert all(sorted(order) == list(range(N)) for order in a + c)


def test_augment_is_seeded_changes_pixels_and_keeps_shape_and_range():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 20, 20, 3), dtype=np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(16, dtype=np.int64)))
    plain = np.concatenate([b["image"].numpy() for b in make_pipeline(ds, 20, 8, training=False, seed=0)])
    first = [b["image"].numpy() for b in make_pipeline(ds, 20, 8, training=False, seed=0, augment=True)]
    again = [b["image"].numpy() for b in make_pipeline(ds, 20, 8, training=False, seed=0, augment=True)]
    other = [b["image"].numpy() for b in make_pipeline(ds, 20, 8, training=False, seed=1, augment=True)]
    augmented = np.concatenate(first)
    assert augmented.shape == plain.shape == (16, 20, 20, 3)
    assert augmented.min() >= 0.0 and augmented.max() <= 255.0
    assert np.abs(augmented - plain).mean() > 5.0
    np.testing.assert_array_equal(augmented, np.concatenate(again))
    assert not np.array_equal(augmented, np.concatenate(other))


def test_augment_differs_between_epochs_but_is_repeatable():
    ramp = tf.data.Dataset.from_tensor_slices(
        (np.tile(np.arange(16, dtype=np.uint8)[None, None, :, None] * 15, (8, 16, 1, 3)), np.zeros(8, np.int64))
    )
    ds = make_pipeline(ramp, 16, 8, training=False, seed=3, augment=True)
    epoch1, epoch2 = [next(iter(ds))["image"].numpy() for _ in range(2)]
    assert not np.array_equal(epoch1, epoch2)
    ds_again = make_pipeline(ramp, 16, 8, training=False, seed=3, augment=True)
    np.testing.assert_array_equal(next(iter(ds_again))["image"].numpy(), epoch1)


def _transform(images, flip=False, dx=0, dy=0, degrees=0.0):
    batch = images.shape[0]
    transforms = _output_to_input(
        tf.fill([batch], flip),
        tf.fill([batch], float(dx)),
        tf.fill([batch], float(dy)),
        tf.fill([batch], math.radians(degrees)),
        images.shape[1],
        images.shape[2],
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=images.shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT",
    ).numpy()  # fmt: skip


def test_transform_geometry_matches_exact_reference_ops():
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 9, 9, 3)), tf.float32)
    np.testing.assert_allclose(_transform(images, flip=True), tf.image.flip_left_right(images).numpy(), atol=1e-4)
    shifted = _transform(images, dx=2, dy=-1)
    # output (x, y) samples input (x + 2, y - 1); compare where no border reflection is involved
    np.testing.assert_allclose(shifted[:, 1:, :-2], images.numpy()[:, :-1, 2:], atol=1e-4)
    rotated = _transform(images, degrees=90.0)
    assert any(
        np.allclose(rotated, tf.image.rot90(images, k).numpy(), atol=1e-3) for k in (1, 3)
    ), "a 90 degree rotation about the centre must equal rot90"


def test_augment_batch_keeps_constant_images_constant():
    # Reflection fill means no black borders: a constant image stays exactly constant.
    images = tf.fill([4, 10, 10, 3], 77.0)
    out = augment_batch(images, tf.constant([1, 2], tf.int64)).numpy()
    np.testing.assert_allclose(out, 77.0, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 8.5}, "image_size"),
        ({"batch_size": -1}, "batch_size"),
    ],
)
def test_bad_arguments_are_data_errors(kwargs, expected):
    args = {"image_size": 8, "batch_size": 4, "training": True, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=expected):
        make_pipeline(fixed_size(), **args)


def test_wrong_element_structure_is_rejected():
    with pytest.raises(DataError, match=r"\(image \[H, W, 3\], label\)"):
        make_pipeline(tf.data.Dataset.range(3), 8, 2, training=False, seed=0)
