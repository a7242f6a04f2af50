"""`tfl fewshot`: N-way K-shot episodes on frozen features, a prototype classifier vs a linear head.

Features: the backbone's pooled features (the classifier's head_pool output, inference mode) of one split, cached
like every boundary cache (tfl.training.boundary: one backbone pass, reused by later runs and by tfl finetune's
head stage on the same data).

Episodes (EpisodeSampler): episode i draws --ways classes, then per class a seeded permutation of its rows: the
first --queries rows are the queries, the next K rows the support set. The draw depends on (seed, i) only, so for
one episode index every K has the same classes and queries, and the 1-shot support is part of the 5-shot one: the
K's and the methods are compared on the same episodes (paired). A class with fewer than max(K) + --queries rows
stops the run before any episode with an error naming it.

Methods, both on the same features:
  prototype  Snell et al. 2017 with cosine similarity: a class's prototype is the mean of its support features;
             a query goes to the prototype of highest cosine similarity. No training.
  linear     a new linear softmax head on the L2-normalised support features (Chen et al. 2019, "A Closer Look at
             Few-shot Classification": Baseline), zero-initialised, --head-steps full-batch gradient steps at
             --head-lr with weight decay --head-decay; the backbone stays frozen.

Reported per (K, method): mean query accuracy over the episodes and its 95 % interval, mean ± 1.96 sd / sqrt(n)
(normal approximation, as the few-shot literature reports it). fewshot.json (settings, per-class row counts,
results, every episode's accuracies), fewshot.csv (one row per K and method), fewshot_episodes.csv and
fewshot.png go into the output directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import ClassVar

import numpy as np

from tfl.errors import UsageError
from tfl.job import JobOptions
from tfl.options import CACHE_DIR_HELP, SPLITS, all_but, check_options as check_fields, option
from tfl.recipes import sweep
from tfl.reporting import figures_transfer, table
from tfl.reporting.table import Column

FEWSHOT_JSON, FEWSHOT_CSV, EPISODES_CSV, FEWSHOT_PNG = ("fewshot.json", "fewshot.csv", "fewshot_episodes.csv",
                                                         "fewshot.png")
METHODS = ("prototype", "linear")
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


@dataclasses.dataclass
class FewShotOptions(JobOptions):
    unused: ClassVar = all_but("dataset", "data_dir", "val_split", "skip_bad_images", "image_size", "limit_train",
                               "backbone", "weights", "seed", "batch_size", "cache", "cache_budget", "cache_dir",
                               "output_dir")
    # Nothing is trained: --batch-size is only the feature pass's batch, so a train split smaller than it is fine
    # (Job.setup skips its check) and the episodes' own check, which names a short class, is the one a user meets.
    trains: ClassVar = False
    option_help: ClassVar = {
        "seed": "Seeds the val split and the episodes.", "batch_size": "Images per batch of the feature pass.",
        "weights": "'default' (the backbone's ImageNet weights), 'none' (random init) or a path to a weights file.",
        "cache": "on/auto: the pooled features persist in --cache-dir and later runs reuse them; off: not kept.",
        "cache_dir": "Where the features persist." + CACHE_DIR_HELP,
        "output_dir": ("Where fewshot.json/.csv, fewshot_episodes.csv and fewshot.png go (default: "
                       "runs/<time>-fewshot-<dataset>).")}

    ways: int = option(5, check=(2, None, False, False), metavar="N", help="Classes per episode.")
    shots: tuple[int, ...] = option((1, 5), check="positive", metavar="K[,K]", help=(
        "Support images per class; one result per K, on the same episodes."))
    queries: int = option(15, check="positive", metavar="Q", help="Query images per class and episode.")
    episodes: int = option(600, check="positive", help="Episodes per K.")
    split: str = option("test", choices=SPLITS, help="The split the episodes are drawn from.")
    head_steps: int = option(100, check="positive",
                             help="linear: full-batch gradient steps of the head on the support set.")
    head_lr: float = option(1.0, check="positive", help="linear: the head's learning rate (on L2-normalised features).")
    head_decay: float = option(1e-3, check="non_negative", help="linear: L2 weight decay of the head.")


# -- the sampler -------------------------------------------------------------------------------------------------------
class EpisodeSampler:
    """N-way K-shot episodes over rows with `labels`; see the module doc for the draw."""

    def __init__(self, labels: np.ndarray, class_names: list[str], ways: int, shots: int, queries: int, seed: int,
                 where: str = "the split"):
        labels = np.asarray(labels)
        self.class_names, self.ways, self.shots, self.queries, self.seed = class_names, ways, shots, queries, seed
        if ways < 2:
            raise UsageError(f"--ways {ways}: an episode needs at least 2 classes")
        if ways > len(class_names):
            raise UsageError(f"--ways {ways}: {where} has only {len(class_names)} classes; lower --ways")
        if shots < 1 or queries < 1:
            raise UsageError(f"--shots {shots} / --queries {queries}: each must be >= 1")
        self.members = [np.flatnonzero(labels == c).astype(np.int64) for c in range(len(class_names))]
        need = shots + queries
        short = [(class_names[c], len(m)) for c, m in enumerate(self.members) if len(m) < need]
        if short:
            listed = ", ".join(f"{name!r} has {n}" for name, n in short)
            raise UsageError(f"{'class' if len(short) == 1 else 'classes'} {listed} image(s) in {where}, fewer than "
                             f"--shots {shots} + --queries {queries} = {need}; lower --shots or --queries, or add "
                             "images to that class")

    def episode(self, index: int, shots: int | None = None):
        """(classes [ways], support rows [ways * K], support labels 0..ways-1, query rows, query labels)."""
        shots = self.shots if shots is None else shots
        rng = np.random.default_rng([self.seed, index])
        classes = np.sort(rng.choice(len(self.class_names), self.ways, replace=False))
        support, query = [], []
        for c in classes:
            order = rng.permutation(self.members[c])
            query.append(order[: self.queries])
            support.append(order[self.queries: self.queries + shots])
        ways = np.arange(self.ways, dtype=np.int32)
        return (classes, np.concatenate(support), np.repeat(ways, shots), np.concatenate(query),
                np.repeat(ways, self.queries))


# -- the classifiers ---------------------------------------------------------------------------------------------------
def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototype_predict(support: np.ndarray, support_y: np.ndarray, query: np.ndarray, ways: int) -> np.ndarray:
    """Class of each query: the prototype (class mean of the support features) of highest cosine similarity."""
    prototypes = np.stack([support[support_y == c].mean(0) for c in range(ways)])
    return (normalise(query) @ normalise(prototypes).T).argmax(-1)


def linear_predict(support: np.ndarray, support_y: np.ndarray, query: np.ndarray, ways: int, steps: int, lr: float,
                   decay: float) -> np.ndarray:
    """A softmax-regression head trained on the normalised support features (full batch, zero init), then applied
    to the queries."""
    x, q = normalise(support).astype(np.float64), normalise(query).astype(np.float64)
    onehot = np.eye(ways)[support_y]
    w, b = np.zeros((x.shape[1], ways)), np.zeros(ways)
    for _ in range(steps):
        logits = x @ w + b
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        g = (p - onehot) / len(x)
        w -= lr * (x.T @ g + decay * w)
        b -= lr * g.sum(0)
    return (q @ w + b).argmax(-1)


def interval(values) -> dict:
    """mean, sample sd and the half-width of the normal 95 % interval of the mean."""
    values = np.asarray(values, np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": round(float(values.mean()), 6), "sd": round(sd, 6),
            "ci95": round(Z95 * sd / math.sqrt(len(values)), 6), "episodes": int(len(values))}


def run_episodes(features: np.ndarray, labels: np.ndarray, class_names: list[str], opts: FewShotOptions,
                 where: str = "the split", log=print) -> dict:
    """Every (K, episode, method) accuracy, and their summary."""
    sampler = EpisodeSampler(labels, class_names, opts.ways, max(opts.shots), opts.queries, opts.seed, where)
    episodes, results = [], []
    for shots in opts.shots:
        accuracies = {m: [] for m in METHODS}
        started = time.perf_counter()
        for i in range(opts.episodes):
            classes, s_rows, s_y, q_rows, q_y = sampler.episode(i, shots)
            support, query = features[s_rows], features[q_rows]
            predicted = {"prototype": prototype_predict(support, s_y, query, opts.ways),
                         "linear": linear_predict(support, s_y, query, opts.ways, opts.head_steps, opts.head_lr,
                                                  opts.head_decay)}
            row = {"shots": shots, "episode": i, "classes": ";".join(class_names[c] for c in classes)}
            for method in METHODS:
                acc = float(np.mean(predicted[method] == q_y))
                accuracies[method].append(acc)
                row[method] = round(acc, 6)
            episodes.append(row)
        for method in METHODS:
            results.append({"shots": shots, "method": method, **interval(accuracies[method])})
        log(f"fewshot: {opts.ways}-way {shots}-shot, {opts.episodes} episodes in {time.perf_counter() - started:.1f}s: "
            + ", ".join(f"{r['method']} {r['mean']:.4f} ± {r['ci95']:.4f}" for r in results[-len(METHODS):]))
    return {"results": results, "episodes": episodes}


# -- the command -------------------------------------------------------------------------------------------------------
def check_options(opts: FewShotOptions) -> None:
    check_fields(opts)


def features_of(job, split: str):
    """(pooled features [N, D], labels [N]) of `split`, from the boundary cache (computed once, then reused)."""
    from tfl.freezing import head_only_plan
    from tfl.job import Stage
    from tfl.training import boundary

    from tfl import freezing

    plan = head_only_plan(job.plan)
    with job.strategy.scope():  # the whole backbone frozen, as tfl finetune's head stage: the same cache entries
        freezing.training_graph(job.model, plan, job.opts.freeze_mode, job.opts.train_bn)
    inputs = boundary.for_job(job, [Stage("probe", plan, 1, {"head": job.lr})])
    if split == "test":
        if job.splits.test is None:
            raise UsageError(f"--split test: {job.splits.name} has no test split; use --split val or train")
        inputs.add_split("test", job.splits.test, job.splits.num_examples["test"],
                         boundary.data_identity(job.splits.fingerprint, "test"))
    entry = inputs.activations(boundary.POOLED, split)
    return np.asarray(entry.data, np.float32), np.asarray(entry.labels, np.int64)


def fewshot(opts: FewShotOptions, log=print) -> dict:
    """Features of --split, then the episodes for every K; returns what fewshot.json holds, plus output_dir."""
    check_options(opts)
    from tfl import job as jobs
    from tfl.training import rundir

    out = opts.output_dir or rundir.default_path("fewshot", opts.dataset)
    opts = dataclasses.replace(opts, shots=tuple(sorted(dict.fromkeys(opts.shots))), output_dir=out)
    return jobs.run(opts, episodes, log)


def episodes(job) -> dict:
    """The recipe: the episodes on the job's pooled features; writes the tables into the run directory."""
    opts, log = job.opts, job.log
    features, labels = features_of(job, opts.split)
    where = f"the {opts.split} split of {os.path.basename(os.path.normpath(opts.dataset))}"
    counts = {name: int(np.sum(labels == c)) for c, name in enumerate(job.class_names)}
    log(f"fewshot: {len(labels)} {opts.split} rows of {features.shape[1]}-d pooled features ({opts.backbone}, "
        f"{job.image_size}px); {opts.ways}-way, K in {list(opts.shots)}, {opts.queries} queries per class")
    run = run_episodes(features, labels, job.class_names, opts, where, log)
    result = {"settings": {"backbone": opts.backbone, "weights": opts.weights, "dataset": opts.dataset,
                           "image_size": job.image_size, "split": opts.split, "ways": opts.ways,
                           "shots": list(opts.shots), "queries": opts.queries, "episodes": opts.episodes,
                           "seed": opts.seed, "head_steps": opts.head_steps, "head_lr": opts.head_lr,
                           "head_decay": opts.head_decay, "feature_dim": int(features.shape[1])},
              "class_counts": counts, **run}
    out = job.scratch or opts.output_dir
    sweep.write(out, result, TABLES)
    log(f"fewshot: wrote {FEWSHOT_JSON}, {FEWSHOT_CSV}, {EPISODES_CSV} and {FEWSHOT_PNG} in {out}")
    return {**result, "output_dir": opts.output_dir}


# -- outputs -----------------------------------------------------------------------------------------------------------
TABLES = sweep.Tables(FEWSHOT_JSON, {FEWSHOT_CSV: (("shots", "method", "mean", "ci95", "sd", "episodes"),
                                                   lambda result: result["results"]),
                                     EPISODES_CSV: (("shots", "episode", "classes", *METHODS),
                                                    lambda result: result["episodes"])},
                      lambda folder, result: figures_transfer.write_fewshot(result, folder.file(FEWSHOT_PNG)))


TABLE = (Column("shots", "shots"), Column("method", "method"), Column("accuracy", "mean", ".4f"),
         Column("± 95%", "ci95", ".4f"), Column("sd", "sd", ".4f"))


def format_table(result: dict) -> str:
    s = result["settings"]
    return (f"{s['ways']}-way, {s['queries']} queries per class, {s['episodes']} episodes\n"
            + table.format_table(TABLE, result["results"]))
