"""What every data source returns: the splits as tf.data datasets plus what the rest of tfl needs to know."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import tensorflow as tf


@dataclasses.dataclass
class DatasetSplits:
    """Unbatched `(image, label)` elements: image uint8 [H, W, 3] RGB, label int64 scalar.

    Element order is fixed (no per-epoch shuffling); `make_pipeline` shuffles, resizes and batches.
    """

    name: str
    train: "tf.data.Dataset"
    val: "tf.data.Dataset"
    test: "tf.data.Dataset | None"
    class_names: list[str]
    num_examples: dict[str, int]  # {"train": n, "val": n, "test": n or 0}
    native_size: tuple[int, int] | None  # (H, W) when every image has that size, else None
    fingerprint: str  # stable short hash of what the data is; changes when the files or the split do
    train_labels: "np.ndarray | None" = None  # the train labels in element order, when the source has them at hand
    # Per split ("train", "val", "test"), when the source can tell: a fingerprint of that split alone (so a changed
    # test file need not stop a resumed run), and the files in element order (to name a file that changed after the
    # check before training, when reading it fails).
    split_fingerprints: "dict[str, str] | None" = None
    files: "dict[str, list[str]] | None" = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
