"""`tfl self-train`: self-training with pseudo-labels (Lee 2013, "Pseudo-Label").

Round 0 trains on the labeled rows only: the labeled-only baseline. After every round the model (its best epoch by
validation accuracy) predicts every unlabeled row; the rows whose top softmax probability is >= --threshold get
that class as their label, and the next round trains on the labeled rows plus these pseudo-labeled ones. The
selection is made afresh from the whole unlabeled pool after each round (a row may enter, stay or leave), and
every round starts from the same initial weights and trains --head-epochs epochs, so round k differs from round 0
only by the pseudo-labels it sees (the same budget, seed and data order rule): the gain over round 0 is the
pseudo-labels' and not more epochs'.

Where the unlabeled rows come from:
  --label-fraction F     a seeded, stratified share F of each class's training rows is labeled (tfl.data's
                         stratified_rows, as for every command); the other training rows are unlabeled,
                         and since their true labels are known the pseudo-labels' accuracy is reported.
  --unlabeled DIR        every image file under DIR (recursively) is unlabeled; there is no accuracy to report
                         for them. With --label-fraction as well, both pools are used.

The backbone stays frozen: every round trains the head on pooled features cached once (tfl.training.boundary;
one backbone pass over train, val, test and the unlabeled folder for the whole run, reused by later runs), and
predicting the unlabeled pool is a pass of the head over cached features. The validation split stays fully
labeled (it selects each round's best epoch, as in every tfl run), which is generous to both the baseline and
self-training alike.

The output directory is a normal run directory (history.csv has one stage per round, model.keras the best round
by validation accuracy; tfl evaluate / report / export take it) plus self_training.json (settings, per round: rows
trained on, validation and test accuracy, how many unlabeled rows passed the threshold overall and per class, and
the pseudo-labels' accuracy overall and per class where true labels exist), self_training.csv (one row per round)
and self_training.png. A run interrupted anywhere resumes exactly (the checkpoint after every epoch holds the
round and the current pseudo-labels).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import ClassVar

import numpy as np

from tfl.errors import UsageError
from tfl.job import Job, JobOptions, Stage
from tfl.options import AUGMENTATION, check_options as check_fields, option
from tfl.recipes import runs
from tfl.reporting import figures_transfer, table
from tfl.reporting.table import Column

SELF_JSON, SELF_CSV, SELF_PNG = "self_training.json", "self_training.csv", "self_training.png"
POOLS = ("train", "unlabeled")  # where unlabeled rows live: the train split's rest, and the --unlabeled folder


@dataclasses.dataclass
class SelfTrainOptions(JobOptions):
    unused: ClassVar = ("epochs", "freeze_up_to", "backbone_lr", *AUGMENTATION, "strategy", "worker_hosts",
                        "task_index", "scale_lr")
    option_help: ClassVar = {
        "head_epochs": "Epochs of every round (the head on cached features).",
        "label_fraction": ("Keep a seeded, stratified share F of each class's training rows labeled; the rest of "
                           "train is the unlabeled pool (its true labels only score the pseudo-labels).")}

    unlabeled: str | None = option(None, metavar="DIR", help=(
        "A folder of unlabeled images (searched recursively), added to the unlabeled pool."))
    threshold: float = option(0.9, check=(0, 1, True, True), help=(
        "An unlabeled row becomes a pseudo-label when its top softmax probability is at least this."))
    rounds: int = option(3, check="non_negative", metavar="N", help=(
        "Rounds with pseudo-labels after round 0 (the labeled-only baseline); each starts from the same initial "
        "weights and trains --head-epochs epochs."))


def check_options(opts: SelfTrainOptions) -> None:
    check_fields(opts)
    if opts.label_fraction is None and not opts.unlabeled:
        raise UsageError("tfl self-train needs unlabeled data: give --label-fraction F (a share of each class's "
                         "training rows stays labeled, the rest is unlabeled) or --unlabeled DIR (a folder of images)")
    if opts.label_fraction is not None and opts.label_fraction >= 1.0 and not opts.unlabeled:
        raise UsageError("--label-fraction 1 leaves no training row unlabeled; give a fraction < 1, e.g. 0.1, "
                         "or --unlabeled DIR")
    if opts.unlabeled and not os.path.isdir(opts.unlabeled):
        raise UsageError(f"--unlabeled {opts.unlabeled!r}: not a directory; give a folder of image files")
    if opts.head_epochs < 1:
        raise UsageError(f"--head-epochs {opts.head_epochs}: every round trains the head that many epochs; give >= 1")


# -- the unlabeled folder ----------------------------------------------------------------------------------------------
def unlabeled_folder(root: str, skip_bad_images: bool = False, log=print):
    """(dataset of (image, -1) elements, count, fingerprint) for every image file under `root`, in sorted order."""
    from tfl.data.decode import decode_files
    from tfl.data.errors import DataError, list_some
    from tfl.data.fingerprint import file_digest, fingerprint
    from tfl.data.image_check import IMAGE_EXTENSIONS, BadImage, inspect_image

    root = os.path.abspath(os.path.expanduser(root))
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not paths:
        raise DataError(f"--unlabeled {root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in it or below it")
    infos, bad = [], []
    for path in paths:
        try:
            infos.append((path, inspect_image(path)))
        except BadImage as err:
            bad.append(f"{path}  ({err})")
    if bad and not skip_bad_images:
        raise DataError(f"--unlabeled: {len(bad)} file(s) under {root} are not readable images:\n{list_some(bad)}\n"
                        "Delete or fix them, or pass --skip-bad-images to go on without them.")
    if bad:
        log(f"warning: skipping {len(bad)} unreadable file(s) under {root}:\n{list_some(bad)}")
    if not infos:
        raise DataError(f"--unlabeled {root}: no readable image")
    # by content: other pixels under the same size and mtime (`cp -p`, `rsync -a`) must not reuse a cache
    stats = [(os.path.relpath(p, root), os.stat(p).st_size, file_digest(p)) for p, _ in infos]
    ds = decode_files([p for p, _ in infos], [-1] * len(infos), [info.needs_pillow for _, info in infos])
    return ds, len(infos), fingerprint("unlabeled_folder", stats)


# -- selection ---------------------------------------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def select(probabilities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose top probability is >= threshold, their top class), rows in increasing order."""
    confidence = probabilities.max(-1)
    rows = np.flatnonzero(confidence >= threshold).astype(np.int64)
    return rows, probabilities[rows].argmax(-1).astype(np.int32)


def selection_record(pools: dict, class_names: list[str], truths: dict) -> dict:
    """How many rows passed, overall and per (pseudo-)class, and where true labels exist (truths[pool] >= 0) the
    pseudo-labels' accuracy, overall and per pseudo-class (its precision)."""
    labels = np.concatenate([pools[p][1] for p in POOLS if p in pools]) if pools else np.zeros(0, np.int32)
    truth = np.concatenate([truths[p][pools[p][0]] for p in POOLS if p in pools]) if pools else np.zeros(0)
    known = truth >= 0
    per_class, per_class_accuracy = {}, {}
    for c, name in enumerate(class_names):
        mine = labels == c
        per_class[name] = int(mine.sum())
        checked = mine & known
        per_class_accuracy[name] = round(float(np.mean(labels[checked] == truth[checked])), 6) if checked.any() \
            else None
    return {"passed": int(len(labels)), "per_class": per_class,
            "accuracy": round(float(np.mean(labels[known] == truth[known])), 6) if known.any() else None,
            "checked": int(known.sum()), "per_class_accuracy": per_class_accuracy,
            "from_pool": {p: int(len(pools[p][0])) for p in POOLS if p in pools}}


# -- the recipe --------------------------------------------------------------------------------------------------------
class SelfTraining:
    """One run: the job's model, the cached features of every pool, the rounds."""

    def __init__(self, job: Job, fraction: float | None):
        from tfl.freezing import head_only_plan
        from tfl.training import boundary
        from tfl.training.trainer import StagePolicy

        self.job, self.opts, self.fraction = job, job.opts, fraction
        opts = self.opts
        self.initial = [np.array(v.numpy()) for v in job.model.weights]  # every round starts here
        # Every round keeps its best epoch: the pseudo-labels come from it.
        self.stages = [Stage(f"round{k}", head_only_plan(job.plan), opts.head_epochs, {"head": job.lr},
                             StagePolicy(restore_best=True)) for k in range(opts.rounds + 1)]
        config = {"recipe": "self_train"}
        self.folder = None
        if opts.unlabeled:
            self.folder = unlabeled_folder(opts.unlabeled, opts.skip_bad_images, job.log)
            config["unlabeled_fingerprint"] = self.folder[2]
        job.prepare(self.stages, config=config)
        splits = job.splits
        self.test_split = "test" if splits.test is not None else "val"
        if self.test_split == "test":
            job.inputs.add_split("test", splits.test, splits.num_examples["test"],
                                 boundary.data_identity(splits.fingerprint, "test"))
        if self.folder:
            ds, count, fp = self.folder
            job.inputs.add_split("unlabeled", ds, count, boundary.data_identity(fp, "unlabeled"))
        self.state = {"done": 0, "records": []}
        self.pseudo = {}  # pool -> (rows, pseudo labels) the current round trains on
        if job.snapshot is not None and "recipe" in job.snapshot.state:
            self.state = job.snapshot.state["recipe"]
            arrays = job.snapshot.arrays
            for pool in self.state.get("pools", []):
                self.pseudo[pool] = (np.asarray(arrays[f"recipe.{pool}_rows"], np.int64),
                                     np.asarray(arrays[f"recipe.{pool}_labels"], np.int32))
        job.trainer.recipe_state = self.to_checkpoint
        self.labeled = None  # the labeled training rows, once the first round is fed

    def to_checkpoint(self):
        state = {**self.state, "pools": sorted(self.pseudo)}
        arrays = {}
        for pool, (rows, labels) in self.pseudo.items():
            arrays[f"{pool}_rows"], arrays[f"{pool}_labels"] = rows, labels
        return state, arrays

    # -- data ------------------------------------------------------------------------------------------------------
    def _feed(self, feed) -> None:
        """The rounds' inputs (every round's: Stage.inputs is the first round still to train), and once the labeled
        rows and the unlabeled pools."""
        from tfl import data

        job = self.job
        self.boundary, self.eval_model = feed.boundary, feed.eval_model
        if self.labeled is not None:
            return
        labels = np.asarray(job.inputs.labels("train", self.boundary), np.int64)
        fraction = self.fraction
        self.labeled = (data.stratified_rows(labels, fraction, self.opts.seed) if fraction is not None
                        else np.arange(len(labels), dtype=np.int64))
        self.truth = {"train": labels}
        pool_rows = {"train": np.setdiff1d(np.arange(len(labels)), self.labeled).astype(np.int64)}
        if self.folder:
            self.truth["unlabeled"] = np.full(self.folder[1], -1, np.int64)
            pool_rows["unlabeled"] = np.arange(self.folder[1], dtype=np.int64)
        self.pool_rows = {p: r for p, r in pool_rows.items() if len(r)}
        if len(self.labeled) < job.batch:
            raise UsageError(f"--batch-size {job.batch} is larger than the {len(self.labeled)} labeled examples; "
                             "lower it or raise --label-fraction")
        self.unlabeled = sum(len(r) for r in self.pool_rows.values())
        job.log(f"self-train: {len(self.labeled)} labeled rows, {self.unlabeled} unlabeled ("
                + ", ".join(f"{p}: {len(r)}" for p, r in self.pool_rows.items()) + f"), threshold "
                f"{self.opts.threshold:g}, {self.opts.rounds} round(s) after the labeled-only round 0")

    def _rows(self, split: str):
        """The rows of `split` the trainer gathers from: cached features, or decoded images without a cache."""
        if self.boundary is not None:
            return self.job.inputs.activations(self.boundary, split).data
        return self.job.inputs._store(split).images  # noqa: SLF001 - the decoded images StageInputs keeps

    def _round_columns(self) -> dict:
        """The round's training rows gathered once: the labeled rows, then each pool's pseudo-labeled rows."""
        from tfl.data.pipeline import FEATURES, IMAGE, LABEL

        parts = [(self._rows("train")[self.labeled], self.truth["train"][self.labeled].astype(np.int32))]
        for pool in POOLS:
            if pool in self.pseudo and len(self.pseudo[pool][0]):
                rows, labels = self.pseudo[pool]
                parts.append((self._rows(pool)[rows], labels))
        key = FEATURES if self.boundary is not None else IMAGE
        return {key: np.concatenate([p[0] for p in parts]), LABEL: np.concatenate([p[1] for p in parts])}

    def _train_batches(self, columns: dict):
        from tfl.data.pipeline import IMAGE, gather_batches, index_order, to_model_input
        from tfl.training.trainer import epoch_seed

        count, batch, image_size = len(columns["label"]), self.job.batch, self.job.image_size

        def to_input(b):
            return {**b, IMAGE: to_model_input(b[IMAGE], image_size)} if IMAGE in b else b

        def batches(epoch):
            order = index_order(count, batch, training=True, seed=epoch_seed(self.opts.seed, epoch),
                                drop_remainder=True)
            return gather_batches(order, columns, to_input)

        return batches, count // batch

    def _ordered(self, split: str, rows: np.ndarray | None = None):
        import tensorflow as tf

        count = self.job.inputs.counts[split]
        rows = np.arange(count, dtype=np.int64) if rows is None else rows
        order = tf.data.Dataset.from_tensor_slices(rows).batch(self.job.batch)
        return self.job.inputs.batches(split, self.boundary, order), -(-len(rows) // self.job.batch)

    def predict(self, split: str, rows: np.ndarray) -> np.ndarray:
        from tfl.training.trainer import model_inputs

        data, _ = self._ordered(split, rows)
        model = self.eval_model or self.job.model
        return np.concatenate([np.asarray(model(model_inputs(b), training=False), np.float32) for b in data])

    def test_accuracy(self) -> float:
        data, steps = self._ordered(self.test_split)
        return self.job.trainer.evaluate_all(data, self.test_split, steps, self.eval_model)["accuracy"]

    # -- the rounds ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Job.train runs the rounds: `round` sets each up (initial weights, the labeled and pseudo-labeled rows),
        `labelled` follows it (test accuracy, the next pseudo-labels)."""
        job = self.job
        # Fed as the first round still to train (after a resume, a finished stage gets no cache).
        epochs_run = {}
        for result in job.trainer.history:
            epochs_run[result.stage] = epochs_run.get(result.stage, 0) + 1
        fed = next((s for s in self.stages if epochs_run.get(s.name, 0) < s.epochs), self.stages[-1])
        self.resumed_stage = job.snapshot.state["stage"] if job.snapshot is not None else None
        self.index = {stage.name: k for k, stage in enumerate(self.stages)}
        job.train([dataclasses.replace(stage, inputs=fed.name) for stage in self.stages], adapt=self.round,
                  after=self.labelled)
        return self.finish()

    def round(self, stage, feed, groups) -> dict:
        job, k = self.job, self.index[stage.name]
        self._feed(feed)
        if k < self.state["done"]:  # finished before the resume: the trainer skips it
            return {}
        self.started = time.time()
        if self.resumed_stage != stage.name:  # a new round (not one a resume continues): the initial weights
            for variable, value in zip(job.model.weights, self.initial):
                variable.assign(value)
        columns = self._round_columns()
        train, steps = self._train_batches(columns)
        self.pseudo_count = len(columns["label"]) - len(self.labeled)
        self.trained_accuracy = self._trained_accuracy()
        job.log(f"self-train: round {k}/{self.opts.rounds}: {len(self.labeled)} labeled + {self.pseudo_count} "
                "pseudo-labeled rows" + (f" (pseudo-labels {self.trained_accuracy:.4f} right)"
                                         if self.trained_accuracy is not None else ""))
        return {"train": train, "steps": steps}

    def labelled(self, stage) -> None:
        """After round k: its test accuracy, then the pseudo-labels of the next round from its best epoch."""
        job, trainer, opts = self.job, self.job.trainer, self.opts
        k = self.index[stage.name]
        if k < self.state["done"]:
            return
        test = self.test_accuracy()
        self.pseudo = {}
        for pool, rows in self.pool_rows.items():
            picked, labels = select(softmax(self.predict(pool, rows)), opts.threshold)
            self.pseudo[pool] = (rows[picked], labels)
        chosen = selection_record(self.pseudo, job.class_names, self.truth)
        record = {"round": k, "labeled": int(len(self.labeled)), "pseudo_labeled": int(self.pseudo_count),
                  "pseudo_accuracy_trained": self.trained_accuracy,
                  "val_accuracy": round(trainer.stage_best[stage.name]["value"], 6),
                  "best_epoch": trainer.stage_best[stage.name]["epoch"], "test_accuracy": round(test, 6),
                  "unlabeled": self.unlabeled, "selected": chosen, "seconds": round(time.time() - self.started, 1)}
        self.state["records"].append(record)
        self.state["done"] = k + 1
        accuracy = f", {chosen['accuracy']:.4f} of them right" if chosen["accuracy"] is not None else ""
        job.log(f"self-train: round {k}: {self.test_split} accuracy {test:.4f}; {chosen['passed']} of "
                f"{self.unlabeled} unlabeled rows passed {opts.threshold:g}{accuracy}; per class "
                + " ".join(f"{name}:{n}" for name, n in chosen["per_class"].items()))

    def _trained_accuracy(self) -> float | None:
        """The accuracy of the pseudo-labels this round trains on, over the rows with true labels."""
        rows, labels = self.pseudo.get("train", (np.zeros(0, np.int64), np.zeros(0)))
        return round(float(np.mean(labels == self.truth["train"][rows])), 6) if len(rows) else None

    def finish(self) -> dict:
        """The best round by validation accuracy: its test accuracy, model.keras and metrics.json (Job.finish),
        then self_training.json, .csv and .png."""
        job = self.job
        records = self.state["records"]

        def score(job) -> dict:
            trainer = job.trainer
            return {"test_accuracy": round(self.test_accuracy(), 6), "val_accuracy": round(trainer.best_accuracy, 6),
                    "best_epoch": trainer.best_epoch, "epochs_run": len(trainer.history),
                    "eval_split": self.test_split, "baseline_test_accuracy": records[0]["test_accuracy"],
                    "last_round_test_accuracy": records[-1]["test_accuracy"],
                    "train_seconds": round(time.time() - job.started, 1)}

        metrics = {k: v for k, v in job.finish(score=score).items() if k != "run_dir"}
        result = {"settings": {"label_fraction": self.fraction, "unlabeled": self.opts.unlabeled,
                               "threshold": self.opts.threshold, "rounds": self.opts.rounds, "seed": self.opts.seed,
                               "head_epochs": self.opts.head_epochs, "backbone": self.opts.backbone,
                               "image_size": job.image_size, "dataset": self.opts.dataset},
                  "classes": job.class_names, "rounds": records, "metrics": metrics}
        runs.write(job.run_dir.path, result, TABLES)
        job.log(f"self-train: best round by val accuracy: {self.test_split} accuracy {metrics['test_accuracy']:.4f} "
                f"(round 0, labeled only: {records[0]['test_accuracy']:.4f}); wrote {SELF_JSON}, {SELF_CSV} and "
                f"{SELF_PNG} in {job.run_dir.path}")
        return {**result, "output_dir": job.run_dir.path}


def self_train(opts: SelfTrainOptions, log=print) -> dict:
    """Round 0 on the labeled rows, then --rounds rounds with pseudo-labels; returns what self_training.json holds,
    plus output_dir."""
    check_options(opts)

    # The Job loads every training row (the unlabeled pool is the rest of train); config.json records F. One run in
    # its own process: no fresh Keras session needed (self-train offers no --freeze-up-to, so no auto either).
    run = runs.Run("self-train", dataclasses.replace(opts, label_fraction=None),
                   lambda job: SelfTraining(job, opts.label_fraction).run(), {"label_fraction": opts.label_fraction})
    return runs.train(run, log, fresh=False)[0]


# -- outputs -----------------------------------------------------------------------------------------------------------
def csv_rows(result: dict) -> list[dict]:
    rows = []
    for r in result["rounds"]:
        chosen = r["selected"]
        row = {"round": r["round"], "labeled": r["labeled"], "pseudo_labeled": r["pseudo_labeled"],
               "pseudo_accuracy_trained": r["pseudo_accuracy_trained"], "val_accuracy": r["val_accuracy"],
               "test_accuracy": r["test_accuracy"], "passed": chosen["passed"], "passed_accuracy": chosen["accuracy"],
               "unlabeled": r["unlabeled"]}
        row.update({f"passed_{name}": n for name, n in chosen["per_class"].items()})
        rows.append(row)
    return rows


TABLES = runs.Tables(SELF_JSON, {SELF_CSV: (None, csv_rows)},
                      lambda folder, result: figures_transfer.write_self_training(result, folder.file(SELF_PNG)))


TABLE = (Column("round", "round"), Column("labeled", "labeled"), Column("pseudo", "pseudo_labeled"),
         Column("ps.acc", "pseudo_accuracy_trained", ".4f"), Column("val acc", "val_accuracy", ".4f"),
         Column("test acc", "test_accuracy", ".4f"), Column("passed", lambda r: r["selected"]["passed"]),
         Column("pass acc", lambda r: r["selected"]["accuracy"], ".4f"))


def format_table(result: dict) -> str:
    m = result["metrics"]
    return table.format_table(TABLE, result["rounds"], notes=[
        f"best round by val: test accuracy {m['test_accuracy']:.4f} (labeled only: {m['baseline_test_accuracy']:.4f})"])
