"""Measure tfl's shipping tools as a user runs them: calibration, abstaining, TTA, WiSE-FT and a greedy soup, on
Fashion-MNIST's test set and on two shifted copies of it.

Runs: the embedded default's recipe (`tfl finetune` with its defaults: EfficientNet-Lite0, Fashion-MNIST at 112 px,
10 head epochs + 4 fine-tuning epochs above block4) on a seeded 10,000 of the 54,000 training images (so the three
seeds fit in an hour on a 2-core CPU), seeds 0, 1, 2. Each model is then scored by `tfl report --json` on:
  test       Fashion-MNIST's t10k (10,000 images)
  inverted   the same images, 255 - pixel
  blurred    the same images, Gaussian-blurred (radius 2 px, PIL)
The shifted sets are written as IDX files (train files copied, t10k replaced) so `--dataset fashion_mnist --data-dir
DIR` reads them with the run's own classes. Every step is a `tfl` command (printed as it runs); steps already done
are skipped, so the script can be re-run after an interruption. Results: WORK/ship.json and WORK/ship.md.

    nice -n 5 python scripts/ship_experiment.py --work /tmp/ship [--seeds 0,1,2] [--limit-train 10000]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
SHIFTS = ("inverted", "blurred")
ABSTAIN = "precision:0.99"  # the coverage reported is at 99 % selective accuracy, the threshold chosen on val
TTA_MODES = ("flip", "flip+crops")
WISE_ALPHAS = (0.0, 0.5, 0.75, 1.0)  # 1 is the run itself, scored with the runs


def tfl(*args, log) -> dict | None:
    """`tfl ARGS` in a subprocess; the JSON it prints when --json is among ARGS."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "tfl"), *map(str, args)]
    log("$ tfl " + " ".join(map(str, args)))
    started = time.time()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}) after {time.time() - started:.0f}s:\n{done.stderr[-4000:]}")
    log(f"  done in {time.time() - started:.0f}s")
    return json.loads(done.stdout) if "--json" in args else None


def write_idx(path: str, array: np.ndarray) -> None:
    """An IDX3 uint8 image file (gzipped), as Fashion-MNIST ships."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def blur(images: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))) for a in images])


def shifted_data(work: str) -> dict:
    """shift name -> a --data-dir holding Fashion-MNIST with its t10k images shifted."""
    sys.path.insert(0, ROOT)
    from tfl.data.idx import read_idx

    test = read_idx(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz"))
    dirs = {}
    for shift, fn in (("inverted", lambda a: 255 - a), ("blurred", blur)):
        folder = os.path.join(work, "data", shift, "fashion_mnist")
        dirs[shift] = os.path.dirname(folder)
        if os.path.isfile(os.path.join(folder, "done")):
            continue
        os.makedirs(folder, exist_ok=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
            shutil.copyfile(os.path.join(FASHION, name + ".gz"), os.path.join(folder, name + ".gz"))
        write_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), fn(test))
        open(os.path.join(folder, "done"), "w").close()
    return dirs


def train(work: str, seed: int, limit: int, log) -> str:
    run = os.path.join(work, "runs", f"seed{seed}")
    if not os.path.isfile(os.path.join(run, "metrics.json")):
        tfl("finetune", "--limit-train", limit, "--seed", seed, "--output-dir", run, "--overwrite", "--json",
            log=log)
    return run


def score(run: str, data: dict, log, test: bool = True) -> dict:
    """`tfl report --json` of RUN on test (unless `test` is False) and each shift: accuracy, and for a calibrated
    run ECE/NLL before and after T and the abstain coverage."""
    out = {}
    calibrated = os.path.join(run, "calibration.json")
    for name, data_dir in ((("test", None),) if test else ()) + tuple(data.items()):
        folder = os.path.join(run, "report-" + name)
        cached = os.path.join(folder, "report.json")
        if os.path.isfile(cached) and (not os.path.isfile(calibrated)
                                       or os.path.getmtime(cached) > os.path.getmtime(calibrated)):
            with open(cached) as f:
                report = json.load(f)
        else:
            args = ["--data-dir", data_dir, "--dataset", "fashion_mnist"] if data_dir else []
            report = tfl("report", "--run", run, *args, "--output-dir", folder, "--json", log=log)
        c, a = report.get("calibration", {}), report.get("abstain", {})
        out[name] = {"accuracy": report["accuracy"],
                     "ece_before": c.get("before", {}).get("ece"), "ece_after": c.get("after", {}).get("ece"),
                     "nll_before": c.get("before", {}).get("nll"), "nll_after": c.get("after", {}).get("nll"),
                     "coverage": a.get("coverage"), "selective_accuracy": a.get("selective_accuracy")}
    return out


def calibrate(run: str, log, tta: str | None = None) -> dict:
    path = os.path.join(run, "calibration.json")
    if not os.path.isfile(path):
        tfl("calibrate", "--run", run, "--abstain", ABSTAIN, *(["--tta", tta] if tta else []), "--json", log=log)
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--steps", default="train,calibrate", help="comma list of train,calibrate,tta,wise_ft,soup")
    p.add_argument("--tta-seeds", default=None, help="seeds whose runs get TTA (default: all)")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    log_file = open(os.path.join(args.work, "ship.log"), "a")

    def log(line):
        print(line, file=sys.stderr, flush=True)
        print(line, file=log_file, flush=True)

    steps = set(args.steps.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    data = shifted_data(args.work)
    results_path = os.path.join(args.work, "ship.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}

    def save():
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)

    runs = {}
    for seed in seeds:
        runs[seed] = train(args.work, seed, args.limit_train, log) if "train" in steps else \
            os.path.join(args.work, "runs", f"seed{seed}")
        with open(os.path.join(runs[seed], "metrics.json")) as f:
            metrics = json.load(f)
        results.setdefault("runs", {})[f"seed{seed}"] = {"val_accuracy": metrics.get("val_accuracy"),
                                                         "test_accuracy": metrics.get("test_accuracy"),
                                                         "seconds": metrics.get("seconds")}
        save()
    if "calibrate" in steps:
        for seed, run in runs.items():
            cal = calibrate(run, log)
            results["runs"][f"seed{seed}"].update(temperature=cal["temperature"], scores=score(run, data, log))
            save()
    if "tta" in steps:  # on copies of each run: calibrate --tta decides on val, then the same scores
        tta_seeds = [int(x) for x in args.tta_seeds.split(",")] if args.tta_seeds else seeds
        for seed, run in ((s, runs[s]) for s in tta_seeds):
            for mode in TTA_MODES:
                copy = copy_run(run, f"{run}-tta-{mode.replace('+', '-')}")
                cal = calibrate(copy, log, tta=mode)
                # the shifted sets only for flip (7 passes an image for flip+crops is more than this budget has)
                results.setdefault("tta", {}).setdefault(mode, {})[f"seed{seed}"] = {
                    "kept": cal["tta"]["kept"], "reason": cal["tta"]["reason"], "val": cal["tta"]["val"],
                    "test": cal["tta"].get("test"), "temperature": cal["temperature"],
                    "scores": score(copy, data, log) if cal["tta"]["kept"] and mode == "flip" else None}
                save()
    if "wise_ft" in steps:  # seed 0's backbone at fixed alphas (each a run directory): val and test from wise-ft's
        run = runs[seeds[0]]  # own table, the shifted sets from tfl report (uncalibrated: accuracy is what counts)
        for alpha in WISE_ALPHAS[:-1]:
            out = f"{run}-wise-{alpha:g}"
            if not os.path.isdir(out):
                tfl("wise-ft", "--run", run, "--alpha", alpha, "--output", out, "--json", log=log)
            with open(os.path.join(out, "wise_ft.csv")) as f:
                rows = {float(r["alpha"]): r for r in csv.DictReader(f)}
            results.setdefault("wise_ft", {})[f"{alpha:g}"] = {
                **{k: float(rows[alpha][k]) for k in ("val_accuracy", "test_accuracy", "val_nll", "test_nll")},
                **{k: v["accuracy"] for k, v in score(out, data, log, test=False).items()}}
            save()
    if "soup" in steps:  # the greedy soup of the seeds' runs against the best of them
        out = os.path.join(args.work, "runs", "soup")
        if not os.path.isdir(out):
            tfl("soup", *runs.values(), "--output", out, "--json", log=log)
        calibrate(out, log)
        with open(os.path.join(out, "soup.csv")) as f:
            results["soup"] = {"ingredients": f.read(), "scores": score(out, data, log)}
        save()
    with open(os.path.join(args.work, "ship.md"), "w") as f:
        f.write(markdown(results))
    log(markdown(results))


def mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def markdown(results: dict) -> str:
    """The tables of docs/results/shipping.md from ship.json."""
    runs = results.get("runs", {})
    sets = ("test", *SHIFTS)
    out = [f"Seeds: {', '.join(runs)} (mean ± sd over them).", "",
           "| test set | accuracy | ECE before | ECE after | NLL before | NLL after | coverage at 99 % | "
           "its selective accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name in sets:
        cells = [mean_sd([r["scores"][name][k] for r in runs.values() if "scores" in r])
                 for k in ("accuracy", "ece_before", "ece_after", "nll_before", "nll_after", "coverage",
                           "selective_accuracy")]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    temps = [r.get("temperature") for r in runs.values()]
    out += ["", f"Temperature T: {mean_sd(temps)}.", ""]
    if "tta" in results:
        out += ["| TTA | seed | kept | val acc plain → TTA | val NLL plain → TTA | test acc plain → TTA | "
                "test NLL plain → TTA |", "|---|---|---|---|---|---|---|"]
        for mode, per_seed in results["tta"].items():
            for seed, r in per_seed.items():
                v, t = r["val"], r["test"] or {}
                out.append(f"| {mode} | {seed} | {'yes' if r['kept'] else 'no'} | {v['plain']['accuracy']:.4f} → "
                           f"{v['tta']['accuracy']:.4f} | {v['plain']['nll']:.4f} → {v['tta']['nll']:.4f} | "
                           + (f"{t['plain']['accuracy']:.4f} → {t['tta']['accuracy']:.4f} | {t['plain']['nll']:.4f}"
                              f" → {t['tta']['nll']:.4f} |" if t else "- | - |"))
        out.append("")
    if "wise_ft" in results:
        first = next(iter(runs))
        base = runs[first]
        rows = {**results["wise_ft"], "1": {"val_accuracy": base["val_accuracy"], "test_accuracy":
                                            base["test_accuracy"],
                                            **{k: base["scores"][k]["accuracy"] for k in SHIFTS}}}
        out += [f"| alpha ({first}) | val acc | test acc | inverted acc | blurred acc |", "|---|---|---|---|---|"]
        for alpha, r in sorted(rows.items(), key=lambda kv: float(kv[0])):
            out.append(f"| {alpha} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['inverted']:.4f} | "
                       f"{r['blurred']:.4f} |")
        out.append("")
    if "soup" in results:
        best = max(runs, key=lambda k: runs[k]["val_accuracy"])
        out += ["| model | " + " | ".join(f"{n} acc" for n in sets) + " |", "|---|" + "---|" * len(sets)]
        for label, scores in ((f"best seed by val ({best})", runs[best]["scores"]),
                              ("greedy soup", results["soup"]["scores"])):
            out.append(f"| {label} | " + " | ".join(f"{scores[n]['accuracy']:.4f}" for n in sets) + " |")
        out += ["", "soup.csv:", "", "```", results["soup"]["ingredients"].strip(), "```", ""]
    return "\n".join(out) + "\n"


def copy_run(run: str, to: str) -> str:
    """A copy of a finished run directory without its calibration and reports (they are made anew)."""
    if not os.path.isdir(to):
        shutil.copytree(run, to + ".partial", ignore=shutil.ignore_patterns("report-*", "calibration.json", "report"))
        os.rename(to + ".partial", to)
    return to


if __name__ == "__main__":
    main()
