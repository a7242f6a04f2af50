"""The one sweep layer: a recipe that trains several models declares them as data (Run), and this module derives
each run's options, clears the session, times and runs it through `jobs.run`, collects its row and writes the
sweep's files through RunDir (JSON, CSV, figure) after every run, so a failing run leaves the finished rows behind.

    runs = [Run(f"{arm}, seed {seed}", derive(opts, seed=seed, output_dir=...), recipe, {"recipe": "x", "arm": arm},
                drop=SWEEP_ONLY, row={"arm": arm}) for arm in arms for seed in seeds]
    sweep(runs, out, result, Tables("x.json", {"x.csv": (COLUMNS, rows)}, figure), log, "x")

A run's options are the sweep's options (dataclasses.replace): recipe fields the run's Job does not read ride
along. config.json records them, minus the sweep's own fields (`drop`: the list of arms, the number of seeds ...,
which do not change what one run trains, so a resumed sweep may change them), plus what names the run (`identity`:
the recipe, the arm ...); a resume compares exactly that record.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Iterable

from tfl import job as jobs
from tfl.options import JobOptions


@dataclasses.dataclass
class Run:
    name: str  # how the log names the run
    options: JobOptions  # the run's options: the sweep's, derived with `derive`
    recipe: Callable  # Job -> metrics
    identity: dict = dataclasses.field(default_factory=dict)  # config.json entries naming the run (recipe, arm ...)
    drop: tuple[str, ...] = ()  # the sweep's own option fields, left out of the run's config.json
    row: dict = dataclasses.field(default_factory=dict)  # the run's table row before its metrics (arm, seed ...)
    targets: list | None = None  # see Job.setup


@dataclasses.dataclass
class Tables:
    """What a sweep writes into its output directory after every run: `json` (the result but output_dir), a CSV
    per entry of `csv` (name -> (columns or None for the first row's keys, result -> rows)) and `figure`
    (folder, result -> None)."""

    json: str
    csv: dict = dataclasses.field(default_factory=dict)
    figure: Callable | None = None


def derive(opts, **changes):
    """A run's options: the sweep's with `changes`; output_dir always given, never resumed or exported by itself."""
    return dataclasses.replace(opts, **{"resume": False, **changes})


def job_options(opts) -> JobOptions:
    """The JobOptions part of a recipe's options (for a run that reads none of the recipe's own fields)."""
    return JobOptions(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(JobOptions)})


def record(opts, drop: Iterable[str] = (), identity: dict | None = None) -> dict:
    """The options config.json records for a run: every field but `drop`, then `identity`."""
    drop = set(drop)
    return {**{k: v for k, v in dataclasses.asdict(opts).items() if k not in drop}, **(identity or {})}


def train(run: Run, log=print) -> tuple[dict, float]:
    """One run as a fresh process would (clear_session), through jobs.run: (its metrics, its wall seconds)."""
    import keras

    def recipe(job):
        job.record = record(job.opts, run.drop, run.identity)
        return run.recipe(job)

    keras.backend.clear_session()  # every run builds its model as a fresh process would
    started = time.time()
    metrics = jobs.run(run.options, recipe, log, targets=run.targets)
    return metrics, round(time.time() - started, 1)


def default_row(run: Run, metrics: dict, seconds: float) -> dict:
    return {**run.row, **metrics, "wall_seconds": seconds}


def classifier_row(run: Run, metrics: dict, seconds: float) -> dict:
    """The row of a run that Job.finish ended: its scores, epochs and time, and from its config.json the
    trainable parameters of its largest stage and the training examples."""
    from tfl.training import rundir

    config = rundir.RunDir(metrics["run_dir"], create=False).read_json(rundir.CONFIG)
    return {**run.row, "test_accuracy": metrics["test_accuracy"], "best_val_accuracy": metrics["val_accuracy"],
            "epochs": metrics["epochs_run"], "wall_seconds": seconds,
            "trainable_params": max(stage["trainable_params"] for stage in config["stages"]),
            "train_examples": config["num_examples"]["train"], "run_dir": metrics["run_dir"]}


def sweep(runs: Iterable[Run], out: str, result: dict, tables: Tables, log=print, command: str = "sweep",
          key: str = "runs", row: Callable = default_row, summarize: Callable | None = None) -> dict:
    """Train every run in order; after each, append row(run, metrics, seconds) to result[key], let `summarize`
    update the result, and rewrite the tables. Returns the result."""
    for run in runs:
        log(f"{command}: {run.name}")
        metrics, seconds = train(run, log)
        result[key].append(row(run, metrics, seconds))
        if summarize is not None:
            summarize(result)
        write(out, result, tables)
    return result


def write(out: str, result: dict, tables: Tables) -> None:
    from tfl.training import rundir

    folder = rundir.RunDir(out)
    folder.write_json(tables.json, {k: v for k, v in result.items() if k != "output_dir"})
    for name, (columns, rows_of) in tables.csv.items():
        rows = list(rows_of(result))
        folder.write_csv(name, columns if columns is not None else list(rows[0]) if rows else (), rows,
                         extrasaction="ignore")
    if tables.figure is not None:
        tables.figure(folder, result)


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
