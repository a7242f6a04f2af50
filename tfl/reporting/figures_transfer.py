"""Figures of `tfl advise`, `dann`, `fewshot`, `multitask` and `self-train` (Agg canvas, atomic writes, as
tfl.reporting.figures)."""

from __future__ import annotations

import numpy as np

from tfl.errors import UsageError
from tfl.reporting.figures import STAGE_LINE, _figure, _finish, _number


def write_dann(runs: list[dict], curves: dict[str, list[dict]], path: str, title: str | None = None) -> str:
    """Left: target test accuracy per seed, source-only vs DANN (a line per seed; red where DANN is worse).
    Right: each run's target accuracy on val (monitoring only) and its domain classifier's accuracy per epoch."""
    if not runs:
        raise UsageError(f"write_dann needs at least one run, got none (for {path})")
    figure = _figure((13, 4.4))
    seeds_ax, curve_ax = figure.subplots(1, 2)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    by = {(r["arm"], r["seed"]): r for r in runs}
    for seed in dict.fromkeys(r["seed"] for r in runs):
        values = [by[(a, seed)]["target_test_accuracy"] if (a, seed) in by else np.nan for a in arms]
        worse = len(values) == 2 and values[1] < values[0]
        seeds_ax.plot(range(len(arms)), values, marker="o", color="tab:red" if worse else "tab:blue",
                      label=f"seed {seed}" + (" (DANN worse)" if worse else ""))
        source = [by[(a, seed)]["source_test_accuracy"] if (a, seed) in by else np.nan for a in arms]
        seeds_ax.plot(range(len(arms)), source, marker="s", linestyle=":", color="0.5",
                      label="source test" if seed == runs[0]["seed"] else None)
    seeds_ax.set_xticks(range(len(arms)), arms)
    seeds_ax.set_xlim(-0.3, len(arms) - 0.7)
    seeds_ax.set_ylabel("test accuracy")
    seeds_ax.set_title("target test accuracy per seed (dotted: source test)")
    colours = {arm: f"C{i}" for i, arm in enumerate(arms)}
    for name, rows in curves.items():  # name: "<arm> seed <s>"
        arm = name.split(" ")[0]
        epochs = [int(float(row["epoch"])) for row in rows]
        first = name == next(n for n in curves if n.split(" ")[0] == arm)
        curve_ax.plot(epochs, [_number(row.get("val_target_accuracy")) for row in rows], marker=".",
                      color=colours.get(arm), label=f"{arm}: target accuracy" if first else None)
        curve_ax.plot(epochs, [_number(row.get("val_domain_accuracy")) for row in rows], linestyle="--",
                      color=colours.get(arm), label=f"{arm}: domain classifier accuracy" if first else None)
    curve_ax.set_xlabel("epoch")
    curve_ax.set_title("val, every seed: target acc. (monitoring only), domain acc.")
    return _finish(figure, [seeds_ax, curve_ax], title, path)


def write_multitask(summary: list[dict], path: str, title: str | None = None) -> str:
    """Test accuracy per task (groups) and arm (bars, mean with the seeds' sd as error bars)."""
    if not summary:
        raise UsageError(f"write_multitask needs at least one summary row, got none (for {path})")
    figure = _figure((max(6.0, 2.2 * len({r['task'] for r in summary}) + 3), 4.4))
    ax = figure.subplots(1, 1)
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    arms = list(dict.fromkeys(r["arm"] for r in summary))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        rows = {r["task"]: r for r in summary if r["arm"] == arm}
        means = [rows[t]["test_accuracy_mean"] if t in rows else np.nan for t in tasks]
        sds = [(rows[t]["test_accuracy_sd"] or 0.0) if t in rows else 0.0 for t in tasks]
        x = np.arange(len(tasks)) + (i - (len(arms) - 1) / 2) * width
        ax.bar(x, means, width, yerr=sds, capsize=3, label=arm)
        for xi, m in zip(x, means):
            if np.isfinite(m):
                ax.annotate(f"{m:.3f}", (xi, m), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks)
    finite = [r["test_accuracy_mean"] for r in summary if r["test_accuracy_mean"] is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.1), min(1.0, max(finite) + 0.05))
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy per task and arm")
    return _finish(figure, [ax], title, path)


ADVISE_PANELS = (("logme", "LogME"), ("h_score", "H-score (shrunk)"), ("probe_accuracy", "linear probe accuracy"),
                 ("proxy_accuracy", "proxy fine-tune val accuracy (± se)"), ("bn_gap", "BN gap (KL to ImageNet stats)"))


def write_advise(result: dict, path: str) -> str:
    """A panel per score against the boundary (LogME, H-score, probe accuracy, the proxy's accuracy where it
    ran, with its standard error as error bars) and the BN gap; the recommendation marked."""
    rows = result["boundaries"]
    names = [row["boundary"] for row in rows]
    x = np.arange(len(names))
    panels = [(key, title) for key, title in ADVISE_PANELS if any(row.get(key) is not None for row in rows)]
    figure = _figure((3.75 * len(panels), 3.8))
    axes = figure.subplots(1, len(panels))
    chosen = result["recommendation"]["freeze_up_to"]
    for ax, (key, title) in zip(axes, panels):
        shown = [i for i, row in enumerate(rows) if row.get(key) is not None]  # the proxy: every other boundary
        # The proxy's accuracy is a mean over folds (or one val score): its standard error as error bars.
        errors = [rows[i].get("proxy_se") for i in shown] if key == "proxy_accuracy" else []
        if any(e is not None for e in errors):
            ax.errorbar(x[shown], [rows[i][key] for i in shown], yerr=[e or 0.0 for e in errors], marker="o",
                        markersize=4, capsize=3)
        else:
            ax.plot(x[shown], [rows[i][key] for i in shown], marker="o", markersize=4)
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_title(title)
        if chosen in names:
            ax.axvline(names.index(chosen), **STAGE_LINE)
    title = (f"{result['backbone']} on {result['dataset']} at {result['image_size']}px: --freeze-up-to "
             f"{chosen or 'none'} (dashed)")
    return _finish(figure, axes, title, path)


def write_fewshot(result: dict, path: str) -> str:
    """Mean query accuracy with its 95 % interval per K, one bar per method."""
    s = result["settings"]
    methods = list(dict.fromkeys(r["method"] for r in result["results"]))
    figure = _figure((6.4, 4.0))
    ax = figure.subplots()
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        rows = [r for r in result["results"] if r["method"] == method]
        xs = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r["mean"] for r in rows], width, yerr=[r["ci95"] for r in rows], capsize=4, label=method)
    ax.set_xticks(range(len(s["shots"])), [f"{k}-shot" for k in s["shots"]])
    ax.axhline(1.0 / s["ways"], color="0.5", linestyle=":", label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("query accuracy (mean ± 95 % CI)")
    return _finish(figure, [ax], f"{s['ways']}-way few-shot, {s['episodes']} episodes, {s['backbone']} "
                                 f"{s['image_size']}px ({s['split']})", path)


def write_self_training(result: dict, path: str) -> str:
    """Test accuracy per round (round 0 = labeled only, dashed) and, per round, how many unlabeled rows passed the
    threshold and how many of those were right."""
    records = result["rounds"]
    figure = _figure((10, 3.8))
    acc_ax, count_ax = figure.subplots(1, 2)
    rounds = [r["round"] for r in records]
    acc_ax.plot(rounds, [r["test_accuracy"] for r in records], marker="o", label="self-training")
    acc_ax.axhline(records[0]["test_accuracy"], color="0.5", linestyle="--", label="labeled only (round 0)")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("test accuracy")
    count_ax.bar(rounds, [r["selected"]["passed"] for r in records], color="tab:blue", alpha=0.5,
                 label="passed the threshold")
    right = [round(r["selected"]["accuracy"] * r["selected"]["checked"]) if r["selected"]["accuracy"] is not None
             else None for r in records]
    if any(v is not None for v in right):
        count_ax.bar(rounds, [v or 0 for v in right], color="tab:green", alpha=0.7, label="of them right")
    count_ax.set_xlabel("after round")
    count_ax.set_ylabel("unlabeled rows")
    for ax in (acc_ax, count_ax):
        ax.set_xticks(rounds)
    s = result["settings"]
    return _finish(figure, [acc_ax, count_ax], f"self-training, {s['backbone']} {s['image_size']}px, label "
                                               f"fraction {s['label_fraction']}, threshold {s['threshold']:g}", path)
