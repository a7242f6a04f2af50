"""Decoded (image, label) elements -> batches: decoded and resized once, then gathered by shuffled indices.

Training data is materialised once into uint8 arrays (an ImageStore): images of one common size (MNIST, CIFAR)
stay at their small native size and are resized a whole batch at a time; images of mixed sizes are resized to
`image_size` while decoding, in parallel. Every epoch then only gathers rows. A split of image files may instead be
streamed (StreamedImages, the same interface): each batch of row indices is read, decoded and resized from the
files again every epoch, with the same decode and resize calls, so its batches are bit-identical to the kept ones
and memory does not grow with the number of images.

Order is a property of indices, not of images: `index_order` shuffles the numbers 0..N-1 with a seed, and
a pipeline gathers its rows by those indices. Anything else stored row by row in the same order (the cached
boundary activations of tfl.training.boundary, a recipe's teacher logits or task ids) therefore gets exactly
the batches the images would.

Batches are dicts: IMAGE (float32 [B, S, S, 3], 0..255) or FEATURES (cached activations), LABEL (int32 [B]),
TARGET (soft labels [B, classes]) when the batch was mixed (tfl.data.augment.Policy), plus any column a recipe adds
(`gather_batches(..., columns)`), so the trainer's loss hook sees them all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfl.data.augment import Policy, as_policy
from tfl.data.decode import ImageFiles, decode_path
from tfl.data.errors import DataError
from tfl.data.keys import FEATURES, IMAGE, LABEL, TARGET  # noqa: F401 (re-exported: the batch keys)

READ_BATCH = 256  # elements per step while materialising: large enough to keep tf.data's parallel map busy


def make_pipeline(
    ds: tf.data.Dataset,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int,
    augment: bool | str | Policy = False,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """{IMAGE: float32 [B, S, S, 3] in 0..255, LABEL: int32 [B]} batches from (image uint8 [H, W, 3], label)
    elements.

    training=True decodes the whole dataset into memory once and shuffles with `seed`: the same seed gives the
    same order every run, and each epoch (each iteration over the dataset) gets a new order that is itself
    fixed by the seed. training=False streams in the source order. `augment` (a tfl.data.augment.Policy, an
    --augment name, or True for basic) draws its randomness from the seed the same way.
    """
    _check_args(ds, image_size, batch_size)
    if training:
        store = ImageStore.from_dataset(ds, image_size)
        order = index_order(store.count, batch_size, training=True, seed=seed, drop_remainder=drop_remainder)
        return store.batches(order, augment=augment, seed=seed)
    fixed = ds.element_spec[0].shape.is_fully_defined()
    if not fixed:
        ds = ds.map(lambda image, label: (resize_uint8(image, image_size), label), tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda images, labels: {IMAGE: to_model_input(images, image_size), LABEL: _labels(labels)},
                tf.data.AUTOTUNE)
    return _augmented(ds, seed, augment)


def index_order(n: int, batch_size: int, training: bool, seed: int, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of int64 row indices: 0..n-1 in order, or (training) a seeded permutation, new each iteration."""
    order = tf.data.Dataset.range(n)
    if training:
        order = order.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return order.batch(batch_size, drop_remainder=drop_remainder)


def gather_batches(order: tf.data.Dataset, columns: dict, transform=None) -> tf.data.Dataset:
    """{name: column[i]} for each index batch i of `order`; a column may be an array in memory or an np.memmap.

    One numpy gather per batch (never per example): a captured multi-GB tensor would be copied into the
    tf.data graph, while numpy reads rows in place, from memory or from the page cache. `transform` maps the
    batch dict (e.g. uint8 images -> model input).
    """
    ds = order.map(_gatherer(columns), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if transform is not None:
        ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds


def _gatherer(columns: dict):
    """index batch -> {name: column rows}, one numpy gather per column (see gather_batches)."""
    names = list(columns)
    arrays = [columns[n] for n in names]
    dtypes = [tf.as_dtype(a.dtype) for a in arrays]
    shapes = [[None, *a.shape[1:]] for a in arrays]

    def fetch(index):
        return [np.take(a, index, axis=0) for a in arrays]

    def gather(index):
        rows = tf.numpy_function(fetch, [index], dtypes, stateful=False)
        return {n: tf.ensure_shape(r, shape) for n, r, shape in zip(names, rows, shapes)}

    return gather


@dataclasses.dataclass
class ImageStore:
    """A split decoded once: uint8 images [N, H, W, 3] (native size when all share one, else `image_size`)."""

    images: np.ndarray  # in memory, or an np.memmap of a cache file
    labels: np.ndarray  # int32 [N]
    image_size: int  # what batches() resizes to

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def from_dataset(cls, ds: tf.data.Dataset, image_size: int) -> "ImageStore":
        parts = list(_decoded_batches(ds, image_size))
        if not parts:
            raise DataError("the dataset is empty: there are no images to train on")
        return cls(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), image_size)

    def batches(self, order: tf.data.Dataset, augment: bool | str | Policy = False, seed: int = 0,
                extra: dict | None = None) -> tf.data.Dataset:
        """{IMAGE, LABEL, *extra} batches in `order`'s order, images resized to image_size (and augmented) a whole
        batch at a time. `extra`: more columns, row-aligned with the images (teacher logits, task ids, ...)."""
        def to_input(batch):
            return {**batch, IMAGE: to_model_input(batch[IMAGE], self.image_size)}

        ds = gather_batches(order, {IMAGE: self.images, LABEL: self.labels, **(extra or {})}, to_input)
        return _augmented(ds, seed, augment)


class StreamedImages:
    """A split of image files read again every epoch: what ImageStore offers (count, labels, batches, images), with
    nothing decoded kept. Each index batch maps to its files, which are read, decoded (decode_path) and resized
    (resize_uint8) one by one in parallel, in the batch's order: the pixels ImageStore would have stored for those
    rows, so the batches are bit-identical to a kept split's for the same order."""

    # Files decoded at once within a batch; batches themselves are also read in parallel (deterministic order).
    PARALLEL_FILES = 16

    def __init__(self, files: ImageFiles, image_size: int):
        if not len(files):
            raise DataError("the dataset is empty: there are no images to train on")
        self.files, self.image_size = files, image_size
        self.labels = files.labels.astype(np.int32)
        self.images = _StreamedRows(self)  # rows decoded on demand, for a caller that indexes images directly

    @property
    def count(self) -> int:
        return len(self.files)

    def batches(self, order: tf.data.Dataset, augment: bool | str | Policy = False, seed: int = 0,
                extra: dict | None = None) -> tf.data.Dataset:
        """As ImageStore.batches: {IMAGE, LABEL, *extra} in `order`'s order, decoded from the files now."""
        read, gather = self._reader(), _gatherer({LABEL: self.labels, **(extra or {})})
        size = self.image_size

        def batch(index):
            return {**gather(index), IMAGE: to_model_input(read(index), size)}

        ds = order.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _augmented(ds, seed, augment)

    def _reader(self):
        """index batch -> uint8 [B, S, S, 3], the rows an ImageStore of these files holds."""
        paths = tf.constant(list(self.files.paths), tf.string)
        pillow = tf.constant(self.files.needs_pillow) if self.files.needs_pillow.any() else None
        size = self.image_size
        row = tf.TensorSpec([size, size, 3], tf.uint8)

        def one(args):
            path, flag = args
            return resize_uint8(decode_path(path, flag if pillow is not None else None), size)

        def read(index):
            flags = tf.gather(pillow, index) if pillow is not None else tf.zeros_like(index, tf.bool)
            return tf.map_fn(one, (tf.gather(paths, index), flags), fn_output_signature=row,
                             parallel_iterations=self.PARALLEL_FILES)

        return read


class _StreamedRows:
    """StreamedImages.images: `rows[index]` decodes those rows now (uint8 [len(index), S, S, 3])."""

    def __init__(self, store: StreamedImages):
        self.store = store
        self.shape = (store.count, store.image_size, store.image_size, 3)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.store.count

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(self.store.count)[index]
        if np.ndim(rows) == 0:
            return self[np.asarray([rows])][0]
        order = tf.data.Dataset.from_tensor_slices(np.asarray(rows, np.int64)).batch(READ_BATCH)
        read = self.store._reader()
        parts = [images.numpy() for images in order.map(read, tf.data.AUTOTUNE, deterministic=True)]
        return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), np.uint8)


def stored_shape(ds: tf.data.Dataset, image_size: int) -> tuple[int, int, int]:
    """The row shape ImageStore keeps for `ds`: the common native size, or image_size when sizes vary."""
    shape = ds.element_spec[0].shape
    return tuple(shape.as_list()) if shape.is_fully_defined() else (image_size, image_size, 3)


def fill_images(ds: tf.data.Dataset, image_size: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Decode `ds` into preallocated arrays of exactly its length (see stored_shape for the row shape)."""
    done = 0
    for batch_images, batch_labels in _decoded_batches(ds, image_size):
        end = done + len(batch_labels)
        if end > len(labels):
            raise DataError(f"the dataset has more than the {len(labels)} images it was counted to have")
        images[done:end], labels[done:end] = batch_images, batch_labels
        done = end
    if done != len(labels):
        raise DataError(f"the dataset has {done} images, not the {len(labels)} it was counted to have")


def _decoded_batches(ds: tf.data.Dataset, image_size: int):
    _check_args(ds, image_size, READ_BATCH)
    if not ds.element_spec[0].shape.is_fully_defined():
        ds = ds.map(lambda image, label: (resize_uint8(image, image_size), label), tf.data.AUTOTUNE, deterministic=True)
    for images, labels in ds.batch(READ_BATCH).prefetch(tf.data.AUTOTUNE):
        yield images.numpy(), labels.numpy().astype(np.int32)


def to_model_input(images: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 (or float) images [B, H, W, 3] -> float32 [B, size, size, 3] in 0..255, as every model takes."""
    if images.shape[-3] == size and images.shape[-2] == size:
        return tf.cast(images, tf.float32)
    # antialias only changes anything when shrinking (then it avoids aliasing); growing is plain bilinear.
    return tf.image.resize(images, [size, size], method="bilinear", antialias=True)


def _augmented(ds: tf.data.Dataset, seed: int, augment) -> tf.data.Dataset:
    policy = as_policy(augment)
    return seeded_map(ds, seed, policy.images) if policy.active else ds.prefetch(tf.data.AUTOTUNE)


def seeded_map(ds: tf.data.Dataset, seed: int, fn) -> tf.data.Dataset:
    """fn(batch, batch_seed) on every batch, batch_seed int64 [2] drawn from `seed` in order: the same seed gives the
    same draws batch by batch, and a new iteration of the dataset new ones (still fixed by the seed)."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip((ds, seeds)).map(fn, tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _check_args(ds, image_size, batch_size) -> None:
    if not isinstance(ds, tf.data.Dataset):
        raise DataError(f"make_pipeline needs a tf.data.Dataset (e.g. DatasetSplits.train), got {type(ds).__name__}")
    spec = ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2 and spec[0].shape.rank == 3 and spec[0].shape[-1] in (3, None)):
        raise DataError(f"make_pipeline needs (image [H, W, 3], label) elements as load_dataset returns, got {spec}")
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def resize_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
    """One image of any size -> uint8 [size, size, 3], rounded: how images of mixed sizes are stored for training."""
    return tf.saturate_cast(tf.round(to_model_input(image, size)), tf.uint8)


def _labels(labels: tf.Tensor) -> tf.Tensor:
    return tf.cast(labels, tf.int32)
