"""`tfl compare`: one dataset, backbone, image size and epoch budget, trained several ways ("arms").

Every arm trains E = head_epochs + epochs epochs:
  scratch       random init; every layer trains (batch norm too: random statistics would never fit otherwise),
                backbone and head at lr
  linear_probe  the pretrained backbone frozen; only the head trains (on cached pooled features)
  finetune      pretrained; every layer trains, the backbone at backbone_lr, the head at lr
  two_stage     tfl finetune's default: head_epochs head only, then epochs above --freeze-up-to
  lp_ft         Kumar et al., "Fine-Tuning can Distort Pretrained Features" (ICLR 2022): head_epochs of linear
                probe, then epochs of full fine-tuning, the backbone at backbone_lr, the head at lr

For every (arm, label fraction, seed), in that nesting, a normal run directory
<output_dir>/<arm>/frac<fraction>/seed<seed>/ (tfl evaluate, report and export take it; its config.json says
"recipe": "compare" and the arm). The label fraction keeps a seeded, stratified share of each class's training
examples (JobOptions.label_fraction). compare.json and compare.csv in output_dir are rewritten after every run, so
a failing run leaves the finished rows behind; compare.png is drawn at the end.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, ClassVar

from tfl.errors import UsageError
from tfl.job import Job, JobOptions, Stage
from tfl.options import FRACTION, SWEEP_RUN, ProxyOptions, check_options as check_fields, option
from tfl.recipes import sweep
from tfl.recipes.stages import (RANDOM_START, SCRATCH_BN_MOMENTUM, everything_plan, head_then_finetune,  # noqa: F401
                                scratch_stage, two_stage)
from tfl.reporting import table
from tfl.reporting.table import Column

COMPARE_JSON, COMPARE_CSV, COMPARE_PNG = "compare.json", "compare.csv", "compare.png"
COLUMNS = ("arm", "label_fraction", "seed", "test_accuracy", "best_val_accuracy", "epochs", "wall_seconds",
           "trainable_params", "train_examples", "run_dir")


# -- the arms ------------------------------------------------------------------------------------------------------
def budget(opts: JobOptions) -> int:
    """The epochs every arm trains."""
    return opts.head_epochs + opts.epochs


def scratch(job: Job) -> dict:
    return _train(job, [scratch_stage(job)], {"bn_momentum": SCRATCH_BN_MOMENTUM})


def linear_probe(job: Job) -> dict:
    from tfl.freezing import head_only_plan

    return _train(job, [Stage("probe", head_only_plan(everything_plan(job)), budget(job.opts), {"head": job.lr})])


def full_finetune(job: Job) -> dict:
    lrs = {"backbone": job.backbone_lr, "head": job.lr}
    return _train(job, [Stage("finetune", everything_plan(job), budget(job.opts), lrs)])


def lp_ft(job: Job) -> dict:
    return _train(job, head_then_finetune(job, everything_plan(job), head="probe"))


def _train(job: Job, stages: list[Stage], config: dict | None = None) -> dict:
    job.prepare(stages, config=config)
    job.train(stages)
    return job.finish()


@dataclasses.dataclass(frozen=True)
class Arm:
    recipe: Callable[[Job], dict]
    description: str
    options: dict  # JobOptions this arm always sets, whatever the comparison's options say


EVERYTHING = {"freeze_up_to": None, "rules": ()}  # the arm's recipe makes its plans; the config says so too
REGISTRY: dict[str, Arm] = {
    "scratch": Arm(scratch, "random init, every layer (batch norm too) trains E epochs at --lr",
                   {**RANDOM_START, "weights": "none", "init_from": None}),
    "linear_probe": Arm(linear_probe, "pretrained backbone frozen, the head trains E epochs", EVERYTHING),
    "finetune": Arm(full_finetune, "pretrained, every layer trains E epochs (backbone at --backbone-lr)", EVERYTHING),
    "two_stage": Arm(two_stage, "tfl finetune: --head-epochs head only, then --epochs above --freeze-up-to", {}),
    "lp_ft": Arm(lp_ft, "LP-FT (Kumar et al. 2022): --head-epochs linear probe, then --epochs of every layer",
                 EVERYTHING),
}
ARMS = tuple(REGISTRY)


# -- options -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompareOptions(JobOptions, ProxyOptions):
    unused: ClassVar = ("label_fraction", *SWEEP_RUN)
    option_help: ClassVar = {"output_dir": (
        "Where compare.json/.csv/.png and every arm's run directory (<arm>/frac<F>/seed<S>/) go (default: "
        "runs/<time>-compare-<dataset>). Run again with the same directory to continue an interrupted run.")}

    arms: tuple[str, ...] = option(ARMS, choices=ARMS, metavar="ARM[,ARM]", help=(
        "Which arms, in order: " + "; ".join(f"{name}: {arm.description}" for name, arm in REGISTRY.items())
        + ". Every arm trains the same E = --head-epochs + --epochs epochs."))
    label_fractions: tuple[float, ...] = option((1.0,), flag="--label-fraction", check=FRACTION, metavar="F[,F]",
                                                help=(
        "Train on a seeded, stratified share of each class's training examples; several (e.g. 0.01,0.1,1) show "
        "where pretraining matters."))
    seeds: int = option(1, check="positive", metavar="N", help=(
        "Runs per arm and fraction, with seeds --seed, --seed+1, ...; the table gives mean ± sd."))


SWEEP_ONLY = ("arms", "label_fractions", "seeds")  # CompareOptions' own fields: what to compare, not one run


def arm_run(opts: CompareOptions, number: int, arm: str, fraction: float, seed: int, out: str) -> sweep.Run:
    options = sweep.derive(opts, **REGISTRY[arm].options, seed=seed, label_fraction=fraction,
                           output_dir=os.path.join(out, arm, f"frac{fraction:g}", f"seed{seed}"))
    return sweep.Run(f"arm {number}/{len(dict.fromkeys(opts.arms))} {arm}, fraction {fraction:g}, seed {seed}",
                     options, REGISTRY[arm].recipe, {"recipe": "compare", "arm": arm}, SWEEP_ONLY,
                     {"arm": arm, "label_fraction": fraction, "seed": seed})


def check_options(opts: CompareOptions) -> None:
    """The comparison's own options, checked before the first run starts (a run checks the rest itself)."""
    check_fields(opts)
    if budget(opts) < 1:
        raise UsageError(f"--head-epochs {opts.head_epochs} and --epochs {opts.epochs}: nothing to train; make "
                         "their sum (every arm's epoch budget) >= 1")


# -- the comparison ------------------------------------------------------------------------------------------------
def compare(opts: CompareOptions, log=print) -> dict:
    """Train every (arm, label fraction, seed); returns what compare.json holds, plus output_dir."""
    check_options(opts)
    from tfl.reporting.figures import write_compare
    from tfl.training import rundir

    arms, fractions = tuple(dict.fromkeys(opts.arms)), tuple(dict.fromkeys(map(float, opts.label_fractions)))
    seeds = [opts.seed + i for i in range(opts.seeds)]
    out = opts.output_dir or rundir.default_path("compare", opts.dataset)
    settings = {"options": dataclasses.asdict(opts), "epoch_budget": budget(opts), "seeds": seeds,
                "arms": {arm: REGISTRY[arm].description for arm in arms}, "label_fractions": list(fractions)}
    result = {"output_dir": out, "settings": settings, "runs": [], "summary": []}
    runs = [arm_run(opts, number, arm, fraction, seed, out) for number, arm in enumerate(arms, 1)
            for fraction in fractions for seed in seeds]
    sweep.sweep(runs, out, result, TABLES, log, "compare", row=sweep.classifier_row,
                summarize=lambda r: r.update(summary=summarize(r["runs"])))
    curves = {arm: _history(result["runs"], arm, max(fractions), seeds[0]) for arm in arms}
    write_compare(result["summary"], curves, os.path.join(out, COMPARE_PNG),
                  title=f"{opts.backbone} on {os.path.basename(os.path.normpath(opts.dataset))}, "
                        f"{budget(opts)} epochs per arm")
    log(f"compare: wrote {os.path.join(out, COMPARE_JSON)}, {COMPARE_CSV} and {COMPARE_PNG}")
    return result


def summarize(runs: list[dict]) -> list[dict]:
    """Per (arm, fraction), in run order: mean and sample sd (None for one seed) of the test accuracy, and more."""
    summary = []
    for (arm, fraction), rows in sweep.groups(runs, "arm", "label_fraction"):
        mean, sd = sweep.mean_sd(row["test_accuracy"] for row in rows)
        summary.append({
            "arm": arm, "label_fraction": fraction, "n": len(rows), "test_accuracy_mean": mean, "test_accuracy_sd": sd,
            "best_val_accuracy_mean": sweep.mean_sd(row["best_val_accuracy"] for row in rows)[0],
            "wall_seconds_mean": sweep.mean_sd((row["wall_seconds"] for row in rows), 1)[0],
            "trainable_params": max(row["trainable_params"] for row in rows),
            "train_examples": rows[0]["train_examples"]})
    return summary


TABLES = sweep.Tables(COMPARE_JSON, {COMPARE_CSV: (COLUMNS, lambda result: result["runs"])})


def _history(runs: list[dict], arm: str, fraction: float, seed: int) -> list[dict]:
    from tfl.reporting.figures import read_history_csv
    from tfl.training import rundir

    run = next(row for row in runs if (row["arm"], row["label_fraction"], row["seed"]) == (arm, fraction, seed))
    return read_history_csv(os.path.join(run["run_dir"], rundir.HISTORY))


TABLE = (Column("arm", "arm"), Column("fraction", "label_fraction", "g"),
         Column("test accuracy", lambda r: sweep.format_mean_sd(r["test_accuracy_mean"], r["test_accuracy_sd"])),
         Column("n", "n"), Column("wall s", "wall_seconds_mean", ".1f"), Column("trainable", "trainable_params", ","))


def format_table(result: dict) -> str:
    """One line per (arm, label fraction): test accuracy mean ± sd over n seeds, mean wall seconds, and the
    trainable parameters of the arm's largest stage."""
    return table.format_table(TABLE, result["summary"])
