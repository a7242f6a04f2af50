"""Subsets of a dataset chosen by row index: nothing is buffered, whatever the image size.

Every subset tfl trains on (--limit-train, --label-fraction) is a sorted array of row indices into the train
split; `take_rows` applies it and `tfl.training.boundary.rows_digest` hashes it into the cache key.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfl.data.decode import image_files, with_files
from tfl.errors import UsageError


def random_rows(size: int, count: int, seed: int) -> np.ndarray:
    """`count` of the row indices 0..size-1, picked uniformly with `seed`, sorted."""
    keep = np.zeros(size, dtype=bool)
    keep[np.random.default_rng(seed).choice(size, count, replace=False)] = True
    return np.flatnonzero(keep).astype(np.int64)


def check_label_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"--label-fraction {fraction}: must be in (0, 1], the share of each class's training "
                         "examples to keep, e.g. 0.1")


def stratified_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per class fraction x its count row indices, rounded half up (at least one), picked with `seed`, sorted.

    Each class's members are shuffled once per seed and the first ones kept, so for one seed a smaller fraction's
    rows are a subset of a larger one's: a label-efficiency curve adds data rather than redrawing it."""
    check_label_fraction(fraction)
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 2])  # its own stream: not the one that drew the val split
    parts = []
    for cls in np.unique(labels):  # sorted, so the rng is consumed in the same order every time
        members = np.flatnonzero(labels == cls)
        parts.append(rng.permutation(members)[: max(1, half_up(fraction * len(members)))])
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def half_up(x: float) -> int:
    """4.5 -> 5 (Python's round() gives 4): a share of each class that reads as the user expects."""
    return int(np.floor(x + 0.5))


def take_rows(ds: tf.data.Dataset, size: int, rows: np.ndarray) -> tf.data.Dataset:
    """The elements of `ds` (of `size` elements) at `rows`, in their original order."""
    keep = np.zeros(size, dtype=bool)
    keep[rows] = True
    kept_rows = np.flatnonzero(keep)
    keep = tf.constant(keep)

    def kept(i, element):
        return tf.gather(keep, i)

    def element_only(i, element):
        return element

    # Named functions, not two lambdas on one line: autograph cannot tell such lambdas apart and warns.
    subset = ds.enumerate().filter(kept).map(element_only)
    files = image_files(ds)
    return with_files(subset, files.take(kept_rows)) if files is not None else subset


def random_subset(ds: tf.data.Dataset, size: int, count: int, seed: int) -> tf.data.Dataset:
    """`count` of the `size` elements of `ds`, picked uniformly with `seed`, in their original order."""
    return take_rows(ds, size, random_rows(size, count, seed))


def labels_of(ds: tf.data.Dataset) -> np.ndarray:
    """Every label of an `(image, label)` dataset, in order: one pass, for sources that do not list them."""
    return np.fromiter(ds.map(lambda image, label: label).as_numpy_iterator(), np.int64)
