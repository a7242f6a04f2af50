"""The input pipeline: decoded once, order fixed by the seed, and the same order for anything stored row by row."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfl.data import DataError
from tfl.data.decode import decode_files
from tfl.data.pipeline import ImageStore, fill_images, gather_batches, index_order, stored_shape

N = 20


def _store(size=6) -> ImageStore:
    """Row i: every pixel i, label i % 4."""
    images = np.repeat(np.arange(N, dtype=np.uint8), size * size * 3).reshape(N, size, size, 3)
    return ImageStore(images, (np.arange(N) % 4).astype(np.int32), image_size=size)


def _rows(ds) -> list[list[int]]:
    """Each batch as the row numbers it holds (a row's pixels all equal its number)."""
    return [[int(v) for v in images.numpy()[:, 0, 0, 0]] for images in (batch["image"] for batch in ds)]


def test_the_same_seed_gives_the_same_batches_in_every_build():
    store = _store()
    first = _rows(store.batches(index_order(N, 8, training=True, seed=5, drop_remainder=True)))
    again = _rows(_store().batches(index_order(N, 8, training=True, seed=5, drop_remainder=True)))
    other = _rows(store.batches(index_order(N, 8, training=True, seed=6, drop_remainder=True)))
    assert first == again and first != other
    assert [len(b) for b in first] == [8, 8] and len(set(sum(first, []))) == 16  # drop_remainder, no repeats


def test_a_pipeline_reshuffles_each_pass_and_every_pass_is_a_permutation():
    ds = _store().batches(index_order(N, 8, training=True, seed=1))
    passes = [sum(_rows(ds), []) for _ in range(3)]
    assert passes[0] != passes[1] != passes[2]
    assert all(sorted(p) == list(range(N)) for p in passes)


def test_evaluation_order_is_the_row_order():
    assert sum(_rows(_store().batches(index_order(N, 8, training=False, seed=3))), []) == list(range(N))


def test_rows_stored_elsewhere_come_in_the_order_the_images_would():
    # Features computed row by row (here: 10 x the row number) follow the images exactly, batch for batch:
    # what makes training on cached boundary activations see the batches training on images sees.
    store = _store()
    features = np.arange(N, dtype=np.float32)[:, None] * np.array([[10.0, -1.0]], np.float32)
    image_rows = _rows(store.batches(index_order(N, 6, training=True, seed=9)))
    feature_batches = [(b["features"].numpy(), b["label"].numpy()) for b in
                       gather_batches(index_order(N, 6, training=True, seed=9),
                                      {"features": features, "label": store.labels})]
    assert [[int(v) for v in f[:, 0] / 10] for f, _ in feature_batches] == image_rows
    assert [list(y) for _, y in feature_batches] == [[r % 4 for r in rows] for rows in image_rows]


def test_disk_backed_rows_are_gathered_like_rows_in_memory(tmp_path):
    store = _store()
    on_disk = np.lib.format.open_memmap(str(tmp_path / "rows.npy"), mode="w+", dtype=np.uint8, shape=store.images.shape)
    on_disk[:] = store.images
    on_disk.flush()
    mapped = ImageStore(np.load(str(tmp_path / "rows.npy"), mmap_mode="r"), store.labels, store.image_size)
    order = lambda: index_order(N, 8, training=True, seed=2)  # noqa: E731
    assert _rows(mapped.batches(order())) == _rows(store.batches(order()))


def test_small_images_are_stored_native_and_resized_a_batch_at_a_time():
    images = np.random.default_rng(0).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(N, dtype=np.int64)))
    store = ImageStore.from_dataset(ds, image_size=16)
    assert store.images.shape == (N, 8, 8, 3) and stored_shape(ds, 16) == (8, 8, 3)
    first = next(iter(store.batches(index_order(N, 4, training=False, seed=0))))
    batch, labels = first["image"], first["label"]
    assert batch.shape == (4, 16, 16, 3) and batch.dtype == tf.float32 and list(labels.numpy()) == [0, 1, 2, 3]
    expected = tf.image.resize(images[:4], [16, 16], method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(batch.numpy(), expected, atol=1e-4)


def test_image_files_of_mixed_sizes_are_decoded_in_parallel_in_file_order(tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.png"
        Image.new("RGB", (10 + i, 14 - i % 5), (i * 20, 0, 255 - i * 20)).save(path)
        paths.append(str(path))
    ds = decode_files(paths, list(range(12)), [False] * 12)
    assert stored_shape(ds, 9) == (9, 9, 3)
    images = np.empty((12, 9, 9, 3), np.uint8)
    labels = np.empty(12, np.int32)
    fill_images(ds, 9, images, labels)
    assert list(labels) == list(range(12))
    assert [int(v) for v in images[:, 4, 4, 0]] == [i * 20 for i in range(12)]  # constant images stay exact


def test_a_wrong_row_count_is_an_error_not_a_silent_gap():
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((5, 4, 4, 3), np.uint8), np.zeros(5, np.int64)))
    for rows in (4, 6):
        with pytest.raises(DataError, match="counted to have"):
            fill_images(ds, 4, np.empty((rows, 4, 4, 3), np.uint8), np.empty(rows, np.int32))
