"""Boundary caching: train the layers above the freeze boundary on activations computed once.

When everything below a stage's freeze boundary is frozen and the images reaching it are the same every epoch
(no pixel augmentation), the boundary activations never change. StageInputs computes them once per split (train,
val), keeps them in an ArrayCache (memory within --cache-budget, else disk; persisted, and reused by later runs
with the same key) and hands each stage a model that starts at the boundary, sharing the classifier's layers.

Which boundary: a stage that freezes the whole backbone (stage 1, the head) caches pooled features, head_pool's
output (global average pooling has no weights and no randomness; dropout comes after it). A stage with a
prefix-shaped freeze (stage 2) caches the output of its last frozen layer. When both run, the shallower
boundary is extracted from the images and the deeper one derived from it by running the frozen layers in
between once: the whole job pays for one backbone forward pass per image, however many epochs it trains.

Order: the training rows of epoch e are gathered by a permutation of indices fixed by (seed, e) (see
tfl.training.trainer.epoch_seed), for images and cached activations alike, so a run with the cache sees
exactly the batches it would without, and a resumed epoch sees the batches of an uninterrupted run.

Augmentation (tfl.data.augment.Policy): anything that changes the pixels (--augment, --random-erasing, --cutmix,
--mixup-on pixels) turns the cache off, saying so in the log. MixUp alone mixes the cached activations of a stage
that trains on them (a mix of fixed features, seeded by the epoch like the order), so the cache stays valid.

Images: a split of image files is decoded once and kept (ImageStore: memory within --cache-budget, else a decoded
copy under --cache-dir) or streamed from the files every epoch (StreamedImages), per --decoded-images; auto keeps
the train and val images when they fit the memory budget together, else streams. Both give the same batches for
the same order, so the choice changes memory and disk use, never the numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tfl.cache import ArrayCache, Entry, NoRoom, default_cache_dir, format_size, parse_disk_limit, parse_size
from tfl.data.augment import Policy, as_policy
from tfl.data.decode import image_files
from tfl.data.pipeline import (FEATURES, IMAGE, LABEL, ImageStore, StreamedImages, fill_images, gather_batches,
                               index_order, seeded_map, stored_shape)
from tfl.data.subset import random_rows
from tfl.errors import UsageError
from tfl.models import POOL, backbone_of, head_layers, pooled, preprocess_layer, submodel
from tfl.training.bn_folding import folded_call
from tfl.training.trainer import Progress, epoch_seed

from tfl.options import CACHE_MODES as MODES, DECODED_IMAGES
POOLED = POOL  # boundary name of the pooled features: the classifier's global average pool
PIPELINE_VERSION = 1  # bump when the input pipeline changes the pixels a model sees for the same files
SPLITS = ("train", "val")


@dataclasses.dataclass
class StageFeed:
    """What the trainer runs for one stage."""

    model: keras.Model  # trained; shares its layers (and so its weights) with the classifier
    train: Callable[[int], tf.data.Dataset]  # epoch number (1-based, across stages) -> that epoch's batches
    val: tf.data.Dataset
    eval_model: keras.Model | None  # evaluates `val`; None means the classifier itself, on images
    boundary: str | None  # where the cached inputs come from; None: images


def data_identity(fingerprint: str, split: str, subset: str | None = None) -> dict:
    return {"dataset": fingerprint, "split": split, "subset": subset}


def for_job(job, stages, extra: dict | None = None) -> StageInputs:
    """StageInputs for a tfl.job.Job: its options, its (possibly --limit-train / --label-fraction subset) train
    source, planned for `stages` (tfl.job.Stage). `extra`: split -> {column: array} added to every batch of that
    split."""
    opts, splits = job.opts, job.splits
    subset = rows_digest(job.train_rows) if job.train_rows is not None else None
    inputs = StageInputs(
        job.model, opts.backbone, {"train": job.train_source, "val": splits.val},
        {"train": job.n_train, "val": splits.num_examples["val"]},
        {"train": data_identity(splits.fingerprint, "train", subset), "val": data_identity(splits.fingerprint, "val")},
        job.image_size, job.batch, opts.seed, Policy.from_options(opts, len(job.class_names)), opts.cache,
        opts.cache_budget, opts.cache_dir, opts.jit, job.log, extra=extra, decoded=opts.decoded_images,
        disk_limit=opts.cache_disk_limit)
    inputs.plan([(s.name, s.plan, s.epochs) for s in stages])
    return inputs


def rows_digest(rows) -> str:
    """A hash of the row indices a subset keeps (tfl.data.subset): the cache key of the rows trained on."""
    return hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()[:16]


def subset_digest(size: int, count: int, seed: int) -> str:
    """rows_digest of the rows tfl.data.random_subset(ds, size, count, seed) keeps."""
    return rows_digest(random_rows(size, count, seed))


class StageInputs:
    """The train and val inputs of each stage: decoded images, or cached boundary activations.

    sources/counts/data_ids are keyed by split ("train", "val"); data_ids say what the rows are (see
    data_identity) and go into every cache key. `stores` may hold splits already decoded (ImageStore). Call plan()
    once with all stages before training, then feed() for each stage after freezing.training_graph has applied its
    plan, and log_summary() at the end.
    """

    def __init__(self, model: keras.Model, backbone: str, sources: dict, counts: dict, data_ids: dict,
                 image_size: int, batch_size: int, seed: int, augment: bool | str | Policy = False, mode: str = "auto",
                 budget: str | int | None = None, cache_dir: str | None = None, jit: bool = False,
                 log: Callable = print, stores: dict | None = None, extra: dict | None = None,
                 decoded: str = "auto", disk_limit: str | int | None = None):
        if mode not in MODES:
            raise UsageError(f"--cache {mode!r} is not one of {', '.join(MODES)}")
        if decoded not in DECODED_IMAGES:
            raise UsageError(f"--decoded-images {decoded!r} is not one of {', '.join(DECODED_IMAGES)}")
        self.model, self.backbone_name = model, backbone
        self.backbone = backbone_of(model)
        self.sources, self.counts, self.data_ids = sources, counts, data_ids
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.mode, self.jit, self.log = mode, jit, log
        self.policy = as_policy(augment)  # of the training batches (a bool or an --augment name: no mixing)
        self.cache = ArrayCache(cache_dir or default_cache_dir(), parse_size(budget), log=log,
                                disk_limit=parse_disk_limit(disk_limit))
        self.decoded = decoded
        self._decoded: dict[str, tuple[str, str]] = {}  # split -> ("keep" | "stream", why), decided once
        self.layer_names = [layer.name for layer in self.backbone.layers]
        self.stage_boundary: dict[str, str] = {}
        self.stage_epochs: dict[str, int] = {}
        self.entries: dict[tuple[str, str], Entry] = {}
        self._stores: dict[str, ImageStore] = dict(stores or {})  # split -> decoded images, built on first use
        self.extra = dict(extra or {})  # split -> {column: array row-aligned with the split}: added to every batch
        self._models: dict[str, keras.Model] = {}
        self._own: dict[tuple[str, str], Entry] = {}  # activations() computed for a recipe (e.g. the test split)
        self._functions: dict[tuple, Callable] = {}
        self._spent = 0.0  # seconds spent computing cache entries in this run
        # epoch -> int64 index batches of the training rows, replacing the seeded permutation (a recipe's sampler,
        # e.g. tfl.recipes.balance); cached activations and images alike are gathered in its order.
        self.train_order: Callable[[int], tf.data.Dataset] | None = None

    # -- deciding ---------------------------------------------------------------------------------------------------
    @property
    def spent_seconds(self) -> float:
        """Seconds this run spent computing cache entries (0 when every one was reused)."""
        return self._spent

    def plan(self, stages) -> None:
        """Decide which stages train on cached activations. stages: [(name, FreezePlan, epochs)] in run order.

        --cache on raises ValueError when caching is impossible (pixel augmentation, or no stage qualifies);
        auto falls back to recomputing, saying why in the log. --mixup-on features raises when a stage would train
        on images.
        """
        active = [(name, plan, epochs) for name, plan, epochs in stages if epochs > 0]
        self.stage_epochs = {name: epochs for name, _, epochs in active}
        self._plan_cache(active)
        if self.policy.mixup and self.policy.mixup_on == "features":
            on_images = [name for name, _, _ in active if name not in self.stage_boundary]
            if on_images:
                raise UsageError(f"--mixup-on features: stage {', '.join(on_images)} trains on images, not cached "
                                 "activations (the log of --cache says why); use --mixup-on auto (mixes those "
                                 "images) or pixels")
        if self.policy.mixes_features and self.stage_boundary:
            self.log(f"augment: --mixup {self.policy.mixup:g} mixes the cached activations of stage "
                     f"{', '.join(self.stage_boundary)} (the cache stays valid)")

    def _plan_cache(self, active) -> None:
        if self.mode == "off" or not active:
            return
        pixels = self.policy.pixel_flags()
        if pixels:
            flags = ", ".join(pixels)
            if self.mode == "on":
                raise UsageError(f"--cache on cannot be used with {flags}: pixel augmentation changes the images "
                                 "before the freeze boundary every epoch, so there is nothing fixed to cache; use "
                                 "--cache auto (recomputes) or drop " + flags)
            pinned = " (--mixup-on auto would mix the cached activations instead)" if len(pixels) == 1 and \
                self.policy.mixup and self.policy.mixup_on == "pixels" else ""
            self.log(f"cache: not used, {flags} change{'s' if len(pixels) == 1 else ''} the images before the "
                     f"freeze boundary every epoch{pinned}")
            return
        reasons, pending = {}, 0
        for i, (name, plan, _) in enumerate(active):
            boundary, why = self._boundary_for(plan, [p for _, p, _ in active[:i]])
            if boundary is not None and boundary not in self.stage_boundary.values():
                nbytes = self._entry_bytes(boundary)
                why = self.cache.can_store(pending + nbytes)
                boundary = None if why else boundary
                pending += 0 if why else nbytes
            if boundary is None:
                reasons[name] = why
            else:
                self.stage_boundary[name] = boundary
        if self.mode == "on" and not self.stage_boundary:
            raise UsageError("--cache on: no stage can train on cached activations: "
                             + "; ".join(f"stage {n}: {r}" for n, r in reasons.items()) + ". Use --cache auto or off")
        for name, why in reasons.items():
            self.log(f"cache: stage {name} recomputes the backbone every epoch: {why}")

    def _boundary_for(self, plan, earlier_plans) -> tuple[str | None, str]:
        boundary = plan.boundary()
        if boundary is None and not any(layer.frozen and layer.params for layer in plan.layers):
            return None, "nothing in its backbone is frozen (--freeze-up-to none)"
        if boundary is None:
            return None, ("its freeze plan is not prefix-shaped (--freeze/--unfreeze rules), so no single tensor "
                          "separates frozen from trained layers")
        depth = self.layer_names.index(boundary)
        below = {layer.name for layer in plan.layers[: depth + 1] if layer.params}
        for earlier in earlier_plans:
            if any(not layer.frozen and layer.name in below for layer in earlier.layers):
                return None, "an earlier stage trains layers below its freeze boundary"
        if depth == len(self.layer_names) - 1 and pooled(self.model):
            return POOLED, ""
        try:
            submodel(self.backbone, start=boundary)
        except ValueError as err:
            return None, str(err)
        return boundary, ""

    def _depth(self, boundary: str) -> int:
        return len(self.layer_names) if boundary == POOLED else self.layer_names.index(boundary)

    def _row_shape(self, boundary: str) -> tuple:
        if boundary == POOLED:
            return (int(self.backbone.output.shape[-1]),)
        return tuple(int(d) for d in self.backbone.get_layer(boundary).output.shape[1:])

    def _entry_bytes(self, boundary: str) -> int:
        return sum(self.counts[s] * (4 * int(np.prod(self._row_shape(boundary))) + 4) for s in SPLITS)

    # -- feeding ----------------------------------------------------------------------------------------------------
    def feed(self, stage: str, graph, history=()) -> StageFeed:
        """The inputs of `stage`, given the TrainGraph freezing.training_graph returned for it. `history`: the
        trainer's epochs so far; after a resume, stages it shows finished need no cache (nor get one)."""
        boundary = self.stage_boundary.get(stage)
        if boundary is None or self._finished(stage, history):
            return StageFeed(graph.model, self.images("train"), self.images("val"), None, None)
        if not self.entries:
            try:
                self._prepare(history)
            except NoRoom as err:  # the cache directory filled up (or turned read-only) since the plan was made
                if self.mode == "on":
                    raise UsageError(f"--cache on: {err}; free space in --cache-dir, or use --cache auto") from None
                self.log(f"cache: warning: {err}; every stage recomputes the backbone instead")
                self.stage_boundary.clear()
                self.entries.clear()
                return StageFeed(graph.model, self.images("train"), self.images("val"), None, None)
        model = self._model_from(boundary)
        train, val = self.entries[(boundary, "train")], self.entries[(boundary, "val")]

        def train_batches(epoch):
            batches = gather_batches(self._order(epoch), self._columns("train", train))
            if self.policy.mixes_features:
                return seeded_map(batches, epoch_seed(self.seed, epoch), self.policy.features)
            return batches.prefetch(tf.data.AUTOTUNE)

        val_batches = gather_batches(self._order(None, "val"), self._columns("val", val)).prefetch(tf.data.AUTOTUNE)
        return StageFeed(model, train_batches, val_batches, model, boundary)

    def _columns(self, split: str, entry: Entry) -> dict:
        return {FEATURES: entry.data, LABEL: entry.labels, **self.extra.get(split, {})}

    def images(self, split: str):
        """Image batches, decoded once: for train, epoch -> that epoch's (augmented) batches; for val, the
        batches in order. Both carry the recipe's extra columns."""
        extra = self.extra.get(split)
        if split != "train":
            return self._store(split).batches(self._order(None, split), extra=extra)
        return lambda epoch: self._store("train").batches(self._order(epoch), self.policy,
                                                          epoch_seed(self.seed, epoch), extra=extra)

    def _order(self, epoch: int | None, split: str = "train") -> tf.data.Dataset:
        """Train: epoch `epoch`'s permutation of the row indices, in full batches. Other splits: 0..n-1."""
        if epoch is None:
            return index_order(self.counts[split], self.batch_size, training=False, seed=self.seed)
        if self.train_order is not None and split == "train":
            return self.train_order(epoch)
        return index_order(self.counts[split], self.batch_size, training=True, seed=epoch_seed(self.seed, epoch),
                           drop_remainder=True)

    def decoded_choice(self, split: str) -> tuple[str, str]:
        """Whether `split`'s images are kept decoded or streamed from their files ("keep" | "stream"), and why;
        decided once per split (--decoded-images)."""
        if split not in self._decoded:
            files = image_files(self.sources.get(split))
            if files is None:
                choice = ("keep", "not image files: IDX arrays are in memory already, tfds splits are decoded once")
            elif self.decoded != "auto":
                choice = (self.decoded, f"--decoded-images {self.decoded}")
            else:
                together = [s for s in dict.fromkeys((*SPLITS, split)) if image_files(self.sources.get(s)) is not None]
                nbytes = sum(self._decoded_bytes(s) for s in together)
                fits = self.cache.fits_memory(nbytes)
                choice = ("keep" if fits else "stream",
                          f"auto: the decoded {' and '.join(together)} images ({format_size(nbytes)}) "
                          f"{'fit' if fits else 'do not fit'} the memory budget ({format_size(self.cache.budget)}, "
                          "--cache-budget)")
            self._decoded[split] = choice
        return self._decoded[split]

    def decoded_record(self) -> dict:
        """For config.json: each split's decoded-images choice and why."""
        return {split: dict(zip(("mode", "why"), self.decoded_choice(split))) for split in SPLITS
                if split in self.sources}

    def _decoded_bytes(self, split: str) -> int:
        return self.counts[split] * int(np.prod(stored_shape(self.sources[split], self.image_size)))

    def _store(self, split: str) -> ImageStore | StreamedImages:
        if split not in self._stores:
            source, rows = self.sources[split], self.counts[split]
            how, why = self.decoded_choice(split)
            if how == "stream":
                self._stores[split] = StreamedImages(image_files(source), self.image_size)
                self.log(f"images: {split}: {rows} files streamed, decoded and resized every epoch, nothing kept "
                         f"({why})")
                return self._stores[split]
            shape = stored_shape(source, self.image_size)
            key = {"kind": "images", "data": self.data_ids[split], "shape": shape, "pipeline": PIPELINE_VERSION}
            entry = self.cache.lookup(key)
            if entry is None:
                problem = self.cache.can_store(rows * int(np.prod(shape)))
                if problem:
                    hint = "; or stream them with --decoded-images stream" if image_files(source) is not None else ""
                    raise UsageError(f"the decoded {split} images cannot be held: {problem}{hint}")
                entry = self.cache.build(key, rows, shape, np.uint8,
                                         lambda data, labels: fill_images(source, self.image_size, data, labels) or {},
                                         persist=False)
            self._stores[split] = ImageStore(entry.data, entry.labels, self.image_size)
            self.log(f"images: {split}: {rows} decoded once and kept ({format_size(entry.nbytes)}, {entry.where()}) "
                     f"({why})")
        return self._stores[split]

    # -- a recipe's own batches ---------------------------------------------------------------------------------------
    def add_split(self, split: str, source, count: int, data_id: dict) -> None:
        """Another split (e.g. test) that batches() can serve, cached like train and val (same keys)."""
        self.sources[split], self.counts[split], self.data_ids[split] = source, count, data_id

    def labels(self, split: str, boundary: str | None) -> np.ndarray:
        """The labels of `split`'s rows, in the order batches() indexes them."""
        return self.activations(boundary, split).labels if boundary else self._store(split).labels

    def activations(self, boundary: str, split: str) -> Entry:
        """The cached activations of `split` at `boundary`: those feed() prepared, else computed from the images
        (or reused from the cache directory)."""
        entry = self.entries.get((boundary, split), self._own.get((boundary, split)))
        if entry is None:
            key = self._key(boundary, split)
            entry = self.cache.lookup(key)
            if entry is None:
                entry = self._compute(boundary, split, key, None)
            self._own[(boundary, split)] = entry
            self.log(self._describe(boundary, split, entry))
        return entry

    def batches(self, split: str, boundary: str | None, order: tf.data.Dataset, extra: dict | None = None,
                epoch: int | None = None) -> tf.data.Dataset:
        """Batches of `split` in `order` (a dataset of int64 index batches, any composition): cached activations at
        `boundary`, or images when it is None (through the augmentation policy for train, seeded by `epoch`).
        `extra`: columns row-aligned with the split."""
        if boundary is None:
            augment = self.policy if split == "train" and epoch is not None else False
            return self._store(split).batches(order, augment, epoch_seed(self.seed, epoch or 0), extra=extra)
        entry = self.activations(boundary, split)
        columns = {FEATURES: entry.data, LABEL: entry.labels, **(extra or {})}
        return gather_batches(order, columns).prefetch(tf.data.AUTOTUNE)

    # -- computing the cache ------------------------------------------------------------------------------------------
    def _finished(self, stage: str, history) -> bool:
        return sum(result.stage == stage for result in history) >= self.stage_epochs.get(stage, 0)

    def _prepare(self, history) -> None:
        """Every cached boundary, before any stage trains: shallowest from the images, each deeper one from the
        previous (the layers in between are frozen until the stage that uses the deeper one has run)."""
        previous = None
        needed = {b for stage, b in self.stage_boundary.items() if not self._finished(stage, history)}
        for boundary in sorted(needed, key=self._depth):
            for split in SPLITS:
                key = self._key(boundary, split)
                entry = self.cache.lookup(key)
                if entry is None:
                    entry = self._compute(boundary, split, key, previous)
                self.entries[(boundary, split)] = entry
                self.log(self._describe(boundary, split, entry))
            previous = boundary
        if all(stage in self.stage_boundary for stage in self.stage_epochs):
            self._stores.clear()  # no stage trains on images any more

    def _compute(self, boundary: str, split: str, key: dict, previous: str | None) -> Entry:
        if previous is None:
            fn, upstream = self._extractor(boundary), 0.0
            batches = self._store(split).batches(self._order(None, split)).map(lambda b: (b[IMAGE], b[LABEL]))
        else:
            source = self.entries[(previous, split)]
            fn, upstream = self._deriver(previous, boundary), source.info.get("seconds", 0.0)
            batches = gather_batches(self._order(None, split), {FEATURES: source.data, LABEL: source.labels})
            batches = batches.map(lambda b: (b[FEATURES], b[LABEL])).prefetch(tf.data.AUTOTUNE)

        def fill(data, labels):
            start, done, first = time.perf_counter(), 0, None
            progress = Progress(-(-len(labels) // self.batch_size), f"  caching {boundary} of {split}")
            for step, (inputs, batch_labels) in enumerate(batches, 1):
                out = fn(inputs).numpy()
                data[done: done + len(out)], labels[done: done + len(out)] = out, batch_labels.numpy()
                done += len(out)
                progress.update(step)
                if first is None:  # the first batch also traces the function: leave it out of the rate
                    first = (time.perf_counter() - start, done)
            progress.close()
            spent = time.perf_counter() - start
            self._spent += spent
            steady = (spent - first[0]) * done / (done - first[1]) if first and done > first[1] else spent
            # "seconds": what computing these rows from the images costs, i.e. what one epoch without the cache
            # pays for the frozen layers; the basis of the time-saved estimate, also in later runs.
            return {"seconds": upstream + steady, "computed_seconds": spent}

        return self.cache.build(key, self.counts[split], self._row_shape(boundary), np.float32, fill,
                                persist=self.mode != "off")

    def _extractor(self, boundary: str):
        if ("extract", boundary) not in self._functions:  # one trace serves train and val
            self._functions[("extract", boundary)] = frozen_forward(self.model, boundary, self.jit)
        return self._functions[("extract", boundary)]

    def _deriver(self, start: str, boundary: str):
        if (start, boundary) not in self._functions:
            between = folded_call(submodel(self.backbone, start, None if boundary == POOLED else boundary))
            pool = self.model.get_layer(POOLED) if boundary == POOLED else None

            signature = [tf.TensorSpec([None, *self._row_shape(start)], tf.float32)]

            @tf.function(jit_compile=self.jit, input_signature=signature)  # one trace for every batch size
            def derive(x):
                x = between(x)
                return pool(x) if pool is not None else x

            self._functions[(start, boundary)] = derive
        return self._functions[(start, boundary)]

    def _model_from(self, boundary: str) -> keras.Model:
        """Cached activations in, logits out, through the classifier's own layers above the boundary."""
        if boundary not in self._models:
            inputs = keras.Input(shape=self._row_shape(boundary), name=f"{boundary}_cached")
            x = inputs
            if boundary != POOLED:
                x = submodel(self.backbone, start=boundary, name=f"{self.backbone.name}_above_{boundary}")(x)
            for layer in head_layers(self.model):
                if not (boundary == POOLED and layer.name == POOLED):
                    x = layer(x)
            self._models[boundary] = keras.Model(inputs, x, name=f"{self.model.name}_from_{boundary}")
        return self._models[boundary]

    # -- keys -------------------------------------------------------------------------------------------------------
    def _key(self, boundary: str, split: str) -> dict:
        """Everything the cached values depend on; a change in any of them makes a different entry."""
        depth = self._depth(boundary)
        prefix_layers = self.backbone.layers[: depth + 1]
        preprocess = preprocess_layer(self.model).get_config()
        return {
            "kind": "features",
            "backbone": self.backbone_name,
            "boundary": boundary,
            "weights": _weights_digest(prefix_layers),
            "architecture": _digest(json.dumps([layer.get_config() for layer in prefix_layers], sort_keys=True,
                                               default=str).encode()),
            "image_size": self.image_size,
            "preprocessing": {k: preprocess[k] for k in ("mean", "std", "bgr")},
            "data": self.data_ids[split],
            "pipeline": PIPELINE_VERSION,
            "forward": "bn_folded",  # computed by folded_call: equal to float rounding, not bit for bit, to unfolded
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
            # half-precision compute gives other values (float32 entries keep their earlier keys)
            **({"compute_dtype": self.backbone.compute_dtype} if self.backbone.compute_dtype != "float32" else {}),
        }

    # -- reporting --------------------------------------------------------------------------------------------------
    def _describe(self, boundary: str, split: str, entry: Entry) -> str:
        what = "pooled features" if boundary == POOLED else f"{boundary} activations"
        shape = "x".join(str(d) for d in entry.data.shape[1:])
        how = ("reused from an earlier run, extraction skipped" if entry.reused
               else f"computed in {entry.info.get('computed_seconds', 0.0):.1f}s")
        return (f"cache: {what} of {split}: {entry.data.shape[0]} x {shape} float32, {format_size(entry.nbytes)} "
                f"in {entry.where()}; {how}")

    def log_summary(self, history) -> None:
        """One line: what training on cached activations saved, estimated from what computing them costs."""
        if not self.entries:
            return
        epochs_run: dict[str, int] = {}
        for result in history:
            epochs_run[result.stage] = epochs_run.get(result.stage, 0) + 1
        recompute = 0.0
        for stage, boundary in self.stage_boundary.items():
            if (boundary, "train") not in self.entries:  # finished before a resume
                continue
            per_epoch = sum(self.entries[(boundary, s)].info.get("seconds", 0.0) for s in SPLITS)
            recompute += epochs_run.get(stage, 0) * per_epoch
        total = sum(e.nbytes for e in self.entries.values())
        self.log(f"cache: {format_size(total)} cached; saved about {max(0.0, recompute - self._spent):.0f}s "
                 f"(estimate: {recompute:.0f}s of frozen-layer forward passes not repeated, {self._spent:.0f}s spent "
                 "computing the cache in this run)")


def frozen_forward(model: keras.Model, boundary: str = POOLED, jit: bool = False):
    """images float32 [B, S, S, 3] in 0..255 -> the classifier's activations at `boundary` (a backbone layer
    name, or POOLED), every layer in inference mode, BN folded into the convolutions: what the cache holds. The
    folded weights are those the model has now: make it again after they change."""
    backbone = backbone_of(model)
    preprocess = preprocess_layer(model)
    # BN folded into the convolutions (tfl.training.bn_folding): the same values, ~1.5x faster on Lite0
    prefix = folded_call(submodel(backbone, end=None if boundary == POOLED else boundary))
    pool = model.get_layer(POOLED) if boundary == POOLED else None

    signature = [tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)]

    @tf.function(jit_compile=jit, input_signature=signature)  # one trace for every batch size
    def extract(images):
        x = prefix(preprocess(images))
        return pool(x) if pool is not None else x

    return extract


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:24]


def _weights_digest(layers) -> str:
    digest = hashlib.sha256()
    for layer in layers:
        for weight in layer.weights:
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            digest.update(f"{weight.path}:{value.dtype}:{value.shape};".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()[:24]
