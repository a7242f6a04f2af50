"""The one sweep layer: a recipe that trains several models declares them as data (tfl.recipes.runs.Run), and this
module derives each run's options, clears the session, times and runs it through `jobs.run` (with --freeze-up-to
auto resolved by tfl advise, for every recipe), collects its row and writes the sweep's files through RunDir (JSON,
CSV, figure) after every run, so a failing run leaves the finished rows behind.

    runs = [Run(f"{arm}, seed {seed}", derive(opts, seed=seed, output_dir=...), recipe, {"recipe": "x", "arm": arm},
                drop=SWEEP_ONLY, row={"arm": arm}) for arm in arms for seed in seeds]
    sweep(runs, out, result, Tables("x.json", {"x.csv": (COLUMNS, rows)}, figure), log, "x")
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

from tfl.job import held_out_accuracy
from tfl.recipes import runs as one
from tfl.recipes.advise import resolve_auto
# The run layer's names, as the recipes spell them (sweep.Run, sweep.derive ...).
from tfl.recipes.runs import Run, Tables, derive, job_options, record, write  # noqa: F401

FIGURE_EVERY = 30.0  # seconds: a figure takes about a second to draw


def train(run: Run, log=print) -> tuple[dict, float]:
    """One run as a fresh process would (clear_session), through jobs.run, `--freeze-up-to auto` chosen by tfl
    advise: (its metrics, its wall seconds)."""
    return one.train(run, log, resolve_depth=resolve_auto)


def default_row(run: Run, metrics: dict, seconds: float) -> dict:
    return {**run.row, **metrics, "wall_seconds": seconds}


def classifier_row(run: Run, metrics: dict, seconds: float) -> dict:
    """The row of a run that Job.finish ended: its scores, epochs and time, and from its config.json the
    trainable parameters of its largest stage and the training examples."""
    from tfl.training import rundir

    config = rundir.RunDir(metrics["run_dir"], create=False).read_json(rundir.CONFIG)
    # "test_accuracy": the held-out accuracy, on val when the data has no test split ("eval_split" says which)
    return {**run.row, "test_accuracy": held_out_accuracy(metrics), "eval_split": metrics["eval_split"],
            "best_val_accuracy": metrics["val_accuracy"],
            "epochs": metrics["epochs_run"], "wall_seconds": seconds,
            "trainable_params": max(stage["trainable_params"] for stage in config["stages"]),
            "train_examples": config["num_examples"]["train"], "run_dir": metrics["run_dir"]}


def sweep(runs: Iterable[Run], out: str, result: dict, tables: Tables, log=print, command: str = "sweep",
          key: str = "runs", row: Callable = default_row, summarize: Callable | None = None) -> dict:
    """Train every run in order; after each, append row(run, metrics, seconds) to result[key], let `summarize`
    update the result, and rewrite the JSON and CSV files; the figure after the last run and, while the sweep goes
    on, every FIGURE_EVERY seconds. Returns the result."""
    runs, drawn = list(runs), time.monotonic()
    for number, run in enumerate(runs, 1):
        log(f"{command}: {run.name}")
        try:
            metrics, seconds = train(run, log)
        except BaseException:
            if result[key]:
                write(out, result, tables)  # the figure of the runs so far, then the failure
            raise
        result[key].append(row(run, metrics, seconds))
        if summarize is not None:
            summarize(result)
        draw = number == len(runs) or time.monotonic() - drawn >= FIGURE_EVERY
        write(out, result, tables, figure=draw)
        drawn = time.monotonic() if draw else drawn
    return result


# -- summaries ---------------------------------------------------------------------------------------------------
def mean_sd(values, digits: int = 6) -> tuple[float, float | None]:
    """Mean and sample sd (None for one value), rounded."""
    values = [float(v) for v in values]
    return round(statistics.mean(values), digits), (round(statistics.stdev(values), digits) if len(values) > 1
                                                    else None)


def format_mean_sd(mean: float, sd: float | None) -> str:
    return f"{mean:.4f} ± {'-' if sd is None else f'{sd:.4f}'}"


def groups(rows: list[dict], *by: str) -> list[tuple[tuple, list[dict]]]:
    """The rows grouped by the values of `by`, groups and rows in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in by), []).append(r)
    return list(out.items())


def seeds(opts) -> list[int]:
    """--seed, --seed + 1, ... (--seeds of them)."""
    return [opts.seed + i for i in range(opts.seeds)]
