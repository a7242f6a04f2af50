"""Stratified k-fold views of a dataset's train+val rows: `tfl advise`'s proxy scores a depth on each fold when the
val split alone is too small to tell depths apart.

    folds = stratified_folds(pool_labels, k=3, seed=0)               # k disjoint sorted position arrays
    view = fold_splits(splits, train_rows, folds[i])                  # train: the pool but fold i; val: fold i

The pool is `train_rows` of the train split (None: all of it) followed by every val row; a fold names positions
in that pool. The view is an ordinary DatasetSplits, so a run trains on it through the usual path (Job.setup).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from tfl.data.decode import ImageFiles, image_files, with_files
from tfl.data.splits import DatasetSplits
from tfl.data.subset import labels_of, take_rows
from tfl.errors import UsageError


def stratified_folds(labels, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint, sorted arrays of positions that together cover every row; each class's rows are shuffled with
    `seed` and dealt round-robin, so every fold gets floor or ceil of 1/k of each class. Refused (UsageError) when
    a class has fewer than k rows: some fold would have none of it to validate on."""
    labels = np.asarray(labels)
    if k < 2:
        raise UsageError(f"--proxy-folds {k}: k-fold needs at least 2 folds")
    classes, counts = np.unique(labels, return_counts=True)
    if len(counts) and counts.min() < k:
        raise UsageError(f"--proxy-folds {k}: class {int(classes[np.argmin(counts)])} has only {counts.min()} "
                         f"train+val rows for the proxy; use at most {counts.min()} folds or --proxy-folds 1")
    rng = np.random.default_rng([seed, 17])  # its own stream (14 and 15 are advise's sample and probe hold-out)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in classes:  # sorted: the rng is consumed in the same order every time
        members = rng.permutation(np.flatnonzero(labels == cls))
        for i, row in enumerate(members):
            folds[(offset + i) % k].append(int(row))
        offset += len(members)  # the next class starts where this one stopped: the fold sizes stay within one
    return [np.sort(np.asarray(f, np.int64)) for f in folds]


def split_labels(ds) -> np.ndarray:
    """The labels of a split, from its files when it has them (no decoding), else one pass."""
    files = image_files(ds)
    return np.asarray(files.labels, np.int64) if files is not None else labels_of(ds)


def pool_labels(splits: DatasetSplits, train_rows) -> np.ndarray:
    """The labels of the pool fold_splits draws from: train_rows of train (None: all), then every val row."""
    train = np.asarray(splits.train_labels) if splits.train_labels is not None else split_labels(splits.train)
    if train_rows is not None:
        train = train[np.asarray(train_rows)]
    return np.concatenate([train, split_labels(splits.val)]).astype(np.int64)


def fold_splits(splits: DatasetSplits, train_rows, held, train=None) -> DatasetSplits:
    """The splits a fold's run sees: train = the pool (train_rows of train, then val) without the positions
    `held` (or the positions `train`, which must not overlap them), val = those positions, no test (a proxy's
    score is its val accuracy). Its fingerprint names the fold, so caches keyed on the data never mix folds."""
    n_train = splits.num_examples["train"]
    source = splits.train
    rows = np.arange(n_train) if train_rows is None else np.asarray(train_rows, np.int64)
    if train_rows is not None:
        source = take_rows(source, n_train, rows)
    pool = source.concatenate(splits.val)
    size = len(rows) + splits.num_examples["val"]
    train_files, val_files = image_files(source), image_files(splits.val)
    if train_files is not None and val_files is not None:
        pool = with_files(pool, ImageFiles(np.concatenate([train_files.paths, val_files.paths]),
                                           np.concatenate([train_files.labels, val_files.labels]),
                                           np.concatenate([train_files.needs_pillow, val_files.needs_pillow])))
    held = np.sort(np.asarray(held, np.int64))
    if len(held) == 0 or held.min() < 0 or held.max() >= size:
        raise UsageError(f"fold_splits: the held-out positions must lie in the pool's {size} rows")
    keep = np.setdiff1d(np.arange(size), held) if train is None else np.sort(np.asarray(train, np.int64))
    if len(np.intersect1d(keep, held)) or (len(keep) and (keep.min() < 0 or keep.max() >= size)):
        raise UsageError(f"fold_splits: the training positions must lie in the pool's {size} rows, outside the fold")
    labels = pool_labels(splits, train_rows)
    digest = hashlib.sha256()
    for part in (splits.fingerprint.encode(), b"fold", rows.tobytes(), held.tobytes(), keep.tobytes()):
        digest.update(part)
    return dataclasses.replace(
        splits, train=take_rows(pool, size, keep), val=take_rows(pool, size, held), test=None,
        num_examples={"train": len(keep), "val": len(held), "test": 0}, fingerprint=digest.hexdigest()[:16],
        train_labels=labels[keep], split_fingerprints=None, files=None)
