"""PNG figures of a run: training curves, a confusion matrix, a grid of misclassified images; and of a comparison.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot: no global figure registry to
leak, no display needed, and a notebook's own pyplot backend is left alone. matplotlib is imported only when
a figure is drawn. Every PNG is written atomically (temp file in the same folder, then rename).
"""

from __future__ import annotations

import csv
import io
import math
import os

import numpy as np

from tfl.durable import atomic_write
from tfl.errors import UsageError

STAGE_LINE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}
UNFREEZE_LINE = {"color": "tab:purple", "linestyle": ":", "linewidth": 1.4}
DPI = 100


def read_history_csv(path: str) -> list[dict]:
    """A run's history.csv as a list of rows (values are the csv's strings; write_curves converts them)."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such history file (a run writes history.csv after its first stage)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_curves(rows: list[dict], path: str, title: str | None = None) -> str:
    """Loss, accuracy and learning rate per group against the epoch, with stage changes and unfreezes marked."""
    from matplotlib.ticker import MaxNLocator

    if not rows:
        raise UsageError(f"write_curves needs at least one history row, got none (for {path})")
    epochs = np.array([_epoch(row) for row in rows])
    series = {key: np.array([_number(row.get(key)) for row in rows])
              for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")}
    lr_keys = list(dict.fromkeys(key for row in rows for key in row if key.startswith("lr_")))
    # Fixed margins instead of the constrained layout's solver: every run draws this figure, and the solver took a
    # third of its time (0.23 s against 0.155 s); the panels' labels are the same few and fit these margins.
    figure = _figure((15, 4.2), layout=None)
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3, gridspec_kw={
        "left": 0.05, "right": 0.99, "bottom": 0.12, "top": 0.86 if title else 0.92, "wspace": 0.2})
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for split in ("train", "val"):
            ax.plot(epochs, series[f"{split}_{metric}"], marker="o", markersize=4, label=split)
        ax.set_title(metric)
    lr_ax.set_title("learning rate")
    drawn = False
    for key in lr_keys:
        values = np.array([_number(row.get(key)) for row in rows])
        values[~(values > 0)] = np.nan  # a group that did not train that epoch leaves a gap, not a drop to 0
        if np.isfinite(values).any():
            lr_ax.plot(epochs, values, marker="o", markersize=4, label=key[len("lr_"):])
            drawn = True
    if drawn:
        lr_ax.set_yscale("log")
    else:
        lr_ax.text(0.5, 0.5, "no learning rate recorded", ha="center", va="center", transform=lr_ax.transAxes)
    events = _events(rows)
    for ax in (loss_ax, acc_ax, lr_ax):
        _mark_events(ax, events)
        ax.set_xlabel("epoch")
        ax.set_xlim(epochs.min() - 0.6, epochs.max() + 0.6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    return _finish(figure, (loss_ax, acc_ax, lr_ax), title, path)


def write_confusion_matrix(matrix, class_names, path: str, title: str | None = None) -> str:
    """Counts in each cell, coloured by the fraction of the true class (row) they hold; rows true, columns predicted."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.ndim != 2 or matrix.shape != (n, n):
        raise UsageError(f"confusion matrix must be [{n}, {n}] for {n} class names, got shape {matrix.shape}")
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = min(max(3.0 + 0.38 * n, 5.0), 22.0)
    figure = _figure((side + 1.5, side))
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    font = 10 if n <= 10 else 8 if n <= 20 else 6 if n <= 35 else 5
    for i in range(n):
        for j in range(n):
            if matrix[i, j] or n <= 15:  # zeros are noise in a large matrix
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.5 else "black")
    names = [_short(name, 18) for name in class_names]
    ax.set_xticks(range(n), names, rotation=90 if n > 8 else 45, ha="center" if n > 8 else "right", fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({int(matrix.sum())} examples)")
    return _save(figure, path)


def write_misclassified_grid(images, true_names, pred_names, probs, path: str, columns: int = 8) -> str:
    """uint8 images [N, H, W, 3] in a grid titled "true → predicted (p%)"; N=0 writes a figure that says so."""
    n = len(images)
    if not (len(true_names) == len(pred_names) == len(probs) == n):
        raise UsageError(f"write_misclassified_grid needs one true name, predicted name and probability per image; "
                         f"got {n} images, {len(true_names)} true, {len(pred_names)} predicted, {len(probs)} probs")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise UsageError(f"columns must be a positive integer, got {columns!r}")
    if n == 0:
        figure = _figure((4, 1.5))
        figure.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
        return _save(figure, path)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UsageError(f"images must be uint8 [N, H, W, 3], got shape {images.shape}")
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    figure = _figure((1.9 * cols, 2.1 * rows))
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, true, pred, p in zip(axes, images, true_names, pred_names, probs):
        ax.imshow(image.astype(np.uint8), interpolation="nearest")
        ax.set_title(f"{_short(true, 12)} → {_short(pred, 12)} ({100 * float(p):.0f}%)", fontsize=7, color="darkred")
    return _save(figure, path)


def write_compare(summary: list[dict], curves: dict[str, list[dict]], path: str, title: str | None = None) -> str:
    """`tfl compare`'s figure. Left: mean test accuracy against the label fraction, one line per arm, error bars
    one sd over seeds (log x when there are several fractions). Right: val accuracy per epoch, one line per arm.

    summary: rows with arm, label_fraction, test_accuracy_mean, test_accuracy_sd (None for one seed);
    curves: arm -> that arm's history rows (a run's history.csv)."""
    from matplotlib.ticker import MaxNLocator

    if not summary:
        raise UsageError(f"write_compare needs at least one summary row, got none (for {path})")
    figure = _figure((12, 4.4))
    acc_ax, curve_ax = figure.subplots(1, 2)
    fractions = sorted({row["label_fraction"] for row in summary})
    for arm in dict.fromkeys(row["arm"] for row in summary):
        rows = sorted((row for row in summary if row["arm"] == arm), key=lambda row: row["label_fraction"])
        sd = [row["test_accuracy_sd"] or 0.0 for row in rows]
        acc_ax.errorbar([row["label_fraction"] for row in rows], [row["test_accuracy_mean"] for row in rows],
                        yerr=sd, marker="o", markersize=4, capsize=3, label=arm)
    if len(fractions) > 1:
        acc_ax.set_xscale("log")
        acc_ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        acc_ax.minorticks_off()
    acc_ax.set_xlabel("label fraction")
    acc_ax.set_title("test accuracy (mean ± sd over seeds)")
    for arm, rows in curves.items():
        if rows:
            curve_ax.plot([_epoch(row) for row in rows], [_number(row.get("val_accuracy")) for row in rows],
                          marker="o", markersize=4, label=arm)
    curve_ax.set_xlabel("epoch")
    curve_ax.set_title(f"val accuracy (first seed, label fraction {max(fractions):g})")
    curve_ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    return _finish(figure, (acc_ax, curve_ax), title, path)


def write_reliability(before: list[dict], after: list[dict], temperature: float, path: str,
                      title: str | None = None) -> str:
    """A reliability diagram, before (T = 1) and after the run's temperature: per confidence bin (tfl.calibration.
    reliability's rows) the accuracy as a bar against the diagonal of perfect calibration, the gap shaded, the
    bin's share of examples below; ECE in each panel's title."""
    if not before or len(before) != len(after):
        raise UsageError(f"write_reliability needs the same non-empty bins before and after, got {len(before)} and "
                         f"{len(after)} (for {path})")
    figure = _figure((10, 5.2))
    axes = figure.subplots(2, 2, sharex=True, height_ratios=(3, 1))
    for column, (rows, label) in enumerate(((before, "before: T = 1"), (after, f"after: T = {temperature:.3f}"))):
        ax, share_ax = axes[0][column], axes[1][column]
        lows = np.array([row["low"] for row in rows])
        width = float(rows[0]["high"] - rows[0]["low"])
        counts = np.array([row["count"] for row in rows], dtype=np.float64)
        total = counts.sum()
        accuracy = np.array([row["accuracy"] if row["count"] else 0.0 for row in rows])
        confidence = np.array([row["confidence"] if row["count"] else 0.0 for row in rows])
        filled = counts > 0
        gap = float((counts[filled] / total * np.abs(accuracy[filled] - confidence[filled])).sum()) if total else 0.0
        ax.bar(lows[filled], accuracy[filled], width=width, align="edge", color="tab:blue", edgecolor="white",
               label="accuracy")
        ax.bar(lows[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width,
               align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1.0, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}   ECE {gap:.4f}")
        share_ax.bar(lows, counts / total if total else counts, width=width, align="edge", color="0.5",
                     edgecolor="white")
        share_ax.set_xlabel("confidence (top probability)")
        share_ax.set_ylabel("share")
    return _finish(figure, [ax for row in axes for ax in row], title, path)


def write_risk_coverage(rows: list[dict], chosen: dict, path: str, title: str | None = None) -> str:
    """Selective risk (error rate among the answered) against coverage, one point per threshold on the top
    probability (tfl.calibration.risk_coverage's rows, highest threshold first), the run's threshold marked."""
    if not rows:
        raise UsageError(f"write_risk_coverage needs at least one threshold (for {path})")
    figure = _figure((6.4, 4.8))
    ax = figure.subplots()
    coverage = [0.0] + [row["coverage"] for row in rows]
    risk = [rows[0]["risk"]] + [row["risk"] for row in rows]
    ax.step(coverage, risk, where="pre", color="tab:blue", label="selective risk")
    ax.axhline(rows[-1]["risk"], color="0.3", linestyle="--", linewidth=1.0, label="risk answering everything")
    if chosen.get("coverage"):
        ax.plot([chosen["coverage"]], [1 - chosen["selective_accuracy"]], "o", color="tab:red",
                label=f"threshold {chosen['threshold']:.3f} ({chosen['target']})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(1e-3, max(risk)) * 1.05)
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("selective risk (error rate among answered)")
    return _finish(figure, [ax], title, path)


def _finish(figure, axes, title: str | None, path: str) -> str:
    """Grid and legend on every panel, the title, then the atomic save."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _events(rows: list[dict]) -> dict[float, list[tuple[str, dict]]]:
    """x position between two epochs -> [(label, line style)] for each stage change and each unfreeze there."""
    events: dict[float, list[tuple[str, dict]]] = {}
    for before, row in zip(rows, rows[1:]):
        x = _epoch(row) - 0.5
        if row.get("stage") != before.get("stage"):
            events.setdefault(x, []).append((str(row.get("stage")), STAGE_LINE))
        had = set(_names(before.get("trainable")))
        grown = [name for name in _names(row.get("trainable")) if name not in had]
        if grown and had:  # everything trainable from an unknown start is not an unfreeze
            events.setdefault(x, []).append(("unfreeze " + ", ".join(grown), UNFREEZE_LINE))
    return events


def _mark_events(ax, events) -> None:
    for x, marks in events.items():
        for _, style in marks:
            ax.axvline(x, **style)
        # One label per position, so a stage change that also unfreezes does not print two texts on top of each other.
        ax.text(x, 0.98, "\n".join(label for label, _ in marks), rotation=90, ha="right", va="top", fontsize=7,
                transform=ax.get_xaxis_transform(), color=marks[0][1]["color"])


def _names(value) -> list[str]:
    if value is None:
        return []
    parts = value if isinstance(value, (list, tuple)) else str(value).split(";")
    return [p.strip() for p in parts if p and p.strip()]


def _epoch(row: dict) -> int:
    try:
        return int(float(row["epoch"]))
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"history row needs an integer 'epoch', got {row.get('epoch')!r} in {row}") from None


def _number(value) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"history value {value!r} is not a number") from None


def _short(name, limit: int) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _figure(size: tuple[float, float], layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return path


def write_distill(models: list[dict], path: str, title: str | None = None) -> str:
    """`tfl distill`'s figure: test accuracy against parameters (left) and against inference images/s at batch 64
    (right), one labelled point per model (teacher, students, generations, ensemble); log x on both."""
    from matplotlib.ticker import NullFormatter

    if not models:
        raise UsageError(f"write_distill needs at least one model row, got none (for {path})")
    figure = _figure((12, 4.4))
    size_ax, speed_ax = figure.subplots(1, 2)
    for ax, key, label in ((size_ax, "params", "parameters"),
                           (speed_ax, "images_per_second_batch64", "inference images/s at batch 64")):
        for row in models:
            x = row.get(key)
            if not x:
                continue
            ax.scatter([x], [row["test_accuracy"]], s=36,
                       label=f"{row['role']} ({row['model']}, {row['image_size']}px)")
            ax.annotate(_short(row["role"], 14), (x, row["test_accuracy"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
        ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow log range labels its minor ticks on top of each other
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
    size_ax.set_title("accuracy vs size")
    speed_ax.set_title("accuracy vs throughput (this machine)")
    speed_ax.legend(fontsize=7, loc="lower left")
    for ax in (size_ax, speed_ax):
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def write_forgetting_heatmaps(runs: list[dict], path: str, title: str | None = None) -> str:
    """`tfl forgetting`'s forgetting.png: one heatmap of R per strategy, R[i][j] = accuracy on task j (columns)
    after training task i (rows), 0..1, each cell labelled. runs: [{"strategy", "R"}] (joint: one row)."""
    if not runs:
        raise UsageError(f"write_forgetting_heatmaps needs at least one strategy, got none (for {path})")
    columns = min(len(runs), 3)
    rows = -(-len(runs) // columns)
    figure = _figure((4.2 * columns, 3.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    image = None
    for ax, run in zip(axes, runs):
        matrix = [[_number(v) for v in row] for row in run["R"]]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        tasks = len(matrix[0]) if matrix else 0
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
        ax.set_xticks(range(tasks), [str(j + 1) for j in range(tasks)])
        labels = ["all"] if run["strategy"] == "joint" else [str(i + 1) for i in range(len(matrix))]
        ax.set_yticks(range(len(matrix)), labels)
        ax.set_xlabel("test task")
        ax.set_ylabel("after training task")
        ax.set_title(run["strategy"])
    for ax in axes[len(runs):]:
        ax.set_axis_off()
    if image is not None:
        figure.colorbar(image, ax=list(axes[: len(runs)]), shrink=0.8, label="accuracy")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def write_accuracy_curves(runs: list[dict], path: str, title: str | None = None) -> str:
    """`tfl forgetting`'s accuracy_curves.png: per strategy, each task's test accuracy as tasks are added (from the
    task that trains it on) and, dashed, the mean over the tasks seen so far. Joint (trained once on every task) is
    drawn as points at the last task in every panel."""
    from matplotlib.ticker import MaxNLocator

    if not runs:
        raise UsageError(f"write_accuracy_curves needs at least one strategy, got none (for {path})")
    sequential = [run for run in runs if run["strategy"] != "joint"] or runs
    joint = next((run for run in runs if run["strategy"] == "joint"), None)
    columns = min(len(sequential), 3)
    rows = -(-len(sequential) // columns)
    figure = _figure((4.4 * columns, 3.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, run in zip(axes, sequential):
        matrix = [[_number(v) for v in row] for row in run["R"]]
        tasks = len(matrix[0]) if matrix else 0
        offset = tasks - len(matrix)  # joint alone: its one row is "after the last task"
        for j in range(tasks):
            points = [(i + 1 + offset, row[j]) for i, row in enumerate(matrix) if i + offset >= j]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=f"task {j + 1}")
        seen = [(i + 1 + offset, sum(row[: i + 1 + offset]) / (i + 1 + offset)) for i, row in enumerate(matrix)]
        ax.plot(*zip(*seen), color="black", linestyle="--", linewidth=1.2, label="mean of seen")
        if joint is not None and joint is not run:
            ax.scatter([tasks] * tasks, [_number(v) for v in joint["R"][0]], marker="x", color="0.4", s=18,
                       label="joint")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("test accuracy")
        ax.set_title(run["strategy"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for ax in axes[len(sequential):]:
        ax.set_axis_off()
    return _finish(figure, axes[: len(sequential)], title, path)


def write_wise_ft(rows: list[dict], chosen: float, path: str, title: str | None = None) -> str:
    """tfl wise-ft: val (and test) accuracy against alpha, the chosen alpha marked."""
    figure = _figure((6.4, 4.4))
    ax = figure.subplots()
    xs = [r["alpha"] for r in rows]
    ax.plot(xs, [r["val_accuracy"] for r in rows], "o-", label="val")
    if all(r["test_accuracy"] is not None for r in rows):
        ax.plot(xs, [r["test_accuracy"] for r in rows], "s-", label="test")
    ax.axvline(chosen, color="0.4", linestyle="--", linewidth=1.0, label=f"chosen alpha {chosen:g}")
    ax.set_xlabel("alpha (0: pretrained backbone, 1: fine-tuned)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def write_lr_find(curve: list[dict], suggestion_step: int, path: str, flag: str = "lr",
                  title: str | None = None) -> str:
    """A learning-rate range test: the loss of each step (faint) and its smoothed loss against the learning rate on
    a log axis, the suggested rate marked. curve: [{"step", "lr", "loss", "smoothed_loss"}] (tfl.recipes.lr_find)."""
    if not curve:
        raise UsageError(f"write_lr_find needs at least one step, got none (for {path})")
    lrs = np.array([row["lr"] for row in curve], float)
    figure = _figure((7, 4.5))
    ax = figure.subplots()
    ax.plot(lrs, [row["loss"] for row in curve], color="tab:blue", alpha=0.3, linewidth=1.0, label="loss")
    ax.plot(lrs, [row["smoothed_loss"] for row in curve], color="tab:blue", label="smoothed loss")
    chosen = curve[suggestion_step - 1]
    ax.axvline(chosen["lr"], color="tab:red", linestyle="--", linewidth=1.0)
    ax.plot([chosen["lr"]], [chosen["smoothed_loss"]], "o", color="tab:red",
            label=f"suggestion {flag} {chosen['lr']:.3g} (valley)")
    ax.set_xscale("log")
    # The last steps' exploding loss would flatten the rest: the axis ends at 1.5x the highest smoothed loss up to
    # its lowest point.
    smoothed = np.array([row["smoothed_loss"] for row in curve], float)
    lowest = int(np.argmin(smoothed))
    raw_low = min(row["loss"] for row in curve)
    top = 1.5 * float(smoothed[: lowest + 1].max())
    if np.isfinite(top) and top > raw_low:
        ax.set_ylim(min(raw_low, float(smoothed.min())) * 0.95, top)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    return _finish(figure, [ax], title, path)
