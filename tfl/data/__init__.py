"""Datasets for tfl: image folders, MNIST/Fashion-MNIST IDX files and TensorFlow Datasets, as tf.data.

    splits = load_dataset("fashion_mnist")               # or a folder path, or a tfds name such as "cifar10"
    train = make_pipeline(splits.train, image_size=96, batch_size=64, training=True, seed=0, augment=True)

Imports are lazy so `import tfl.data` (and the CLI's --help) does not pay for TensorFlow.
"""

from __future__ import annotations

import importlib

from tfl.data.errors import DataError
from tfl.data.splits import DatasetSplits

_LAZY = {"load_dataset": "tfl.data.load", "make_pipeline": "tfl.data.pipeline", "read_image": "tfl.data.decode",
         "random_subset": "tfl.data.subset", "random_rows": "tfl.data.subset", "stratified_rows": "tfl.data.subset",
         "take_rows": "tfl.data.subset", "labels_of": "tfl.data.subset", "check_label_fraction": "tfl.data.subset"}

__all__ = ["DataError", "DatasetSplits", "check_label_fraction", "labels_of", "load_dataset", "make_pipeline",
           "random_rows", "random_subset", "read_image", "stratified_rows", "take_rows"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tfl.data' has no attribute {name!r}")
