"""random_subset: seeded, uniform, no duplicates, original order."""

import numpy as np
import tensorflow as tf

from tfl.data import random_subset


def test_random_subset_is_seeded_and_uniform():
    ds = tf.data.Dataset.range(1000).map(lambda i: (tf.zeros([2, 2, 3], tf.uint8), i))
    pick = lambda seed: [int(label) for _, label in random_subset(ds, 1000, 100, seed)]  # noqa: E731
    first, again, other = pick(0), pick(0), pick(1)
    assert first == again and first != other
    assert len(set(first)) == 100 and first == sorted(first)
    assert first[-1] > 900 and first[0] < 100  # drawn from the whole range, not its start
    assert 400 < np.mean(first) < 600
