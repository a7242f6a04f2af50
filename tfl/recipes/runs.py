"""One run of a recipe as data (Run) and how it trains: its options derived from a command's (dataclasses.replace),
config.json's record of them, a fresh Keras session, the wall time, `jobs.run`; and the files a set of runs writes
through RunDir (Tables). tfl.recipes.sweep trains many of them in a row; tfl advise's proxy runs use it directly.

A run's options are the sweep's options (dataclasses.replace): recipe fields the run's Job does not read ride
along. config.json records them, minus the sweep's own fields (`drop`: the list of arms, the number of seeds ...,
which do not change what one run trains, so a resumed sweep may change them), plus what names the run (`identity`:
the recipe, the arm ...); a resume compares exactly that record.
"""

from __future__ import annotations

import dataclasses
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
    data_view: Callable | None = None  # splits -> splits, see Job.setup (advise's k-fold proxy: one fold)


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


def train(run: Run, log=print, resolve_depth: jobs.DepthResolver | None = None,
          fresh: bool = True) -> tuple[dict, float]:
    """One run through jobs.run: (its metrics, its wall seconds). `fresh`: clear the Keras session first, so the
    run builds its model as a fresh process would (not for a run inside another's set-up: advise's proxy runs).
    `resolve_depth`: see Job.setup."""
    import keras

    def recipe(job):
        job.record = record(job.opts, run.drop, run.identity)
        return run.recipe(job)

    if fresh:
        keras.backend.clear_session()
    started = time.time()
    metrics = jobs.run(run.options, recipe, log, targets=run.targets, resolve_depth=resolve_depth,
                       data_view=run.data_view)
    return metrics, round(time.time() - started, 1)


def write(out: str, result: dict, tables: Tables, figure: bool = True) -> None:
    """The result's JSON and CSV files, and its figure unless figure=False."""
    from tfl.training import rundir

    folder = rundir.RunDir(out)
    folder.write_json(tables.json, {k: v for k, v in result.items() if k != "output_dir"})
    for name, (columns, rows_of) in tables.csv.items():
        rows = list(rows_of(result))
        folder.write_csv(name, columns if columns is not None else list(rows[0]) if rows else (), rows,
                         extrasaction="ignore")
    if figure and tables.figure is not None:
        tables.figure(folder, result)
