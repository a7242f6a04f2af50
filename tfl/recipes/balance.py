"""Class balance for imbalanced training sets (`tfl finetune --balance`).

  sampler  every epoch draws its n_train // batch full batches of training rows with replacement, a row of class c
           with probability proportional to 1 / n_c: each class is drawn equally often in expectation, the rare
           ones' rows repeat. The draw is seeded by (seed, epoch), as every epoch order in tfl, so a resumed epoch
           sees the batches of an uninterrupted run.
  loss     every training row's loss is multiplied by w_c = n / (C * n_c) (scikit-learn's "balanced" weights;
           their mean over the rows is 1), through the trainer's `sample_weight` column. Validation and test are
           scored unweighted.
"""

from __future__ import annotations

import numpy as np

from tfl.errors import UsageError
from tfl.options import BALANCE


def check_balance(balance: str) -> None:
    if balance not in BALANCE:
        raise UsageError(f"--balance {balance!r}: choose one of {', '.join(BALANCE)}")


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """w_c = n / (C_present * n_c) for the classes present; 0 for a class with no training row."""
    counts = class_counts(labels, num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def balanced_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` row indices drawn with replacement, each class equally likely (rows of a class uniformly)."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return np.random.default_rng(seed).choice(len(labels), count, replace=True, p=p / p.sum()).astype(np.int64)


def balanced_order(labels: np.ndarray, batch: int, seed: int):
    """epoch -> a dataset of int64 index batches: the sampler's draw for that epoch, in full batches."""
    import tensorflow as tf

    from tfl.training.trainer import epoch_seed

    steps = len(labels) // batch

    def order(epoch: int):
        rows = balanced_indices(labels, steps * batch, epoch_seed(seed, epoch)).reshape(steps, batch)
        return tf.data.Dataset.from_tensor_slices(rows)

    return order


def train_labels(job) -> np.ndarray:
    """The labels of the job's training rows, in their order."""
    from tfl import data

    splits = job.splits
    if splits.train_labels is not None:
        labels = np.asarray(splits.train_labels)
        return labels[job.train_rows] if job.train_rows is not None else labels
    return data.labels_of(job.train_source)


def apply(job, balance: str) -> tuple[dict | None, dict]:
    """(extra columns for job.prepare, the config record) for --balance; call job.inputs.train_order after prepare
    with `sampler_for(job)` when balance is "sampler"."""
    check_balance(balance)
    if balance == "none":
        return None, {}
    labels = train_labels(job)
    num_classes = len(job.class_names)
    counts = class_counts(labels, num_classes)
    record = {"class_counts": {n: int(c) for n, c in zip(job.class_names, counts)}}
    extra = None
    if balance == "loss":
        weights = class_weights(labels, num_classes)
        record["class_weights"] = {n: round(float(w), 6) for n, w in zip(job.class_names, weights)}
        extra = {"train": {"sample_weight": weights[labels].astype(np.float32)}}
    job.log(f"balance: {balance}; training rows per class " + " ".join(f"{n}:{c}" for n, c in
                                                                      record["class_counts"].items()))
    return extra, record


def install_sampler(job) -> None:
    """--balance sampler: every training epoch's rows drawn class-balanced (after job.prepare)."""
    job.inputs.train_order = balanced_order(train_labels(job), job.batch, job.opts.seed)
