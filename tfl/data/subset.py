"""A seeded random subset of a dataset, chosen by index: nothing is buffered, whatever the image size."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def random_subset(ds: tf.data.Dataset, size: int, count: int, seed: int) -> tf.data.Dataset:
    """`count` of the `size` elements of `ds`, picked uniformly with `seed`, in their original order."""
    keep = np.zeros(size, dtype=bool)
    keep[np.random.default_rng(seed).choice(size, count, replace=False)] = True
    keep = tf.constant(keep)

    def kept(i, element):
        return tf.gather(keep, i)

    def element_only(i, element):
        return element

    # Named functions, not two lambdas on one line: autograph cannot tell such lambdas apart and warns.
    return ds.enumerate().filter(kept).map(element_only)
