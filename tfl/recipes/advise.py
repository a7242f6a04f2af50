"""`tfl advise`: how deep to freeze, measured on the target data before any training.

    result = advise(AdviseOptions(dataset="digits/"))        # advise.json, advise.csv, advise.png in output_dir
    jobs.run(opts, recipe, log, resolve_depth=resolve_auto)   # how `tfl finetune --freeze-up-to auto` uses it

1. The data: examples per class, class balance, native image size against the backbone's input size.
2. One backbone pass, in inference mode, over a stratified sample of the training rows (--sample N), capturing at
   once the output of every canonical stage (stem, block1, ..., head), globally average pooled, and the per-channel
   mean and variance of every BatchNormalization layer's input. The pass is an ArrayCache entry keyed like the
   boundary cache's (backbone, weights and architecture digests, image size, preprocessing, the data's identity,
   the sample's rows): `tfl advise` and `tfl finetune --freeze-up-to auto` on the same data share it.
3. Per boundary (tfl.recipes.transferability): LogME and H-score on the whole sample, and the accuracy of a ridge
   linear probe fitted on 2/3 of it and scored on the held-out 1/3; each timed.
4. The BatchNorm domain gap: KL divergence between the target's activation statistics and the moving ones stored
   with the ImageNet weights, per layer, averaged per canonical stage.
5. The proxy (--proxy-epochs, default the planned run's --epochs; 0 turns it off): `tfl finetune`'s own
   two-stage recipe with the run's budget and train-better options (--augment, --ema ...), above every other
   boundary (and the pooled features), on at most --sample training rows, scored by its validation accuracy.
   With no more training rows than --sample it is the run itself at each depth, and the advice is a choice by
   validation accuracy. On a small val split (--proxy-folds auto: fewer than PROXY_SMALL_VAL examples) it is
   scored by stratified k-fold cross-validation over those train rows plus val (tfl.data.folds): k runs per
   depth, their mean, sd and standard error recorded. The frozen-feature scores rise with depth while
   fine-tuning above a boundary gains more the shallower it is, so they cannot rank depths
   (docs/results/advise.md); the proxy measures what they cannot: how much training above each boundary adds.
6. `recommend`: --freeze-up-to, input size, backbone learning rate and epochs, each with its reason in words.
   With the proxy: of the boundaries within one standard error of the best mean proxy accuracy, the one the tie
   rule (--proxy-tie-rule, TIE_RULES) picks; without: rules on the data size, the scores' peak and the BN gap.

The rules in `recommend` and their thresholds come from scripts/calibrate_advise.py (docs/results/advise.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import ClassVar

import numpy as np

from tfl import data
from tfl import job as jobs
from tfl.backbones import registry
from tfl.cache import ArrayCache, default_cache_dir, parse_size
from tfl.errors import UsageError
from tfl.job import ADVICE, AUTO, BACKBONE_LR_FACTOR, JobOptions
from tfl.options import (AUGMENTATION, CACHE_DIR_HELP, DEFAULT_PROXY_FOLDS, DEFAULT_TIE_RULE, PROXY_FOLDS_AUTO,
                         PROXY_SMALL_VAL, PROXY_TIE_BAND_SE, TIE_RULES as TIE_RULE_NAMES, TRAIN_BETTER, ProxyOptions,
                         all_but, option)
from tfl.recipes import runs, transferability
from tfl.recipes.stages import two_stage
from tfl.reporting import figures_transfer, table
from tfl.reporting.table import Column
from tfl.training import checkpoint, rundir, strategy as strategies

# The modules built on TensorFlow/Keras (tfl.models, tfl.freezing, tfl.precision, tfl.data.pipeline,
# tfl.training.boundary) are imported inside the functions that use them: every recipe imports this module for
# --freeze-up-to auto (through tfl.recipes.sweep), and the CLI imports the recipes to print --help.

ADVISE_JSON, ADVISE_CSV, ADVISE_PNG = "advise.json", "advise.csv", "advise.png"
FORMAT = 1  # of the cached pass; bump when what it holds changes
DEFAULT_SAMPLE = 1000
PROBE_HOLDOUT = 1 / 3  # of the sample, stratified, scores the linear probe
PASS_BATCH = 64
SCORES = ("logme", "h_score", "probe_accuracy")  # of the frozen features at a boundary, from the one pass
PROXY = "proxy_accuracy"  # val accuracy of a short two-stage fine-tune above the boundary
COLUMNS = ("boundary", "layer", "dim", *SCORES, PROXY, "proxy_sd", "proxy_se", "proxy_fold_accuracies", "bn_gap",
           "logme_seconds", "h_score_seconds", "probe_seconds", "proxy_seconds")

# -- the rules' thresholds (calibrated: see scripts/calibrate_advise.py and docs/results/advise.md) --
SMALL_PER_CLASS = 100  # below this many training examples per class the data is "small"
LARGE_PER_CLASS = 1000  # from this many it is "large"
SCORE_MARGIN = 0.02  # a shallower boundary must beat the pooled features by this share of the score range
# Mean BN KL over the first third of the stages above this: the low-level statistics differ (a different domain).
# Measured (Lite0, 64 px): Fashion-MNIST 0.38, inverted 0.44, 8x8 digits 0.44, all of which fine-tune best from
# the stem with 100+ images per class; no ImageNet-like set was at hand to measure the similar side.
BN_GAP_HIGH = 0.25
MIN_FINAL_MAP = 3  # upscale small images until the backbone's last feature map is at least this many pixels wide
PROXY_MARGIN_SE = PROXY_TIE_BAND_SE  # the tie rule chooses among the depths within this many standard errors
SMALL_DATA_BACKBONE_LR = 0.1  # x --lr for the backbone with small data (tfl's default is 0.3 x)


@dataclasses.dataclass
class AdviseOptions(JobOptions, ProxyOptions):
    unused: ClassVar = all_but("dataset", "data_dir", "val_split", "skip_bad_images", "image_size", "limit_train",
                               "label_fraction", "backbone", "weights", "head_epochs", "epochs", "batch_size", "lr",
                               "seed", "cache_budget", "cache_dir", "output_dir", *TRAIN_BETTER, *AUGMENTATION)
    option_help: ClassVar = {
        "label_fraction": "Advise for a seeded, stratified share of each class's training examples (as finetune's).",
        "weights": "'default' (the backbone's ImageNet weights) or a path to a weights file.",
        "head_epochs": "The planned run's head epochs (on cached features): the proxy's.",
        "epochs": "The planned run's fine-tune epochs: the proxy's, unless --proxy-epochs.",
        "batch_size": "The planned run's batch size: the proxy's.",
        "lr": "The head's learning rate: the proxy's, and the one the backbone-lr recommendation scales.",
        "seed": "Seeds the val split and the sample.",
        "cache_dir": ("Where the backbone pass persists (shared with `tfl finetune --freeze-up-to auto`)."
                      + CACHE_DIR_HELP),
        "output_dir": "Where advise.json, advise.csv and advise.png go (default: runs/<time>-advise-<dataset>)."}

    sample: int = option(DEFAULT_SAMPLE, check="positive", metavar="N", help=(
        "Training images scored, stratified by class (all when fewer); 1/3 of them test the linear probe. The proxy "
        "fine-tunes on at most this many."))
    proxy_epochs: int | None = option(None, check="non_negative", metavar="N", help=(
        "Proxy: above every other boundary (and the pooled features), finetune's two-stage recipe, --head-epochs "
        "then N fine-tune epochs, on at most --sample images, with the planned run's --augment, --ema ... options; "
        "scored on val or by --proxy-folds; of the depths within a standard error of the best, --proxy-tie-rule "
        f"picks one (default: {DEFAULT_TIE_RULE}). Default: --epochs (a shorter proxy ranks depths differently). 0: no "
        "proxy, rules on the scores decide."))


def check_sample(sample: int) -> None:
    if sample < 10:
        raise UsageError(f"--sample {sample}: must be at least 10 (a stratified sample of the training rows)")


# -- the command ---------------------------------------------------------------------------------------------------
def advise(opts: AdviseOptions, log=print) -> dict:
    """Score every freeze boundary of opts.backbone on opts.dataset and recommend a depth; writes advise.json,
    advise.csv and advise.png to opts.output_dir (default runs/<time>-advise-<dataset>) and returns advise.json's
    content plus output_dir."""
    check_sample(opts.sample)
    spec = registry.get(opts.backbone)
    if opts.label_fraction is not None:
        data.check_label_fraction(opts.label_fraction)
    splits = data.load_dataset(opts.dataset, data_dir=opts.data_dir, val_split=opts.val_split, seed=opts.seed,
                               skip_bad_images=opts.skip_bad_images, log=log)
    source, n_train, rows = _train_part(splits, opts)
    image_size = jobs.pick_image_size(opts.image_size, spec.input_size, splits.native_size)
    out = opts.output_dir or rundir.default_path("advise", opts.dataset)
    result = measure(opts, spec, splits, source, n_train, rows, image_size, log, proxy_root=os.path.join(out, "proxy"))
    runs.write(out, result, TABLES)
    log(f"advise: wrote {os.path.join(out, ADVISE_JSON)}, {ADVISE_CSV} and {ADVISE_PNG}")
    return {**result, "output_dir": out}


def resolve_auto(opts: JobOptions, spec, splits, source, n_train: int, rows, log=print,
                 strategy=None) -> tuple[JobOptions, dict]:
    """`--freeze-up-to auto`: measure, then return opts with freeze_up_to the recommended stage (and image_size
    the recommended size when --image-size was not given), and the advice to record as advice.json. The proxy
    runs go to a temporary directory; on a multi-worker `strategy` every worker takes the chief's depth."""
    sample = getattr(opts, "sample", DEFAULT_SAMPLE)
    check_sample(sample)
    recorded = _resumed_advice(opts)
    if recorded is not None:  # a resume keeps its advice (config.json then checks the depth is the same)
        resolved = recorded["resolved"]
        log(f"advise: --freeze-up-to auto -> {resolved['freeze_up_to'] or 'none'} at {resolved['image_size']}px, "
            f"as this run's {ADVICE} records (resuming)")
        return dataclasses.replace(opts, freeze_up_to=resolved["freeze_up_to"],
                                   image_size=opts.image_size or resolved["image_size"]), recorded
    image_size = jobs.pick_image_size(opts.image_size, spec.input_size, splits.native_size)
    scratch = tempfile.mkdtemp(prefix="tfl-advise-proxy-")
    try:
        advice = measure(opts, spec, splits, source, n_train, rows, image_size, log, proxy_root=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    chosen = advice["recommendation"]
    names = [row["boundary"] for row in advice["boundaries"]]
    index = names.index(chosen["freeze_up_to"]) if chosen["freeze_up_to"] in names else -1
    chief = strategies.chief_value(strategy, index + 1) - 1 if strategy is not None else index
    if chief != index:
        index = chief
        chosen = {**chosen, "freeze_up_to": names[index] if index >= 0 else None,
                  "reasons": {**chosen["reasons"], "freeze_up_to": "the chief worker's choice"}}
        advice["recommendation"] = chosen
    size = opts.image_size or chosen["image_size"]
    if size != image_size:  # scored at the default size; the run trains at the recommended one
        log(f"advise: images at {size}px instead of {image_size}px: {chosen['reasons']['image_size']}")
    log(f"advise: --freeze-up-to auto -> {chosen['freeze_up_to'] or 'none'}: {chosen['reasons']['freeze_up_to']}")
    advice = {"requested": AUTO, "resolved": {"freeze_up_to": chosen["freeze_up_to"], "image_size": size}, **advice}
    return dataclasses.replace(opts, freeze_up_to=chosen["freeze_up_to"], image_size=size), advice


def _resumed_advice(opts) -> dict | None:
    """The advice.json of the run being resumed in opts.output_dir (a checkpoint there, no --overwrite)."""
    if not opts.output_dir or opts.overwrite:
        return None
    path = os.path.join(opts.output_dir, ADVICE)
    if not (os.path.isfile(path) and checkpoint.has_checkpoint(os.path.join(opts.output_dir, rundir.CHECKPOINTS))):
        return None
    try:
        with open(path) as f:
            advice = json.load(f)
        return advice if isinstance(advice.get("resolved"), dict) and "freeze_up_to" in advice["resolved"] else None
    except (OSError, ValueError):
        return None  # unreadable: advise afresh; the resume then compares what it chose


def _train_part(splits, opts):
    n_train, rows = splits.num_examples["train"], jobs.train_rows(splits, opts)
    source = splits.train
    if rows is not None:
        source, n_train = data.take_rows(splits.train, n_train, rows), len(rows)
    return source, n_train, rows


# -- measuring -----------------------------------------------------------------------------------------------------
def measure(opts, spec, splits, source, n_train: int, rows, image_size: int, log=print,
            proxy_root: str | None = None) -> dict:
    """The data summary, the scores per boundary, the BN gap per stage, the proxy fine-tuning runs (under
    proxy_root, when --proxy-epochs > 0) and the recommendation (advise.json)."""
    started = time.time()
    labels = _train_labels(splits, source, rows)
    sample = stratified_sample(labels, getattr(opts, "sample", DEFAULT_SAMPLE), opts.seed)
    summary = data_summary(labels, splits, spec, image_size, len(sample))
    features, bn, boundaries, info = backbone_pass(opts, spec, splits, source, n_train, rows, sample, labels[sample],
                                                   image_size, log)
    sample_labels = labels[sample]
    fit, held = holdout_split(sample_labels, PROBE_HOLDOUT, opts.seed)
    scores = []
    for (stage, layer), block in zip(boundaries, features):
        row = {"boundary": stage, "layer": layer, "dim": int(block.shape[1])}
        row.update(score_boundary(block, sample_labels, fit, held))
        scores.append(row)
    gaps = stage_gaps(bn, spec)
    for row in scores:
        row["bn_gap"] = gaps.get(row["boundary"])
    stride = info["stride"]
    epochs = proxy_epochs(opts)
    proxy = None
    if epochs > 0 and proxy_root:
        # The proxy trains as the run will: at --image-size, else at the size the advice will recommend.
        size = opts.image_size or recommended_image_size(summary, stride, spec.input_size)[0]
        proxy = proxy_runs(opts, [row["boundary"] for row in scores], size, n_train, epochs, proxy_root, splits,
                           log)
        for row in scores:
            row.update(proxy_spread(proxy["folds"].get(row["boundary"]), proxy["settings"]))
            row["proxy_seconds"] = proxy["seconds"].get(row["boundary"])
    recommendation = recommend(summary, scores, gaps, stride, spec.input_size, opts.lr,
                               score=PROXY if proxy else "logme", proxy=proxy and proxy["settings"])
    result = {"dataset": splits.name, "backbone": opts.backbone, "image_size": image_size, "stride": stride,
              "lr": opts.lr, "data": summary,
              "sample": {"rows": len(sample), "probe_fit": len(fit), "probe_held_out": len(held), "seed": opts.seed},
              "proxy": proxy and proxy["settings"],
              "boundaries": scores, "bn_gap_per_stage": gaps, "recommendation": recommendation,
              "pass": {"reused": info["reused"], "seconds": round(info["seconds"], 2), "cache": info.get("path")},
              "seconds": round(time.time() - started, 2)}
    return result


def _train_labels(splits, source, rows) -> np.ndarray:
    if splits.train_labels is not None:
        labels = np.asarray(splits.train_labels)
        return labels[rows] if rows is not None else labels
    return data.labels_of(source)


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of about `size` rows, the same share of every class (at least 2 each, so the probe can
    hold one out), picked with `seed`; all rows when size >= len(labels)."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 14])
    share = size / len(labels)
    parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = min(len(members), max(2, int(math.floor(share * len(members) + 0.5))))
        parts.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(parts))


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held_out) positions: `fraction` of each class held out (at least one when a class has 2+ rows)."""
    rng = np.random.default_rng([seed, 15])
    fit, held = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        k = min(len(members) - 1, max(1, int(round(fraction * len(members))))) if len(members) > 1 else 0
        held.append(members[:k])
        fit.append(members[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def data_summary(labels, splits, spec, image_size: int, sample: int) -> dict:
    classes, counts = np.unique(labels, return_counts=True)
    per_class = {splits.class_names[int(c)]: int(n) for c, n in zip(classes, counts)}
    native = list(splits.native_size) if splits.native_size else None
    return {"train_examples": int(len(labels)), "num_classes": len(splits.class_names),
            "examples_per_class": per_class, "min_per_class": int(counts.min()), "max_per_class": int(counts.max()),
            "median_per_class": float(np.median(counts)), "balance": round(float(counts.min() / counts.max()), 4),
            "native_size": native, "backbone_input_size": spec.input_size, "image_size": image_size,
            "sample": sample}


def score_boundary(features: np.ndarray, labels: np.ndarray, fit: np.ndarray, held: np.ndarray) -> dict:
    row = {}
    start = time.perf_counter()
    row["logme"] = round(transferability.logme(features, labels), 6)
    row["logme_seconds"] = round(time.perf_counter() - start, 4)
    start = time.perf_counter()
    row["h_score"] = round(transferability.h_score(features, labels), 6)
    row["h_score_seconds"] = round(time.perf_counter() - start, 4)
    start = time.perf_counter()
    row["probe_accuracy"] = round(transferability.probe_accuracy(features[fit], labels[fit], features[held],
                                                                 labels[held]), 6)
    row["probe_seconds"] = round(time.perf_counter() - start, 4)
    return row


def proxy_epochs(opts) -> int:
    """The proxy's fine-tune epochs: --proxy-epochs, else the planned run's --epochs (`finetune --freeze-up-to
    auto`: its own). The budget must be the run's: with 2 epochs instead of 4, freezing more looked better on
    Fashion-MNIST at 100 per class, while with 4 the stem was best (docs/results/advise.md)."""
    epochs = getattr(opts, "proxy_epochs", None)
    return opts.epochs if epochs is None else epochs


def proxy_depths(names: list[str]) -> list[str]:
    """The boundaries the proxy fine-tunes above: every other one from the stem, and the pooled features."""
    picked = list(names[::2])
    if names and names[-1] not in picked:
        picked.append(names[-1])
    return picked


def proxy_runs(opts, names: list[str], image_size: int, n_train: int, epochs: int, root: str, splits, log) -> dict:
    """`tfl finetune`'s two-stage recipe above each of proxy_depths(names): --head-epochs on the frozen
    backbone (cached), then `epochs` fine-tune epochs, on at most --sample training rows (seeded), in float32,
    one device, everything else as opts (the train-better options included); each run directory under root.
    With k = proxy_fold_count(...) > 1 folds, every depth runs once per stratified fold of those rows plus the val
    split (tfl.data.folds), the same folds for every depth, under root/<depth>/fold<i>. Returns the best val
    accuracy per boundary and fold, the seconds, and the settings (advise.json "proxy")."""
    from tfl.data import folds as kfold
    from tfl.precision import untouched_random_state  # Keras (see the top)

    rows = min(n_train, getattr(opts, "sample", DEFAULT_SAMPLE))
    val_examples = int(splits.num_examples.get("val", 0))
    base = runs.derive(runs.job_options(opts), image_size=image_size, epochs=epochs,
                       limit_train=rows if rows < n_train else opts.limit_train, mixed_precision="off",
                       strategy="default", devices=None, worker_hosts=(), task_index=None, export=False,
                       tensorboard=False, overwrite=True)
    requested = getattr(opts, "proxy_folds", PROXY_FOLDS_AUTO)
    views, pool, fold_rows = [None], None, None
    k = proxy_fold_count(requested, val_examples)
    if k > 1:
        train_rows = jobs.train_rows(splits, base)  # the proxy's rows, as a single run would pick them
        labels = kfold.pool_labels(splits, train_rows)
        if requested == PROXY_FOLDS_AUTO:  # auto never fails on a class too small to split k ways
            smallest = int(np.unique(labels, return_counts=True)[1].min()) if len(labels) else 1
            k = max(1, min(k, smallest))
        if k > 1:
            held = kfold.stratified_folds(labels, k, opts.seed)
            # A fold trains on at most as many images as the run (the budget must be the run's: a larger val
            # split would otherwise give the proxy more training data than the run has), a stratified sample.
            trains = [fold_train(labels, h, rows, opts.seed) for h in held]
            views = [lambda s, h=h, t=t: kfold.fold_splits(s, train_rows, h, t) for h, t in zip(held, trains)]
            fold_rows = [len(t) for t in trains]
            pool = len(labels)
            # the fold picks the rows: the run itself must not subset them again
            base = dataclasses.replace(base, limit_train=None, label_fraction=None)
    accuracy: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    depths = proxy_depths(names)
    scored = (f"mean of {k} stratified folds of {pool:,} train+val images" if pool else
              f"on {val_examples:,} val images")
    log(f"advise: proxy fine-tuning above {len(depths)} boundaries ({', '.join(depths)}): {opts.head_epochs} head + "
        f"{epochs} fine-tune epochs on {rows:,} training images at {image_size}px each, scored {scored}")
    for i, depth in enumerate(depths, 1):
        accuracy[depth], seconds[depth] = [], 0.0
        for f, view in enumerate(views):
            folder = os.path.join(root, depth, f"fold{f}") if pool else os.path.join(root, depth)
            run = runs.Run(f"proxy {depth}", runs.derive(base, freeze_up_to=depth, output_dir=folder), two_stage,
                           {"recipe": "advise_proxy", **({"fold": f, "folds": k} if pool else {})}, data_view=view)
            with untouched_random_state():  # the advised run itself starts from the same random state as without
                metrics, took = runs.train(run, log=lambda message: None, fresh=False)
            accuracy[depth].append(metrics["val_accuracy"])
            seconds[depth] = round(seconds[depth] + took, 1)
        spread = proxy_spread(accuracy[depth], {"val_examples": val_examples, "pool_rows": pool})
        log(f"advise: proxy {i}/{len(depths)}: --freeze-up-to {depth}: val accuracy {spread[PROXY]:.4f}"
            + (f" ± {spread['proxy_se']:.4f} (folds {', '.join(f'{a:.3f}' for a in accuracy[depth])})" if pool else "")
            + f" ({seconds[depth]:.0f}s)")
    defaults = {f.name: f.default for f in dataclasses.fields(JobOptions)}
    applied = {name: getattr(base, name) for name in dict.fromkeys((*TRAIN_BETTER, *AUGMENTATION))
               if getattr(base, name) != defaults[name] or name == "lr"}
    settings = {"depths": depths, "image_size": image_size, "head_epochs": opts.head_epochs, "epochs": epochs,
                "train_rows": rows, "batch_size": opts.batch_size, "lr": opts.lr,
                "backbone_lr": opts.backbone_lr if opts.backbone_lr is not None else opts.lr * BACKBONE_LR_FACTOR,
                "seed": opts.seed, "val_examples": val_examples, "folds": k if pool else 1,
                "folds_requested": requested, "pool_rows": pool, "fold_train_rows": fold_rows,
                "tie_rule": getattr(opts, "proxy_tie_rule", DEFAULT_TIE_RULE), "tie_band_se": PROXY_TIE_BAND_SE,
                "applied": applied, "runs": root}
    return {"folds": accuracy, "seconds": seconds, "settings": settings}


def fold_train(labels: np.ndarray, held: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """The pool positions a fold trains on: every one outside `held`, or a stratified sample of `cap` of them
    when there are more (the proxy trains on as many images as the run, whatever the val split adds)."""
    rest = np.setdiff1d(np.arange(len(labels)), held)
    if len(rest) <= cap:
        return rest
    return rest[stratified_sample(labels[rest], cap, seed)]


def proxy_fold_count(requested, val_examples: int) -> int:
    """--proxy-folds: a number as given; auto: DEFAULT_PROXY_FOLDS when the val split has fewer than
    PROXY_SMALL_VAL examples (its binomial standard error is then larger than the gaps between depths), else 1."""
    if requested == PROXY_FOLDS_AUTO:
        return DEFAULT_PROXY_FOLDS if val_examples < PROXY_SMALL_VAL else 1
    return int(requested)


def binomial_se(accuracy: float, n: int) -> float:
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(1, int(n or 0)))


def proxy_spread(folds: list[float] | None, settings: dict | None) -> dict:
    """A depth's proxy row: every fold's val accuracy, their mean, sd and standard error. The standard error is
    the larger of sd / sqrt(k) and the binomial one of the mean on the rows scored (all of the pool over k folds,
    the val split for one score): k = 3 fold scores can agree by chance, and cannot be surer than that many
    examples allow. None (no proxy at this boundary): every entry None."""
    if not folds:
        return {PROXY: None, "proxy_sd": None, "proxy_se": None, "proxy_fold_accuracies": None}
    values = np.asarray(folds, np.float64)
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    settings = settings or {}
    scored = settings.get("pool_rows") if len(values) > 1 else settings.get("val_examples")
    se = max(sd / math.sqrt(len(values)), binomial_se(mean, scored))
    return {PROXY: round(mean, 6), "proxy_sd": round(sd, 6) if len(values) > 1 else None, "proxy_se": round(se, 6),
            "proxy_fold_accuracies": [round(float(v), 6) for v in values]}


def stage_boundaries(spec, backbone) -> list[tuple[str, str]]:
    """(canonical stage, the layer that ends it) for every stage with layers, in order: where --freeze-up-to
    STAGE cuts. The last is the backbone's output (the pooled features)."""
    from tfl.freezing import resolve_up_to  # Keras (see the top)

    names = [layer.name for layer in backbone.layers]
    out, seen = [], set()
    for stage in spec.stage_names:
        index = resolve_up_to(spec, names, stage)
        if index < 0 or index in seen or spec.stage_of(names[index]) != stage:
            continue
        seen.add(index)
        out.append((stage, names[index]))
    return out


def backbone_pass(opts, spec, splits, source, n_train, rows, sample, sample_labels, image_size, log):
    """Pooled features per boundary ([len(sample), dim] each) and BN statistics, from the cache or one pass."""
    import keras

    from tfl import models  # Keras (see the top)
    from tfl.training import boundary as cache_keys

    keras.utils.set_random_seed(opts.seed)
    model = models.build_classifier(opts.backbone, len(splits.class_names), image_size, opts.weights)
    backbone = models.backbone_of(model)
    boundaries = stage_boundaries(spec, backbone)
    bn_layers = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    preprocess = models.preprocess_layer(model).get_config()
    subset = cache_keys.rows_digest(rows) if rows is not None else None
    key = {"kind": "advise", "format": FORMAT, "backbone": opts.backbone,
           "weights": cache_keys._weights_digest(backbone.layers),
           "architecture": cache_keys._digest(json.dumps([layer.get_config() for layer in backbone.layers],
                                                         sort_keys=True, default=str).encode()),
           "image_size": image_size, "preprocessing": {k: preprocess[k] for k in ("mean", "std", "bgr")},
           "data": cache_keys.data_identity(splits.fingerprint, "train", subset),
           "sample": cache_keys.rows_digest(sample), "boundaries": [b for _, b in boundaries],
           "pipeline": cache_keys.PIPELINE_VERSION}
    cache = ArrayCache(opts.cache_dir or default_cache_dir(), parse_size(opts.cache_budget), log=log)
    dims = [int(backbone.get_layer(layer).output.shape[-1]) for _, layer in boundaries]
    final = backbone.output.shape[1]
    stride = int(round(image_size / final)) if final else 32
    entry = cache.lookup(key)
    if entry is not None:
        log(f"advise: the backbone pass over {len(sample)} sample images reused from {entry.path}")
        info = {**entry.info, "reused": True, "path": entry.path}
    else:
        def fill(out, labels):
            return _run_pass(model, backbone, boundaries, bn_layers, source, n_train, sample, image_size, out,
                             labels, log)

        problem = cache.can_store(len(sample) * sum(dims) * 4)
        if problem:
            raise UsageError(f"advise: the sample's features cannot be held: {problem}")
        entry = cache.build(key, len(sample), (sum(dims),), np.float32, fill)
        info = {**entry.info, "reused": False, "path": entry.path}
    if not np.array_equal(np.asarray(entry.labels), sample_labels):
        raise UsageError("advise: the cached pass's labels differ from the data's; delete it: " + str(entry.path))
    stacked = np.asarray(entry.data, np.float64)
    blocks, start = [], 0
    for dim in dims:
        blocks.append(stacked[:, start: start + dim])
        start += dim
    bn = {name: {k: np.asarray(v) for k, v in stats.items()} for name, stats in info["bn"].items()}
    return blocks, bn, boundaries, {**info, "stride": stride}


def _run_pass(model, backbone, boundaries, bn_layers, source, n_train, sample, image_size, out, labels, log) -> dict:
    import keras
    import tensorflow as tf

    from tfl import models  # Keras (see the top)
    from tfl.data.pipeline import fill_images, stored_shape, to_model_input

    started = time.perf_counter()
    picked = data.take_rows(source, n_train, sample)
    images = np.empty((len(sample), *stored_shape(source, image_size)), np.uint8)
    fill_images(picked, image_size, images, labels)
    taps = [backbone.get_layer(layer).output for _, layer in boundaries] + [layer.input for layer in bn_layers]
    probe = keras.Model(backbone.input, taps, name=f"{backbone.name}_advise")
    preprocess = models.preprocess_layer(model)
    count = len(boundaries)

    @tf.function(input_signature=[tf.TensorSpec([None, *images.shape[1:]], tf.uint8)])
    def step(batch):
        x = preprocess(to_model_input(batch, image_size))
        outs = probe(x, training=False)
        # Mean over every axis between batch and channels: a CNN's [b, h, w, c] map, a ViT's [b, tokens, c] sequence.
        pooled = tf.concat([tf.reduce_mean(o, axis=list(range(1, o.shape.rank - 1))) for o in outs[:count]], axis=1)
        sums = [tf.reduce_sum(tf.cast(o, tf.float64), axis=[0, 1, 2]) for o in outs[count:]]
        squares = [tf.reduce_sum(tf.square(tf.cast(o, tf.float64)), axis=[0, 1, 2]) for o in outs[count:]]
        return pooled, sums, squares  # a backbone without BatchNorm has no statistics: two empty lists

    sums = [np.zeros(int(layer.input.shape[-1])) for layer in bn_layers]
    squares = [np.zeros_like(s) for s in sums]
    for begin in range(0, len(sample), PASS_BATCH):
        pooled, s, q = step(images[begin: begin + PASS_BATCH])
        out[begin: begin + len(pooled)] = pooled.numpy()
        for i in range(len(bn_layers)):
            sums[i] += s[i].numpy()
            squares[i] += q[i].numpy()
    bn = {}
    for i, layer in enumerate(bn_layers):
        shape = layer.input.shape
        n = len(sample) * int(shape[1]) * int(shape[2])
        mean = sums[i] / n
        var = np.maximum(squares[i] / n - mean**2, 0.0)
        bn[layer.name] = {"mean": mean.tolist(), "var": var.tolist(),
                          "moving_mean": np.asarray(layer.moving_mean.numpy(), np.float64).tolist(),
                          "moving_var": np.asarray(layer.moving_variance.numpy(), np.float64).tolist(),
                          "epsilon": float(layer.epsilon)}
    seconds = time.perf_counter() - started
    log(f"advise: one backbone pass over {len(sample)} sample images at {image_size}px ({len(boundaries)} boundaries, "
        f"{len(bn_layers)} BN layers) in {seconds:.1f}s")
    return {"seconds": seconds, "bn": bn}


def stage_gaps(bn: dict, spec) -> dict:
    """Canonical stage -> mean over its BN layers of the per-layer gap (transferability.bn_gap)."""
    per_stage: dict[str, list[float]] = {}
    for name, s in bn.items():
        stage = spec.stage_of(name) or "unstaged"
        gap = transferability.bn_gap(s["mean"], s["var"], s["moving_mean"], s["moving_var"],
                                     float(s.get("epsilon", 1e-3)))
        per_stage.setdefault(stage, []).append(gap)
    return {stage: round(float(np.mean(v)), 6) for stage, v in per_stage.items()}


# -- the rules -----------------------------------------------------------------------------------------------------
def recommend(summary: dict, scores: list[dict], gaps: dict, stride: int, input_size: int, lr: float,
              score: str = "logme", proxy: dict | None = None, tie_rule: str | None = None,
              band_se: float = PROXY_MARGIN_SE) -> dict:
    """--freeze-up-to, image size, backbone lr and epochs, with reasons. Pure: summary (data_summary), scores
    (one row per boundary, stem first, the pooled features last), gaps (stage -> BN gap), stride (input pixels per
    pixel of the backbone's last feature map), input_size (the backbone's), lr (the head's). score=PROXY: the
    rows' proxy accuracies decide the depth (proxy_depth, by `tie_rule`, default the one `proxy` records;
    `proxy` is advise.json's "proxy" settings); any other score drives the rules below."""
    if not scores:
        raise UsageError("recommend needs the scores of at least one boundary")
    names = [row["boundary"] for row in scores]
    if score == PROXY:
        chosen = proxy_depth(summary, scores, gaps, proxy, tie_rule, band_se)
        return _with_size_lr_epochs(summary, stride, input_size, lr, chosen, proxy)
    values = np.array([row[score] for row in scores], np.float64)
    top = len(names) - 1
    per_class = summary["median_per_class"]
    small, large = per_class < SMALL_PER_CLASS, per_class >= LARGE_PER_CLASS
    size_word = data_size(per_class)
    spread = float(values.max() - values.min()) or 1.0
    best = int(np.argmax(values))
    # The pooled features win unless a shallower boundary beats them clearly (scores are noisy on small samples).
    if values[best] - values[top] <= SCORE_MARGIN * spread:
        best = top
    low_level_gap = low_level_bn_gap(names, gaps)
    different = best < top or low_level_gap > BN_GAP_HIGH
    data_words = (f"{summary['train_examples']:,} images, {summary['num_classes']} classes "
                  f"({per_class:g} per class: {size_word} data)")
    trend = (f"{score} peaks at the pooled features ({names[top]})" if best == top else
             f"{score} peaks at {names[best]} ({values[best]:.3f}) and falls to {values[top]:.3f} at the pooled "
             "features: the top stages are specialised to ImageNet")
    gap_words = (f"the BN statistics of the early stages shift {'much' if low_level_gap > BN_GAP_HIGH else 'little'} "
                 f"(mean KL {low_level_gap:.2f}, threshold {BN_GAP_HIGH:g})")
    if not different:
        domain = "similar domain"
        if small:
            depth, action = top, "head only"
        elif large:
            depth, action = max(0, top - 4), "fine-tune the upper half"
        else:
            depth, action = max(0, top - 2), "fine-tune the top"
    else:
        domain = "different domain"
        depth = best
        if large:
            depth, action = -1, "fine-tune everything from the pretrained weights"
        elif small:  # calibrated: Fashion-MNIST at 10 per class lost 10 points with the head only
            depth = max(0, min(best, top - 2))
            action = f"train above {names[depth]} (the best boundary {names[best]}, and never the head alone)"
        else:  # calibrated: with 100+ per class fine-tuning from the first stage beat every deeper freeze
            depth, action = 0, f"fine-tune everything above {names[0]}"
    freeze = names[depth] if depth >= 0 else None
    return _with_size_lr_epochs(summary, stride, input_size, lr, {
        "freeze_up_to": freeze, "score": score, "best_boundary": names[best], "domain": domain,
        "data_size": size_word, "low_level_bn_gap": round(low_level_gap, 6),
        "reasons": {"freeze_up_to": f"{data_words}; {trend} and {gap_words}: {domain}, {size_word} data -> {action}"}})


def data_size(per_class: float) -> str:
    return "small" if per_class < SMALL_PER_CLASS else ("large" if per_class >= LARGE_PER_CLASS else "medium-sized")


def low_level_bn_gap(names: list[str], gaps: dict) -> float:
    """The mean BN gap over the first third of the stages (the low-level statistics)."""
    early = [gaps[s] for s in names[: max(1, len(names) // 3)] if gaps.get(s) is not None]
    return float(np.mean(early)) if early else 0.0


# The tie rules: of the candidate depths (positions in the proxy's rows, shallow to deep, each within the band of
# the best mean), which to take. Pure functions of (candidates, means); names in tfl.options.TIE_RULES.
def _best_mean(candidates: list[int], means: list) -> int:
    return max(candidates, key=lambda i: (means[i], i))  # exact ties: the deeper


def _deepest(candidates: list[int], means: list) -> int:  # Breiman's one-standard-error rule: freeze the most
    return max(candidates)


def _shallowest(candidates: list[int], means: list) -> int:  # train the most layers the data cannot rule out
    return min(candidates)


def _middle(candidates: list[int], means: list) -> int:  # the median depth (of two, the deeper)
    return sorted(candidates)[len(candidates) // 2]


TIE_RULES = {"best_mean": _best_mean, "deepest": _deepest, "shallowest": _shallowest, "middle": _middle}
if tuple(TIE_RULES) != TIE_RULE_NAMES:  # the CLI's choices come from tfl.options; the functions live here
    raise ImportError("tfl.recipes.advise.TIE_RULES and tfl.options.TIE_RULES disagree")


def choose_depth(means: list, ses: list, rule: str = DEFAULT_TIE_RULE,
                 band_se: float = PROXY_TIE_BAND_SE) -> tuple[int, int, list[int]]:
    """(chosen, best, candidates): positions in `means` (None: not tried). best has the highest mean (ties: the
    deeper); candidates are the tried positions whose mean is within band_se x the best's standard error of it;
    `rule` (a TIE_RULES name) picks one of them."""
    if rule not in TIE_RULES:
        raise UsageError(f"--proxy-tie-rule {rule!r} is not one of {', '.join(TIE_RULES)}")
    tried = [i for i, m in enumerate(means) if m is not None]
    if not tried:
        raise UsageError(f"recommend(score={PROXY!r}) needs rows with {PROXY}")
    best = _best_mean(tried, means)
    band = band_se * float(ses[best] or 0.0)
    candidates = [i for i in tried if means[i] >= means[best] - band - 1e-12]
    return TIE_RULES[rule](candidates, means), best, candidates


def proxy_depth(summary: dict, scores: list[dict], gaps: dict, proxy: dict | None, tie_rule: str | None = None,
                band_se: float = PROXY_MARGIN_SE) -> dict:
    """The depth from the proxy's rows: each row's mean and standard error recomputed from its fold accuracies
    (proxy_spread; an advise.json from before folds: its one accuracy, the binomial standard error on the val
    split), then choose_depth with `tie_rule` (default: the one advise.json's proxy settings record, else
    DEFAULT_TIE_RULE, whose calibration tfl.options records)."""
    settings = proxy or {}
    rule = tie_rule or settings.get("tie_rule") or DEFAULT_TIE_RULE
    names = [row["boundary"] for row in scores]
    spreads = [proxy_spread(row.get("proxy_fold_accuracies") or ([row[PROXY]] if row.get(PROXY) is not None
                                                                   else None), settings) for row in scores]
    means = [sp[PROXY] for sp in spreads]
    ses = [sp["proxy_se"] for sp in spreads]
    depth, best_i, candidates = choose_depth(means, ses, rule, band_se)
    best, se = means[best_i], ses[best_i]
    per_class = summary["median_per_class"]
    size_word = data_size(per_class)
    low_level_gap = low_level_bn_gap(names, gaps)
    measured = ", ".join(f"{names[i]} {means[i]:.3f}" + (f" ± {ses[i]:.3f}" if len(spreads[i][
        "proxy_fold_accuracies"]) > 1 else "") for i in range(len(names)) if means[i] is not None)
    rows = settings.get("train_rows")
    budget = (f"{settings.get('head_epochs', '?')} head + {settings.get('epochs', '?')} fine-tune epochs on "
              f"{rows:,} images" if rows else "a short fine-tune")
    folds = settings.get("folds") or 1
    scored = (f"mean ± standard error of {folds} folds of {settings['pool_rows']:,} train+val images"
              if folds > 1 and settings.get("pool_rows") else "val accuracy")
    tied = [names[i] for i in candidates]
    if depth == best_i and len(tied) == 1:
        pick = f"{names[depth]} is best"
    elif depth == best_i:
        pick = (f"{names[depth]} is best; {', '.join(t for t in tied if t != names[depth])} within "
                f"{band_se:g} standard error ({se:.3f}) of it; tie rule {rule}: {names[depth]}")
    else:
        pick = (f"the best is {names[best_i]}; {', '.join(tied)} are within {band_se:g} standard error ({se:.3f}) "
                f"of it; tie rule {rule}: {names[depth]}, {best - means[depth]:.3f} below it")
    larger = rows is not None and rows < summary["train_examples"]
    reason = (f"{summary['train_examples']:,} images, {summary['num_classes']} classes ({per_class:g} per class: "
              f"{size_word} data); proxy fine-tuning ({budget}), {scored} per --freeze-up-to: {measured}; "
              f"{pick} -> --freeze-up-to {names[depth]}"
              + (f" (measured on {rows:,} of the {summary['train_examples']:,} images: with all of them, freezing "
                 "less tends to gain more)" if larger else ""))
    domain = "different domain" if low_level_gap > BN_GAP_HIGH else "similar domain"
    return {"freeze_up_to": names[depth], "score": PROXY, "best_boundary": names[best_i], "domain": domain,
            "data_size": size_word, "low_level_bn_gap": round(low_level_gap, 6), "proxy_standard_error": se,
            "tie_rule": rule, "tied": tied, "reasons": {"freeze_up_to": reason}}


def recommended_image_size(summary: dict, stride: int, input_size: int) -> tuple[int, str]:
    """Small images are upscaled until the backbone's last feature map is MIN_FINAL_MAP pixels wide (and at least
    4x); others keep the size they were scored at. Returns (size, reason)."""
    native = summary.get("native_size")
    if native and max(native) * 4 <= input_size:
        wanted = min(input_size, max(4 * max(native), MIN_FINAL_MAP * stride))
        return wanted, (f"{max(native)}px images: {wanted}px gives the backbone's last feature map "
                        f"{wanted // stride}x{wanted // stride} pixels (stride {stride}; at least {MIN_FINAL_MAP} "
                        "wide, at least 4x upscaled)")
    return summary["image_size"], f"the images are large enough: {summary['image_size']}px"


def _with_size_lr_epochs(summary: dict, stride: int, input_size: int, lr: float, chosen: dict,
                         proxy: dict | None = None) -> dict:
    """The depth's recommendation plus the input size, backbone lr and epochs. After a proxy: its own budget and
    rates, which the depth was measured with; else rules on the data size."""
    reasons = dict(chosen["reasons"])
    per_class = summary["median_per_class"]
    small = per_class < SMALL_PER_CLASS
    image_size, reasons["image_size"] = recommended_image_size(summary, stride, input_size)
    if proxy and proxy.get("epochs") is not None and proxy.get("backbone_lr") is not None:
        reasons["backbone_lr"] = reasons["epochs"] = "the proxy's, which the depth was measured with"
        return {**chosen, "image_size": int(image_size), "backbone_lr": proxy["backbone_lr"],
                "head_epochs": proxy["head_epochs"], "epochs": proxy["epochs"], "reasons": reasons}
    factor = SMALL_DATA_BACKBONE_LR if small else 0.3
    epochs = 5 if small else 2
    reasons["backbone_lr"] = (f"{factor:g} x --lr" + (": few examples per class, small steps keep the pretrained "
                                                      "features" if small else ": tfl's default"))
    reasons["epochs"] = ("10 head epochs (cached, seconds each), then " + str(epochs) + " fine-tune epochs"
                         + (" (small data: more passes)" if small else ""))
    return {**chosen, "image_size": int(image_size), "backbone_lr": lr * factor, "head_epochs": 10, "epochs": epochs,
            "reasons": reasons}


# -- outputs -------------------------------------------------------------------------------------------------------
TABLES = runs.Tables(ADVISE_JSON, {ADVISE_CSV: (COLUMNS, lambda result: result["boundaries"])},
                     lambda folder, result: figures_transfer.write_advise(result, folder.file(ADVISE_PNG)))


TABLE = (Column("boundary", "boundary"), Column("dim", "dim"), Column("LogME", "logme", ".4f"),
         Column("H-score", "h_score", ".3f"), Column("probe acc", "probe_accuracy", ".3f"),
         Column("proxy acc ± se", lambda r: None if r.get(PROXY) is None else (
             f"{r[PROXY]:.3f}" + (f" ± {r['proxy_se']:.3f}" if r.get("proxy_se") is not None else ""))),
         Column("BN gap", "bn_gap", ".3f"),
         Column("seconds", lambda r: r["logme_seconds"] + r["h_score_seconds"] + r["probe_seconds"]
                + (r.get("proxy_seconds") or 0), ".2f"))


def format_table(result: dict) -> str:
    lines = [table.format_table(TABLE, result["boundaries"])]
    rec = result["recommendation"]
    d = result["data"]
    lines.append("")
    lines.append(f"data: {d['train_examples']:,} train images, {d['num_classes']} classes, {d['min_per_class']}-"
                 f"{d['max_per_class']} per class (balance {d['balance']:.2f}), native "
                 f"{'x'.join(map(str, d['native_size'])) if d['native_size'] else 'mixed'} px, scored at "
                 f"{result['image_size']}px on {result['sample']['rows']} sampled images (pass "
                 f"{'reused' if result['pass']['reused'] else 'computed'}, {result['pass']['seconds']:.1f}s)")
    lines.append(f"recommendation: --freeze-up-to {rec['freeze_up_to'] or 'none'} --image-size {rec['image_size']} "
                 f"--backbone-lr {rec['backbone_lr']:g} --head-epochs {rec['head_epochs']} --epochs {rec['epochs']}")
    for what, why in rec["reasons"].items():
        lines.append(f"  {what}: {why}")
    return "\n".join(lines)
