"""The report of a run on one split: accuracy, confusion matrix, per-class scores, the most confident mistakes.

    report_run("runs/x")  ->  runs/x/report/{report.json, confusion_matrix.json, confusion_matrix.png,
                                            per_class.csv, misclassified.png}
                              + reliability.png when the run is calibrated (calibration.json)
                              + risk_coverage.png when it has an abstain threshold (tfl calibrate --abstain)

The metric functions are pure numpy on a confusion matrix, so they are tested on hand-made matrices.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from tfl import calibration, data
from tfl.durable import write_csv, write_json
from tfl.errors import UsageError
from tfl.inference import check_split, load_run, logits_of
from tfl.reporting import figures
from tfl.training import rundir

REPORT_DIR = "report"
FILES = {"report": "report.json", "confusion_matrix_json": "confusion_matrix.json",
         "confusion_matrix_png": "confusion_matrix.png", "per_class_csv": "per_class.csv",
         "misclassified_png": "misclassified.png"}
RELIABILITY_PNG = "reliability.png"  # a calibrated run's reliability diagram, before and after its temperature
RISK_COVERAGE_PNG = "risk_coverage.png"  # selective risk against coverage, the run's abstain threshold marked
TOP_CONFUSIONS = 10


def report_run(run_dir: str, dataset: str | None = None, data_dir: str | None = None, split: str | None = None,
               batch_size: int = 64, output_dir: str | None = None, max_images: int = 32, log=print) -> dict:
    """Predict every example of `split` (default: test, or val when there is none) with the run's model."""
    if split is not None:
        check_split(split)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0:
        raise UsageError(f"max_images must be a non-negative integer (0 draws no images), got {max_images!r}")
    loaded = load_run(run_dir, dataset, data_dir, log)
    split, source, _ = loaded.split(split)
    classes = loaded.classes
    log(f"predicting the {split} split of {loaded.dataset} with {run_dir} ...")
    pipeline = data.make_pipeline(source, loaded.image_size, batch_size, training=False, seed=0)
    t = loaded.temperature  # the run's probabilities are softmax(logits / t); 1 for an uncalibrated run
    labels, logits, mistakes = _predict(loaded.model, pipeline, max_images, t, loaded.tta)
    if not len(labels):
        raise UsageError(f"split {split!r} of {loaded.dataset} has no examples; choose another split")

    predicted = logits.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, len(classes))
    scores = class_scores(matrix)
    out = output_dir or os.path.join(run_dir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    paths = {key: os.path.join(out, name) for key, name in FILES.items()}
    calibrated = rundir.RunDir(run_dir, create=False).calibrated()
    if calibrated:
        paths["reliability_png"] = os.path.join(out, RELIABILITY_PNG)
    run = rundir.RunDir(run_dir, create=False)
    threshold = run.threshold()
    if threshold is not None:
        paths["risk_coverage_png"] = os.path.join(out, RISK_COVERAGE_PNG)

    result = {
        "run": run_dir, "dataset": loaded.dataset, "split": split, "examples": int(matrix.sum()),
        "accuracy": round(accuracy(matrix), 6), "loss": round(_mean_cross_entropy(logits / t, labels), 6),
        "class_names": list(classes),
        "per_class": [{"class": name, **{k: v[i] for k, v in scores["per_class"].items()}}
                      for i, name in enumerate(classes)],
        "macro_avg": scores["macro_avg"], "weighted_avg": scores["weighted_avg"],
        "top_confusions": top_confusions(matrix, classes),
        "confusion_matrix": matrix.tolist(),
        "misclassified": {"total": int((predicted != labels).sum()), "shown": [
            {"true": classes[m.true], "predicted": classes[m.predicted], "prob": round(m.prob, 6)} for m in mistakes]},
        "files": paths,
    }
    if loaded.tta:
        result["tta"] = loaded.tta  # the logits above are the mean over its views (tfl calibrate --tta)
    if calibrated:
        result["calibration"] = {"temperature": t, "bins": calibration.ECE_BINS,
                                 "before": calibration.scores(logits, labels, 1.0),
                                 "after": calibration.scores(logits, labels, t)}
    if threshold is not None:
        probs = calibration.softmax(logits, t)
        confidence, hit = probs.max(axis=1), probs.argmax(axis=1) == labels
        result["abstain"] = {"target": run.read_json(rundir.CALIBRATION)["abstain"].get("target"),
                             "threshold": threshold, **calibration.selective(confidence, hit, threshold)}
    write_json(paths["confusion_matrix_json"], {"class_names": list(classes), "rows": "true",
                                                 "columns": "predicted", "matrix": matrix.tolist()})
    _write_per_class_csv(paths["per_class_csv"], result["per_class"])
    title = f"{os.path.basename(os.path.normpath(run_dir))}: {split}, accuracy {result['accuracy']:.4f}"
    figures.write_confusion_matrix(matrix, classes, paths["confusion_matrix_png"], title=title)
    figures.write_misclassified_grid([m.image for m in mistakes], [classes[m.true] for m in mistakes],
                                     [classes[m.predicted] for m in mistakes], [m.prob for m in mistakes],
                                     paths["misclassified_png"])
    if calibrated:
        figures.write_reliability(calibration.reliability(calibration.softmax(logits), labels),
                                  calibration.reliability(calibration.softmax(logits, t), labels), t,
                                  paths["reliability_png"], title=f"{title.partition(':')[0]}: {split}")
    if threshold is not None:
        figures.write_risk_coverage(calibration.risk_coverage(confidence, hit), result["abstain"],
                                    paths["risk_coverage_png"], title=f"{title.partition(':')[0]}: {split}")
    write_json(paths["report"], result)  # last: its presence means the whole report was written
    log(f"{split} accuracy {result['accuracy']:.4f} on {result['examples']} examples; report in {out}")
    return result


def confusion_matrix(true, predicted, num_classes: int) -> np.ndarray:
    """int64 [C, C], rows the true class, columns the predicted one."""
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if true.shape != predicted.shape:
        raise UsageError(f"true and predicted labels differ in shape: {true.shape} vs {predicted.shape}")
    for name, labels in (("true", true), ("predicted", predicted)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UsageError(f"{name} labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return np.bincount(true * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def accuracy(matrix: np.ndarray) -> float:
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else 0.0


def class_scores(matrix: np.ndarray) -> dict:
    """Per-class precision, recall, F1 and support (0 where undefined, never NaN), plus macro and weighted means.

    The macro mean is over the classes that occur as a true or a predicted label, as scikit-learn's default
    does: a class absent from the split and never predicted says nothing about the model.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    hits = np.diag(matrix)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    per_class = {"precision": precision, "recall": recall, "f1": f1}
    present = (support + predicted) > 0
    macro = {k: float(v[present].mean()) if present.any() else 0.0 for k, v in per_class.items()}
    weighted = {k: float((v * support).sum() / support.sum()) if support.sum() else 0.0 for k, v in per_class.items()}
    rounded = {k: [round(float(x), 6) for x in v] for k, v in per_class.items()}
    return {"per_class": {**rounded, "support": [int(s) for s in support]},
            "macro_avg": {**{k: round(v, 6) for k, v in macro.items()}, "support": int(support.sum())},
            "weighted_avg": {**{k: round(v, 6) for k, v in weighted.items()}, "support": int(support.sum())}}


def top_confusions(matrix: np.ndarray, class_names, k: int = TOP_CONFUSIONS) -> list[dict]:
    """The k largest off-diagonal cells, largest first (ties in class order)."""
    off = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(off, 0)
    cells = sorted(((-int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))))[:k]
    return [{"true": class_names[i], "predicted": class_names[j], "count": -count} for count, i, j in cells]


def format_report(result: dict) -> str:
    """report_run's result as a table: one row per class, the averages, the top confusions."""
    width = max([len("weighted avg")] + [len(str(row["class"])) for row in result["per_class"]])
    header = f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}"

    def line(name, row):
        return (f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  {row['f1']:>9.4f}  "
                f"{row['support']:>7d}")

    lines = [f"{result['run']}: {result['split']} split of {result['dataset']}, {result['examples']} examples",
             f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}"
             + (f"  (TTA {result['tta']}: mean logits over its views)" if result.get("tta") else ""),
             "", header, "-" * len(header)]
    lines += [line(row["class"], row) for row in result["per_class"]]
    lines += ["-" * len(header), line("macro avg", result["macro_avg"]), line("weighted avg", result["weighted_avg"])]
    lines += ["", "most confused (true -> predicted):"]
    lines += [f"  {c['true']} -> {c['predicted']}: {c['count']}" for c in result["top_confusions"]] or ["  none"]
    if "calibration" in result:
        c = result["calibration"]
        lines += ["", f"calibrated: temperature {c['temperature']:.4f}; ECE {c['before']['ece']:.4f} -> "
                      f"{c['after']['ece']:.4f}, NLL {c['before']['nll']:.4f} -> {c['after']['nll']:.4f}, Brier "
                      f"{c['before']['brier']:.4f} -> {c['after']['brier']:.4f} (reliability diagram in "
                      f"{result['files']['reliability_png']})"]
    if "abstain" in result:
        a = result["abstain"]
        answered = "-" if a["selective_accuracy"] is None else f"{a['selective_accuracy']:.4f}"
        lines += ["", f"abstain ({a['target']}, confident when the top probability >= {a['threshold']:.4f}): "
                      f"coverage {a['coverage']:.4f}, selective accuracy {answered} (risk-coverage curve in "
                      f"{result['files']['risk_coverage_png']})"]
    shown = len(result["misclassified"]["shown"])
    lines += ["", f"misclassified: {result['misclassified']['total']} ({shown} shown in "
                  f"{result['files']['misclassified_png']})"]
    return "\n".join(lines)


class Mistake(NamedTuple):
    image: np.ndarray  # uint8 [S, S, 3], the model's input
    true: int
    predicted: int
    prob: float  # of the predicted class


def _predict(model, pipeline, max_images: int, temperature: float = 1.0,
             tta: str | None = None) -> tuple[np.ndarray, np.ndarray, list[Mistake]]:
    """(labels [N], logits [N, C] (with a kept `tta` mode the mean over its views), the max_images most confident
    mistakes, most confident first; their probability is the run's: softmax(logits / temperature))."""
    import tensorflow as tf

    mistakes: list[Mistake] = []

    def keep_mistakes(images, labels, logits):
        nonlocal mistakes
        predicted = logits.argmax(axis=1)
        wrong = np.nonzero(predicted != labels)[0]
        if max_images and len(wrong):
            probs = _softmax(logits[wrong] / temperature)
            shown = tf.saturate_cast(tf.round(tf.gather(images, wrong)), tf.uint8).numpy()  # what the model saw
            mistakes += [Mistake(shown[k], int(labels[i]), int(predicted[i]), float(probs[k, predicted[i]]))
                         for k, i in enumerate(wrong)]
            mistakes = sorted(mistakes, key=lambda m: -m.prob)[:max_images]  # stable: ties keep dataset order

    labels, logits = logits_of(model, pipeline, keep_mistakes, tta=tta)
    return labels, logits, mistakes


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)


def _write_per_class_csv(path: str, rows: list[dict]) -> None:
    write_csv(path, ["class", "precision", "recall", "f1", "support"], rows)
