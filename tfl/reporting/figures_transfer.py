"""Figures of `tfl dann` and `tfl multitask` (Agg canvas, atomic writes, as tfl.reporting.figures)."""

from __future__ import annotations

import numpy as np

from tfl.errors import UsageError
from tfl.reporting.figures import _figure, _finish, _number


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
