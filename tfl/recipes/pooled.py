"""What `tfl dann` and `tfl multitask` share: a trainable block on the frozen backbone's pooled features.

Both recipes keep the pretrained backbone frozen up to its global average pool and play their game (a domain
classifier behind a gradient-reversal layer; several task heads) on a small block above it. The pooled features
come from the boundary cache (tfl.training.boundary: one backbone pass per image, persisted and reused by later
runs), so an epoch costs seconds on a CPU. Training goes through the Job's Trainer (its loss and metrics hooks,
dict batches, checkpoints); variables that are not part of the Job's classifier (a domain classifier, task
heads) ride in every checkpoint as the recipe's state (Trainer.recipe_state) and come back on a resume.
"""

from __future__ import annotations

import numpy as np

from tfl.errors import UsageError
from tfl.options import check_options as check_fields
from tfl.job import Job, Stage

RECIPE_WEIGHT = "weight{:05d}"  # names of the extra variables' arrays in a checkpoint (prefixed "recipe.")


def head_stage(job: Job, name: str, epochs: int) -> Stage:
    """One stage training the classifier's head layers (above the pool) at --lr, everything below frozen."""
    from tfl.freezing import head_only_plan

    return Stage(name, head_only_plan(job.plan), epochs, {"head": job.lr})


def check_pooled_options(opts, command: str) -> None:
    """The options under which the block trains on cached pooled features, checked before any data is read."""
    check_fields(opts)
    if opts.cache == "off":
        raise UsageError(f"--cache off: tfl {command} trains on the frozen backbone's cached pooled features; use "
                         "--cache auto or on")
    if opts.head_epochs < 1:
        raise UsageError(f"--head-epochs {opts.head_epochs}: the block above the frozen backbone trains for "
                         "--head-epochs epochs; give at least 1")


def check_pooled(feed) -> None:
    """Refuse a stage feed that is not cached pooled features (what the block above the pool trains on)."""
    from tfl.training.boundary import POOLED

    if feed.boundary != POOLED:
        raise UsageError("the pooled features could not be cached (see the cache: lines above); this recipe trains "
                         "on them only. Raise --cache-budget or free space in --cache-dir")


def feature_width(job: Job) -> int:
    from tfl.models import backbone_of

    return int(backbone_of(job.model).output.shape[-1])


def features(job: Job, split: str, source=None, count: int | None = None, data_id: dict | None = None):
    """The cached pooled features of `split` (an Entry: .data [N, F], .labels [N]); a split the Job does not have
    (a target domain, the test split) is added from `source` first."""
    from tfl.training.boundary import POOLED

    if source is not None:
        job.inputs.add_split(split, source, count, data_id)
    return job.inputs.activations(POOLED, split)


def keep_in_checkpoints(job: Job, variables: list) -> None:
    """Save `variables` (not the classifier's) in every checkpoint; after a resume, load them back now."""
    variables = list(variables)
    def state():
        return ({"extra_variables": len(variables)},
                {RECIPE_WEIGHT.format(i): np.asarray(v.numpy()) for i, v in enumerate(variables)})

    job.trainer.recipe_state = state
    snapshot = job.snapshot
    if snapshot is not None and "recipe" in snapshot.state:
        saved = snapshot.state["recipe"].get("extra_variables")
        if saved != len(variables):
            from tfl.training.checkpoint import ResumeError

            raise ResumeError(f"the checkpoint of epoch {snapshot.epoch} holds {saved} of the recipe's own variables "
                              f"but this run has {len(variables)} (it was written by another version of the "
                              "recipe); start over with --overwrite or another --output-dir")
        for i, v in enumerate(variables):
            v.assign(snapshot.arrays["recipe." + RECIPE_WEIGHT.format(i)])


def head_block(job: Job, inputs):
    """Call the classifier's head layers above the pool on `inputs`: (the last hidden activation, the logits)."""
    from tfl.models import LOGITS, POOL, head_layers

    x = inputs
    for layer in head_layers(job.model):
        if layer.name == POOL:
            continue
        if layer.name == LOGITS:
            return x, layer(x)
        x = layer(x)
    raise UsageError(f"{job.model.name} has no {LOGITS!r} layer")


def in_order(entry, batch: int, rows=None):
    """(features, labels) batches of an Entry in row order (`rows`: these rows only, in this order)."""
    import tensorflow as tf

    from tfl.data.pipeline import FEATURES, LABEL, gather_batches

    rows = np.arange(len(entry.labels), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    order = tf.data.Dataset.from_tensor_slices(rows).batch(batch)
    return gather_batches(order, {FEATURES: entry.data, LABEL: entry.labels})


def predict(model, entry, batch: int, output: str | None = None) -> np.ndarray:
    """`model`'s outputs (the `output` key of a dict model) on every row of an Entry, in inference mode."""
    from tfl.data.pipeline import FEATURES

    parts = []
    for b in in_order(entry, batch):
        out = model(b[FEATURES], training=False)
        parts.append(np.asarray(out[output] if output else out, np.float32))
    return np.concatenate(parts)
