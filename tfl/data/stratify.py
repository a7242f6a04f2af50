"""A seeded, per-class split of one labelled set into train and validation indices."""

from __future__ import annotations

import numpy as np

from tfl.data.errors import DataError


def check_val_split(val_split: float) -> None:
    if not 0.0 < val_split < 1.0:
        raise DataError(
            f"val_split must be between 0 and 1 (exclusive), got {val_split!r}; "
            "use e.g. 0.1 to hold out 10% of each class for validation"
        )


def stratified_split(labels: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted, disjoint, covering all of `labels`.

    Each class gives round(val_split * n) of its n examples to val, at least one when it has two or more,
    and never all of them, so every class with two or more examples appears in both splits.
    The same (labels, val_split, seed) always gives the same split.
    """
    check_val_split(val_split)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for cls in np.unique(labels):  # sorted, so the rng is consumed in the same order every time
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n_val = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(val_split * len(members))))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    return train, val
