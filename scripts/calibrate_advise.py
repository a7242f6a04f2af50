"""Calibrate `tfl advise`: do its scores rank freeze depths the way fine-tuning does, and is its depth close?

For every dataset below: `tfl advise` once (scores per boundary, its recommended --freeze-up-to), then `tfl
finetune` at each depth of DEPTHS with the same budget (image size, epochs, batch, lr, seed). Reports per dataset
Kendall's tau between each score at a boundary and the test accuracy of fine-tuning with that boundary frozen,
and whether the recommended depth is within one canonical stage of the best depth tried. Writes
calibration.json and calibration.md (the table in docs/results/advise.md) to --work.

Datasets, all offline, as image folders ROOT/{train,val,test}/<class>/*.png made here (seeded):
  fmnist10 / fmnist100 / fmnist1000   Fashion-MNIST, 10 / 100 / 1,000 train images per class
  fmnist100_inverted                  the same 100 per class with 255 - pixel (a made-up shift)
  fmnist100_blurred                   the same 100 per class, Gaussian-blurred (radius 2 px): a shift held out
                                      from the rules' thresholds (they were set on the four sets before it)
  digits                              scikit-learn's 8x8 digits (1,797 images; 0..16 scaled to 0..255)
  digits20                            20 of those per class (the same val and test): small, different
  fmnist300, fmnist1000_inverted      more training images than the proxy's 1,000 (fmnist300: docs/results/advise.md)
Every Fashion-MNIST folder has the same val (30 per class, other train rows) and test (100 per class of t10k).

    pip install 'tfl[calibrate]'     # scikit-learn, for the digits
    nice -n 5 python scripts/calibrate_advise.py --work /tmp/calibrate [--datasets fmnist10,digits] [--seeds 0,1]
    python scripts/calibrate_advise.py --work /tmp/calibrate --rules    # score every tie rule; trains nothing

--rules reads <work>/calibration.json (the hand-swept test accuracy per depth) and <work>/advise/<dataset>/
advise.json (the proxy's fold accuracies per depth) and, for every tie rule of tfl.recipes.advise.TIE_RULES,
recomputes the depth advise would choose: how many datasets land within one stage of the best depth, and the
test accuracy given up. It writes rules.json and rules.md to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEPTHS = ("stem", "block2", "block4", "block6", "head")  # --freeze-up-to values tried, shallow to deep
DATASETS = ("fmnist10", "fmnist100", "fmnist100_inverted", "digits", "fmnist1000", "fmnist100_blurred", "digits20",
            "fmnist300", "fmnist1000_inverted")
FINETUNE = ["--image-size", "64", "--head-epochs", "8", "--epochs", "4", "--batch-size", "32", "--seed", "0",
            "--no-tensorboard"]
# The proxy's budget is FINETUNE's, on at most --sample images.
ADVISE = ["--image-size", "64", "--sample", "1000", "--seed", "0", "--head-epochs", "8", "--epochs", "4",
          "--batch-size", "32"]
SCORE_NAMES = ("logme", "h_score", "probe_accuracy", "proxy_accuracy")
SEED = 0
FMNIST_VAL, FMNIST_TEST = 30, 100  # per class


def write_folder(root: str, splits: dict) -> str:
    """splits: name -> (images uint8 [N, H, W], labels [N]); writes RGB PNGs."""
    from PIL import Image

    if os.path.isfile(os.path.join(root, "done")):
        return root
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, f"c{int(label)}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(np.repeat(image[..., None], 3, axis=2)).save(os.path.join(folder, f"{i:05d}.png"))
    open(os.path.join(root, "done"), "w").close()
    return root


def per_class(labels: np.ndarray, counts: dict, rng) -> dict:
    """Disjoint per-class picks: name -> row indices, `counts[name]` rows of each class."""
    picks = {name: [] for name in counts}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, n in counts.items():
            picks[name].append(members[start: start + n])
            start += n
    return {name: np.sort(np.concatenate(parts)) for name, parts in picks.items()}


def fashion_mnist():
    from tfl.data.idx import read_idx

    base = "/usr/share/datasets/fashion-mnist"
    read = lambda name: read_idx(os.path.join(base, name + ".gz"))  # noqa: E731
    return (read("train-images-idx3-ubyte"), read("train-labels-idx1-ubyte"), read("t10k-images-idx3-ubyte"),
            read("t10k-labels-idx1-ubyte"))


def make_datasets(work: str, names) -> dict:
    folders = {}
    if any(n.startswith("fmnist") for n in names):
        x, y, xt, yt = fashion_mnist()
        rng = np.random.default_rng(SEED)
        rows = per_class(y, {"val": FMNIST_VAL, "train": 1000}, rng)
        test = per_class(yt, {"test": FMNIST_TEST}, rng)["test"]
        for name in names:
            if not name.startswith("fmnist"):
                continue
            n = int(name[len("fmnist"):].split("_")[0])
            train = np.sort(np.concatenate([rows["train"][y[rows["train"]] == c][:n] for c in range(10)]))
            shift = {"inverted": lambda a: 255 - a, "blurred": blur}.get(name.split("_")[-1], lambda a: a)
            folders[name] = write_folder(os.path.join(work, "data", name), {
                "train": (shift(x[train]), y[train]), "val": (shift(x[rows["val"]]), y[rows["val"]]),
                "test": (shift(xt[test]), yt[test])})
    if "digits" in names or "digits20" in names:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        order = np.random.default_rng(SEED).permutation(len(images))
        train, val, test = order[:1200], order[1200:1450], order[1450:]
        few = np.sort(np.concatenate([train[digits.target[train] == c][:20] for c in range(10)]))
        for name, rows in (("digits", train), ("digits20", few)):
            if name in names:
                folders[name] = write_folder(os.path.join(work, "data", name), {
                    "train": (images[rows], digits.target[rows]), "val": (images[val], digits.target[val]),
                    "test": (images[test], digits.target[test])})
    return folders


def blur(images: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))) for a in images])


def run(args: list[str], log) -> float:
    """`tfl ARGS` in this process (one TensorFlow start-up for every run; a fresh Keras session for each)."""
    import keras
    from click.testing import CliRunner

    from tfl.cli import cli

    keras.backend.clear_session()
    started = time.time()
    done = CliRunner().invoke(cli, [str(a) for a in args])
    if done.exit_code != 0:
        raise SystemExit(f"failed ({done.exit_code}): tfl {' '.join(map(str, args))}\n{done.output[-3000:]}"
                         + (repr(done.exception) if done.exception else ""))
    log(f"  {time.time() - started:.0f}s: tfl {' '.join(map(str, args))}")
    return time.time() - started


def calibrate(work: str, names, cache_dir: str, log=print, seeds=(SEED,)) -> dict:
    from tfl.recipes.transferability import kendall_tau

    folders = make_datasets(work, names)
    result = {"depths": list(DEPTHS), "finetune": FINETUNE, "advise": ADVISE, "seed": SEED, "datasets": {}}
    out_json = os.path.join(work, "calibration.json")
    if os.path.isfile(out_json):
        with open(out_json) as f:
            result["datasets"] = json.load(f).get("datasets", {})
    for name in names:
        entry = result["datasets"].get(name, {"runs": {}})
        log(f"{name}: {folders[name]}")
        advise_dir = os.path.join(work, "advise", name)
        if not _has_proxy(os.path.join(advise_dir, "advise.json")):
            entry["advise_seconds"] = round(run(["advise", "--dataset", folders[name], *ADVISE, "--cache-dir",
                                                    cache_dir, "--output-dir", advise_dir], log), 1)
        with open(os.path.join(advise_dir, "advise.json")) as f:
            advice = json.load(f)
        for seed, depth in [(seed, depth) for seed in seeds for depth in DEPTHS]:
            runs = seed_runs(entry, seed)
            if depth in runs:
                continue
            run_dir = os.path.join(work, "runs", name, *([] if seed == SEED else [f"seed{seed}"]), depth)
            finetune = FINETUNE.copy()
            finetune[finetune.index("--seed") + 1] = str(seed)
            seconds = run(["finetune", "--dataset", folders[name], "--freeze-up-to", depth, *finetune,
                           "--cache-dir", cache_dir, "--output-dir", run_dir], log)
            with open(os.path.join(run_dir, "metrics.json")) as f:
                metrics = json.load(f)
            runs[depth] = {"test_accuracy": metrics["test_accuracy"], "val_accuracy": metrics["val_accuracy"],
                           "seconds": round(seconds, 1)}
            result["datasets"][name] = entry
            _write(work, result)
        entry.update(summarise(advice, entry, kendall_tau))
        result["datasets"][name] = entry
        _write(work, result)
    result["overall"] = overall(result["datasets"])
    _write(work, result)
    return result


def seed_runs(entry: dict, seed: int) -> dict:
    """The fine-tuning runs of one seed: "runs" holds SEED's (the advice's seed), "seed_runs" the others'."""
    return entry["runs"] if seed == SEED else entry.setdefault("seed_runs", {}).setdefault(str(seed), {})


def mean_runs(entry: dict) -> tuple[dict, list]:
    """Test accuracy per depth averaged over the seeds run at every depth; and those seeds."""
    by_seed = {SEED: entry["runs"], **{int(k): v for k, v in entry.get("seed_runs", {}).items()}}
    seeds = [s for s, runs in sorted(by_seed.items()) if all(d in runs for d in DEPTHS)] or [SEED]
    depths = [d for d in DEPTHS if all(d in by_seed[s] for s in seeds)]
    return {d: {"test_accuracy": round(float(np.mean([by_seed[s][d]["test_accuracy"] for s in seeds])), 6)}
            for d in depths}, seeds


def _has_proxy(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        proxy = json.load(f).get("proxy")
    # "folds": an advise.json from before the k-fold proxy has one val score per depth; advise again
    return bool(proxy) and "folds" in proxy and [proxy["head_epochs"], proxy["epochs"], proxy["batch_size"]] == [
        int(ADVISE[ADVISE.index(flag) + 1]) for flag in ("--head-epochs", "--epochs", "--batch-size")]


def stage_index(advice: dict, depth: str | None) -> int:
    names = [row["boundary"] for row in advice["boundaries"]]
    return -1 if depth is None else names.index(depth)


def summarise(advice: dict, entry: dict, kendall_tau) -> dict:
    """Scores against the test accuracy per depth (the mean over the seeds run), the advice against the best."""
    from tfl.recipes.advise import TIE_RULES, recommend

    runs, seeds = mean_runs(entry)
    between = None  # how well one seed's accuracies rank another's: the ceiling for any score
    if len(seeds) > 1:
        first, second = (seed_runs(entry, s) for s in seeds[:2])
        between = round(kendall_tau([first[d]["test_accuracy"] for d in DEPTHS],
                                    [second[d]["test_accuracy"] for d in DEPTHS]), 3)

    by_boundary = {row["boundary"]: row for row in advice["boundaries"]}
    depths = [d for d in DEPTHS if d in runs]
    accuracy = [runs[d]["test_accuracy"] for d in depths]
    taus = {score: round(kendall_tau([by_boundary[d][score] for d in depths], accuracy), 3)
            for score in SCORE_NAMES if all(by_boundary[d].get(score) is not None for d in depths)}
    best = max(depths, key=lambda d: (runs[d]["test_accuracy"], DEPTHS.index(d)))  # ties: the cheaper, deeper
    # The rules as the code has them now (they may have changed since advise.json was written).
    rec = recommend(advice["data"], advice["boundaries"], advice["bn_gap_per_stage"], advice["stride"],
                    advice["data"]["backbone_input_size"], advice["lr"],
                    score="proxy_accuracy" if "proxy_accuracy" in taus else "logme", proxy=advice.get("proxy"))
    chosen = rec["freeze_up_to"]
    distance = abs(stage_index(advice, chosen) - stage_index(advice, best))
    def regret(depth):  # test accuracy lost against the best depth tried (None: that depth was not run)
        return round(runs[best]["test_accuracy"] - runs[depth]["test_accuracy"], 6) if depth in runs else None

    by_score = {}  # the same rules driven by each score: which depth, and is it within one stage of the best
    variants = [(score, score, None) for score in taus]
    if "proxy_accuracy" in taus:  # every tie rule among the depths within one standard error of the best mean
        variants += [(f"proxy_{rule}", "proxy_accuracy", rule) for rule in TIE_RULES]
    for name, score, rule in variants:
        other = recommend(advice["data"], advice["boundaries"], advice["bn_gap_per_stage"], advice["stride"],
                          advice["data"]["backbone_input_size"], advice["lr"], score=score,
                          proxy=advice.get("proxy"), tie_rule=rule)["freeze_up_to"]
        by_score[name] = {"recommended": other, "regret": regret(other),
                          "within_one_stage": abs(stage_index(advice, other) - stage_index(advice, best)) <= 1}
    argmax = {score: max(depths, key=lambda d: by_boundary[d][score]) for score in taus}
    return {"tau": taus, "seeds": seeds, "mean_test_accuracy": {d: runs[d]["test_accuracy"] for d in depths},
            "tau_between_seeds": between, "best_depth": best, "recommended": chosen, "regret": regret(chosen),
            "stage_distance": distance,
            "within_one_stage": distance <= 1, "score_argmax_depth": argmax, "rules_by_score": by_score,
            "bn_gap_per_stage": advice["bn_gap_per_stage"], "low_level_bn_gap": rec["low_level_bn_gap"],
            "scores": {d: {k: by_boundary[d].get(k) for k in SCORE_NAMES} for d in depths},
            "reason": rec["reasons"]["freeze_up_to"]}


def resummarise(work: str) -> dict:
    from tfl.recipes.transferability import kendall_tau

    with open(os.path.join(work, "calibration.json")) as f:
        result = json.load(f)
    for name, entry in result["datasets"].items():
        if len(entry["runs"]) < 2:
            continue
        with open(os.path.join(work, "advise", name, "advise.json")) as f:
            entry.update(summarise(json.load(f), entry, kendall_tau))
    result["overall"] = overall(result["datasets"])
    _write(work, result)
    return result


def overall(datasets: dict) -> dict:
    done = [d for d in datasets.values() if "tau" in d]
    if not done:
        return {}
    mean_tau = {s: round(float(np.nanmean([d["tau"][s] for d in done if s in d["tau"]])), 3)
                for s in SCORE_NAMES if any(s in d["tau"] for d in done)}
    within = sum(d["within_one_stage"] for d in done)
    variants = list(dict.fromkeys(v for d in done for v in d["rules_by_score"]))
    by_score = {s: f"{sum(d['rules_by_score'][s]['within_one_stage'] for d in done if s in d['rules_by_score'])}/"
                   f"{sum(s in d['rules_by_score'] for d in done)}" for s in variants}
    regrets = {s: [d["rules_by_score"][s].get("regret") for d in done if s in d["rules_by_score"]] for s in variants}
    mean_regret = {s: (round(float(np.mean([r for r in v if r is not None])), 4) if any(r is not None for r in v)
                       else None) for s, v in regrets.items()}
    return {"mean_tau": mean_tau, "within_one_stage": f"{within}/{len(done)}",
            "within_one_stage_share": round(within / len(done), 3), "within_one_stage_by_score": by_score,
            "mean_regret_by_score": mean_regret}


def _write(work: str, result: dict) -> None:
    with open(os.path.join(work, "calibration.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(work, "calibration.md"), "w") as f:
        f.write(table(result))


def table(result: dict) -> str:
    depths = result["depths"]
    taus = ("logme", "h_score", "probe_accuracy", "proxy_accuracy")
    lines = ["| dataset (seeds) | " + " | ".join(depths) + " | best | advised (proxy) | advised (LogME rules) | "
             "tau LogME | tau H-score | tau probe | tau proxy | tau seed 0 vs 1 |", "|---" * (len(depths) + 9) + "|"]
    tau = lambda d, s: f"{d['tau'][s]:.2f}" if s in d["tau"] else "-"  # noqa: E731
    for name, d in result["datasets"].items():
        if "tau" not in d:
            continue
        means = d.get("mean_test_accuracy") or {}
        accs = [f"{means[x]:.3f}" if x in means else "-" for x in depths]
        rules = d["rules_by_score"]["logme"]
        between = "-" if d.get("tau_between_seeds") is None else f"{d['tau_between_seeds']:.2f}"
        lines.append(f"| {name} ({len(d.get('seeds') or [0])}) | " + " | ".join(accs)
                     + f" | {d['best_depth']} | {d['recommended'] or 'none'}"
                     f"{'' if d['within_one_stage'] else ' (off)'} | {rules['recommended'] or 'none'}"
                     f"{'' if rules['within_one_stage'] else ' (off)'} | " + " | ".join(tau(d, s) for s in taus)
                     + f" | {between} |")
    o = result.get("overall") or {}
    if o:
        m = o["mean_tau"]
        lines.append("| mean / share | " + " | ".join("" for _ in depths) + f" | | {o['within_one_stage']} within one "
                     f"stage | {o['within_one_stage_by_score'].get('logme', '-')} | "
                     + " | ".join(f"{m[s]:.2f}" if s in m else "-" for s in taus) + " | |")
    return "\n".join(lines) + "\n"


def rules_report(work: str, log=print) -> dict:
    """Every tie rule scored from the advise.json files and the hand-swept runs already in `work`, training
    nothing: per rule, the depth it picks on each dataset, how many land within one stage of the best depth, and
    the mean test accuracy given up (over the datasets where its depth was run). Writes rules.json and rules.md."""
    from tfl.recipes.advise import PROXY, TIE_RULES, recommend

    with open(os.path.join(work, "calibration.json")) as f:
        datasets = json.load(f)["datasets"]
    per_dataset = {}
    for name, entry in datasets.items():
        path = os.path.join(work, "advise", name, "advise.json")
        runs, _ = mean_runs(entry)
        if not os.path.isfile(path) or len(runs) < 2:
            log(f"--rules: {name}: no advise.json or hand-swept runs in {work}; left out")
            continue
        with open(path) as f:
            advice = json.load(f)
        if not advice.get("proxy"):
            log(f"--rules: {name}: advise.json has no proxy; left out")
            continue
        best = max(runs, key=lambda d: (runs[d]["test_accuracy"], DEPTHS.index(d)))
        proxy = advice["proxy"]
        picks = {}
        for rule in TIE_RULES:
            rec = recommend(advice["data"], advice["boundaries"], advice["bn_gap_per_stage"], advice["stride"],
                            advice["data"]["backbone_input_size"], advice["lr"], score=PROXY, proxy=proxy,
                            tie_rule=rule)
            depth = rec["freeze_up_to"]
            picks[rule] = {"recommended": depth, "tied": rec["tied"],
                           "within_one_stage": abs(stage_index(advice, depth) - stage_index(advice, best)) <= 1,
                           "regret": (round(runs[best]["test_accuracy"] - runs[depth]["test_accuracy"], 6)
                                      if depth in runs else None)}
        per_dataset[name] = {"best_depth": best, "folds": proxy.get("folds", 1), "rules": picks}
    totals = {}
    for rule in TIE_RULES:
        rows = [d["rules"][rule] for d in per_dataset.values()]
        regrets = [r["regret"] for r in rows if r["regret"] is not None]
        totals[rule] = {"within_one_stage": f"{sum(r['within_one_stage'] for r in rows)}/{len(rows)}",
                        "mean_regret": round(float(np.mean(regrets)), 4) if regrets else None,
                        "regret_measured_on": len(regrets)}
    report = {"datasets": per_dataset, "rules": totals}
    with open(os.path.join(work, "rules.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(work, "rules.md"), "w") as f:
        f.write(rules_table(report))
    return report


def rules_table(report: dict) -> str:
    names = list(report["datasets"])
    lines = ["| tie rule | within one stage | mean regret (sets run) | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]
    best = "| *best depth (hand sweep)* | | | " + " | ".join(report["datasets"][n]["best_depth"] for n in names)
    for rule, total in report["rules"].items():
        regret = "-" if total["mean_regret"] is None else f"{100 * total['mean_regret']:.2f} pt"
        cells = []
        for n in names:
            pick = report["datasets"][n]["rules"][rule]
            cells.append(f"{pick['recommended']}{'' if pick['within_one_stage'] else ' (off)'}")
        lines.append(f"| {rule} | {total['within_one_stage']} | {regret} ({total['regret_measured_on']}) | "
                     + " | ".join(cells) + " |")
    return "\n".join([*lines, best + " |"]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/tfl-calibrate", help="Data folders, runs and the results go here.")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="Comma-separated, from: "
                        + ", ".join(DATASETS) + ".")
    parser.add_argument("--cache-dir", default=None, help="tfl's cache (default: <work>/cache).")
    parser.add_argument("--seeds", default=str(SEED), help="Comma-separated fine-tuning seeds (the data splits and "
                        "the advice keep seed 0); the accuracy per depth is their mean.")
    parser.add_argument("--summarise-only", action="store_true",
                        help="Recompute the summaries (the current rules) from <work>'s runs; train nothing.")
    parser.add_argument("--rules", action="store_true", help=(
        "Score every proxy tie rule from <work>'s advise.json files and runs (within one stage of the best depth, "
        "test accuracy given up); train nothing. Writes rules.json and rules.md."))
    args = parser.parse_args()
    if args.rules:
        print(rules_table(rules_report(args.work)), end="")
        return
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if args.summarise_only:
        print(table(resummarise(args.work)))
        return
    os.makedirs(args.work, exist_ok=True)
    result = calibrate(args.work, names, args.cache_dir or os.path.join(args.work, "cache"),
                       log=lambda m: print(m, flush=True), seeds=[int(x) for x in args.seeds.split(",")])
    print(table(result))


if __name__ == "__main__":
    main()
