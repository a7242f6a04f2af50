"""Which of finetune's "train better" options help? Each one alone against the plain two-stage run, with seeds.

On data nobody tuned tfl's defaults to: Fashion-MNIST with 1 % and 10 % of the labels (`fmnist1`, `fmnist10`:
590 / 5,880 train images, val: 2 % of the 60,000 train images held out (1,200), test: the 10,000 real t10k
images) and scikit-learn's 8x8 digits (`digits`: the folder scripts/calibrate_advise.py builds, 1,200 train / 250 val
/ 347 test). EfficientNet-Lite0 (ImageNet weights), the same budget for every arm (BUDGET: 64 px, 2 head epochs, 3
fine-tuning epochs above block4, batch 64), seeds 0,1,2. The arms (ARMS: each arm's exact `tfl.finetune` options)
are plain (nothing), randaugment, mixup (0.2 on cached features where it can), mixup_pixels, cutmix (1.0), erasing
(0.25), ema (0.99), swa (the last 2 epochs), l2sp (0.01), bss (0.001) and lr_find (--lr find); `--arms
ema+randaugment` runs a combination.

Every finished run is appended at once to WORK/runs.jsonl (test and val accuracy, wall seconds, its run directory,
its exact options); a restarted sweep skips the runs whose exact options are already there, so a crash or a kill
loses at most the run in progress. Each run starts from a fresh Keras session and an empty activation cache (every
arm pays its own feature extraction, so wall times compare); only tfl's float32-or-bfloat16 timing is remembered
(WORK/precision.json; the first run of a WORK pays it, ~13 s). At the end (or with --report-only) WORK/table.md (the
command lines, then rows: arms; columns: datasets; cells "mean ± sd (Δ vs plain)" of test accuracy; mean wall
seconds per run; on which sets the arm loses), table.csv, table.json and table.png (Δ test accuracy vs plain, error
bars: the sd over seeds of the per-seed difference).

    pip install 'tfl[calibrate]'        # scikit-learn, for the digits
    TFL_PROGRESS=0 nice -n 19 python scripts/train_better.py --work /tmp/train-better    # the 99 runs
    python scripts/train_better.py --work /tmp/train-better --arms plain,bss+lr_find  # then a combination
    python scripts/train_better.py --work /tmp/train-better --report-only
    python scripts/train_better.py --work /tmp/train-better --dry-run     # the runs to go and their exact options

How long, measured: 78 minutes for the 66 Fashion-MNIST runs and 18 for the 33 digits runs (two sweeps, one per
dataset group, overlapping for 18 minutes; load average 0.7-3.0 where sampled) on a shared 2-core Intel Xeon. Mean
wall seconds per run over the three seeds, plain / randaugment: fmnist1 44 / 52, fmnist10 85 / 134, digits 29 / 45.
Arms on cached features (plain, mixup, ema, swa, l2sp, bss, lr_find) cost about plain's; pixel arms (randaugment,
mixup_pixels, cutmix, erasing) 1.1-1.6x more. The table is in docs/results/train-better.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

# The data: name -> tfl.finetune options ("folder": a calibrate_advise folder, resolved to its path at run time).
# Fashion-MNIST holds out 2 % of its 60,000 train images as val (1,200, 120 a class) instead of tfl's 10 %: 6,000 val
# images were 11x the 1 % train set, and validating them (twice an epoch with --ema, every epoch through the whole
# backbone when pixels change) cost more than training on 540.
DATASETS = {
    "fmnist1": {"dataset": "fashion_mnist", "label_fraction": 0.01, "val_split": 0.02},
    "fmnist10": {"dataset": "fashion_mnist", "label_fraction": 0.1, "val_split": 0.02},
    "digits": {"folder": "digits"},
}
# The arms: name -> the options it adds to the plain run (specs as data; `a+b` merges two).
# ema 0.99 rather than 0.999: timm's warm-up uses min(DECAY, 1 - n^-2/3) at update n, which stays below 0.99 until
# n = 1,000 and below 0.999 until n = 31,623. This budget takes ~50 (fmnist1), ~460 (fmnist10) and ~95 (digits)
# updates in all (batch 64, 2 head + 3 fine-tuning epochs), so the two decays give the same average here; 0.99 is
# the one whose horizon (~100 updates, about one fmnist10 epoch) is of the run's length, so the number says what
# the run does. swa: the last 2 of the 3 fine-tuning epochs.
ARMS = {
    "plain": {},
    "randaugment": {"augment": "randaugment"},
    "mixup": {"mixup": 0.2, "mixup_on": "auto"},
    "mixup_pixels": {"mixup": 0.2, "mixup_on": "pixels"},
    "cutmix": {"cutmix": 1.0},
    "erasing": {"random_erasing": 0.25},
    "ema": {"ema": 0.99},
    "swa": {"swa_epochs": 2},
    "l2sp": {"regularize": "l2sp:0.01"},
    "bss": {"regularize": "bss:0.001"},
    "lr_find": {"lr": "find"},
}
BASELINE = "plain"
# The budget every arm shares (measured choice: see the docstring); the command line may change it.
BUDGET = {"backbone": "efficientnet_lite0", "image_size": 64, "head_epochs": 2, "epochs": 3,
          "freeze_up_to": "default", "batch_size": 64}
SEEDS = (0, 1, 2)
RUNS, TABLE = "runs.jsonl", "table"
PRECISION_MEMORY = "precision.json"  # tfl.precision's memory of the faster precision, kept across runs


def arm_options(arm: str) -> dict:
    """The options of an arm or of a combination `a+b+...` (an option two parts set differently is refused)."""
    merged: dict = {}
    for part in arm.split("+"):
        if part not in ARMS:
            raise SystemExit(f"--arms: unknown arm {part!r} in {arm!r}; choose from {', '.join(ARMS)}, joined by +")
        for key, value in ARMS[part].items():
            if key in merged and merged[key] != value:
                raise SystemExit(f"--arms {arm!r}: its parts set {key} to both {merged[key]!r} and {value!r}")
            merged[key] = value
    return merged


def run_options(arm: str, dataset: str, seed: int, budget: dict, folders: dict, run_dir: str, cache_dir: str) -> dict:
    """The exact tfl.finetune keyword arguments of one run."""
    data = dict(DATASETS[dataset])
    if "folder" in data:
        data = {"dataset": folders[data.pop("folder")], **data}
    return {**budget, **data, **arm_options(arm), "seed": seed, "output_dir": run_dir, "cache_dir": cache_dir,
            "overwrite": True, "tensorboard": False}


def recorded(options: dict) -> dict:
    """A run's options as runs.jsonl keeps them: what it trains, not where its files go."""
    return {k: v for k, v in options.items() if k not in ("output_dir", "cache_dir", "overwrite")}


def read_runs(work: str) -> list[dict]:
    path = os.path.join(work, RUNS)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill: that run is simply run again
                    continue
    return rows


def append_run(work: str, row: dict) -> None:
    with open(os.path.join(work, RUNS), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def train_one(options: dict, work: str) -> tuple[dict, float]:
    """One tfl.finetune run in this process, from a fresh Keras session and an empty activation cache (every arm
    pays its own feature extraction, so wall times compare); the precision choice is remembered across runs."""
    import keras

    import tfl

    cache = options["cache_dir"]
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(cache)
    memory = os.path.join(work, PRECISION_MEMORY)
    if os.path.isfile(memory):
        shutil.copy(memory, os.path.join(cache, PRECISION_MEMORY))
    keras.backend.clear_session()
    started = time.time()
    result = tfl.finetune(**options)
    seconds = time.time() - started
    if os.path.isfile(os.path.join(cache, PRECISION_MEMORY)):
        shutil.copy(os.path.join(cache, PRECISION_MEMORY), memory)
    shutil.rmtree(cache, ignore_errors=True)
    return result.metrics, seconds


def sweep(work: str, datasets: list[str], arms: list[str], seeds: list[int], budget: dict, command: str,
          log=print, dry_run: bool = False) -> int:
    """Every (dataset, seed, arm) not yet in runs.jsonl (dry_run: list them); returns the number that failed."""
    from calibrate_advise import make_datasets

    folders = make_datasets(work, [n for n in ("digits",) if any(DATASETS[d].get("folder") == n for d in datasets)])
    cache = os.path.join(work, "cache", "run")
    planned = [(d, s, a, run_options(a, d, s, budget, folders, os.path.join(work, "runs", d, a, f"seed{s}"), cache))
               for d in datasets for s in seeds for a in arms]
    # a run is done when runs.jsonl has one with exactly its options (a changed budget or arm spec runs again)
    done = {json.dumps(r["options"], sort_keys=True) for r in read_runs(work)}
    todo = [p for p in planned if json.dumps(recorded(p[3]), sort_keys=True) not in done]
    log(f"{len(todo)} runs to go ({len(planned) - len(todo)} already in {os.path.join(work, RUNS)})")
    if dry_run:
        for dataset, seed, arm, options in todo:
            log(f"{arm} {dataset} seed {seed}: tfl.finetune(**{recorded(options)})")
        return 0
    failed, spent = 0, []
    for number, (dataset, seed, arm, options) in enumerate(todo, 1):
        run_dir = options["output_dir"]
        try:
            metrics, seconds = train_one(options, work)
        except Exception as err:  # noqa: BLE001 - one failed run must not end an hour's sweep; it is logged
            failed += 1
            log(f"[{number}/{len(todo)}] {arm} {dataset} seed {seed}: FAILED {type(err).__name__}: {err}")
            with open(os.path.join(work, "failed.jsonl"), "a") as f:
                f.write(json.dumps({"arm": arm, "dataset": dataset, "seed": seed, "error": repr(err)}) + "\n")
            continue
        spent.append(seconds)
        append_run(work, {
            "arm": arm, "dataset": dataset, "seed": seed, "test_accuracy": metrics["test_accuracy"],
            "val_accuracy": metrics["val_accuracy"], "wall_seconds": round(seconds, 1), "run_dir": run_dir,
            "options": recorded(options),
            "budget": budget, "command": command})
        left = statistics.mean(spent) * (len(todo) - number) / 60
        log(f"[{number}/{len(todo)}] {arm} {dataset} seed {seed}: test {metrics['test_accuracy']:.4f} "
            f"val {metrics['val_accuracy']:.4f} {seconds:.0f}s (about {left:.0f} min left)")
    return failed


# -- the table -----------------------------------------------------------------------------------------------------
def sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def cells(rows: list[dict]) -> list[dict]:
    """Per (arm, dataset): seeds, mean and sd of test accuracy, Δ vs plain (mean of the per-seed differences over
    the seeds both ran) and its sd, mean wall seconds."""
    by = {}
    for r in rows:
        by.setdefault((r["arm"], r["dataset"]), {})[r["seed"]] = r
    out = []
    for (arm, dataset), runs in by.items():
        accs = [runs[s]["test_accuracy"] for s in sorted(runs)]
        base = by.get((BASELINE, dataset), {})
        diffs = [runs[s]["test_accuracy"] - base[s]["test_accuracy"] for s in sorted(runs) if s in base]
        out.append({"arm": arm, "dataset": dataset, "seeds": len(accs), "mean": statistics.mean(accs), "sd": sd(accs),
                    "delta": statistics.mean(diffs) if diffs and arm != BASELINE else None,
                    "delta_sd": sd(diffs) if arm != BASELINE else None,
                    "wall_seconds": statistics.mean(runs[s]["wall_seconds"] for s in runs)})
    return out


def order(names, known) -> list[str]:
    return [n for n in known if n in names] + sorted(n for n in names if n not in known)


def markdown(table: list[dict], commands: list[str]) -> str:
    arms = order({c["arm"] for c in table}, ARMS)
    datasets = order({c["dataset"] for c in table}, DATASETS)
    at = {(c["arm"], c["dataset"]): c for c in table}
    full = max(c["seeds"] for c in table)
    lines = [*(f"    {c}" for c in commands), "",
             "| arm | " + " | ".join(datasets) + " | s/run | loses on |", "|---" * (len(datasets) + 3) + "|"]
    for arm in arms:
        row, walls, losses, compared = [], [], [], 0
        for d in datasets:
            c = at.get((arm, d))
            if c is None:
                row.append("-")
                continue
            spread = "-" if c["sd"] is None else f"{c['sd']:.4f}"
            text = f"{c['mean']:.4f} ± {spread}"
            if c["delta"] is not None:
                text += f" ({c['delta']:+.4f})"
                compared += 1
                if c["delta"] < 0:
                    losses.append(d)
            row.append(text + ("" if c["seeds"] == full else f" n={c['seeds']}"))
            walls.append(c["wall_seconds"])
        lost = f"{len(losses)}/{compared}" + (": " + ", ".join(losses) if losses else "") if compared else ""
        lines.append(f"| {arm} | " + " | ".join(row) + f" | {statistics.mean(walls):.0f} | {lost} |")
    return "\n".join(lines) + "\n"


def figure(table: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = [a for a in order({c["arm"] for c in table}, ARMS) if a != BASELINE]
    datasets = order({c["dataset"] for c in table}, DATASETS)
    at = {(c["arm"], c["dataset"]): c for c in table}
    fig = Figure(figsize=(max(6.0, 0.9 * len(arms) + 2), 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(datasets))
    for i, d in enumerate(datasets):
        xs, ys, errs = [], [], []
        for j, arm in enumerate(arms):
            c = at.get((arm, d))
            if c is not None and c["delta"] is not None:
                xs.append(j + (i - (len(datasets) - 1) / 2) * width)
                ys.append(100 * c["delta"])
                errs.append(100 * (c["delta_sd"] or 0.0))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=d)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel("Δ test accuracy vs plain (points)\nerror bars: sd over seeds of the difference")
    ax.set_title("Each option against the plain two-stage run")
    ax.legend()
    fig.savefig(path)


def report(work: str, log=print) -> str:
    from tfl.training.rundir import RunDir

    rows = read_runs(work)
    if not rows:
        raise SystemExit(f"{os.path.join(work, RUNS)}: no finished runs to report")
    budgets = {json.dumps(r["budget"], sort_keys=True) for r in rows}
    if len(budgets) > 1:
        raise SystemExit(f"{os.path.join(work, RUNS)} mixes budgets {sorted(budgets)}; one --work per budget")
    table = cells(rows)
    commands = list(dict.fromkeys(r["command"] for r in rows))
    text = markdown(table, commands)
    folder = RunDir(work)
    with open(folder.file(TABLE + ".md"), "w") as f:
        f.write(text)
    round_ = lambda v: None if v is None else round(v, 6)  # noqa: E731
    csv_rows = [{k: round_(v) if isinstance(v, float) else v for k, v in c.items()} for c in table]
    folder.write_csv(TABLE + ".csv", list(csv_rows[0]), csv_rows)
    folder.write_json(TABLE + ".json", {"commands": commands, "budget": rows[0]["budget"], "datasets": DATASETS,
                                        "arms": {a: arm_options(a) for a in order({r["arm"] for r in rows}, ARMS)},
                                        "cells": csv_rows, "runs": rows})
    figure(table, folder.file(TABLE + ".png"))
    return text


def names(text: str, known: dict | None, what: str) -> list[str]:
    out = [n.strip() for n in text.split(",") if n.strip()]
    for n in out:
        if known is not None and n not in known:
            raise SystemExit(f"{what}: unknown {n!r}; choose from {', '.join(known)}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/train-better", help="Runs, runs.jsonl and the tables go here.")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="Comma-separated: " + ", ".join(DATASETS))
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated: " + ", ".join(ARMS)
                        + "; a combination joins arms with +, e.g. ema+randaugment.")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--image-size", type=int, default=BUDGET["image_size"])
    parser.add_argument("--head-epochs", type=int, default=BUDGET["head_epochs"])
    parser.add_argument("--epochs", type=int, default=BUDGET["epochs"])
    parser.add_argument("--freeze-up-to", default=BUDGET["freeze_up_to"])
    parser.add_argument("--report-only", action="store_true", help="Write the tables from runs.jsonl; train nothing.")
    parser.add_argument("--verbose", action="store_true", help="tfl's own log lines too.")
    parser.add_argument("--dry-run", action="store_true", help="List the runs to go and their options; train nothing.")
    args = parser.parse_args(argv)
    if not args.report_only:
        datasets = names(args.datasets, DATASETS, "--datasets")
        arms = names(args.arms, None, "--arms")
        for arm in arms:
            arm_options(arm)
        seeds = [int(s) for s in names(args.seeds, None, "--seeds")]
        budget = {**BUDGET, "image_size": args.image_size, "head_epochs": args.head_epochs, "epochs": args.epochs,
                  "freeze_up_to": args.freeze_up_to}
        os.environ["TFL_PROGRESS"] = "0"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        logging.basicConfig(format="%(message)s")
        logging.getLogger("tfl").setLevel(logging.INFO if args.verbose else logging.WARNING)
        os.makedirs(args.work, exist_ok=True)
        command = shlex.join(["python", "scripts/train_better.py", *(sys.argv[1:] if argv is None else argv)])
        failed = sweep(args.work, datasets, arms, seeds, budget, command, log=lambda m: print(m, flush=True),
                       dry_run=args.dry_run)
        if args.dry_run:
            return 0
    else:
        failed = 0
    print(report(args.work))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
