"""Temperature scaling (Guo et al. 2017): one scalar T fitted on the val split, so that softmax(logits / T) says
how often the model is right. The run's model.keras keeps its logits; calibration.json beside it holds T, and
everything that reads the run (predict, evaluate, report, export) divides the logits by it.

    tfl.inference.calibrate_run("runs/x") -> runs/x/calibration.json: temperature, val NLL before/after, test
        ECE, NLL and Brier before/after, split sizes, and why T stayed 1 when it did (this module: the arithmetic)

The metrics and the fit are pure numpy functions of logits and labels, so they are tested on hand-made arrays:
  NLL    mean over examples of -log p(true class)
  Brier  mean over examples of sum over classes of (p_c - onehot_c)^2  (0 perfect, 2 worst)
  ECE    15 equal-width bins of the top probability (bin m holds confidences in ((m-1)/15, m/15]):
         sum over bins of |bin| / n x |accuracy(bin) - mean confidence(bin)|
"""

from __future__ import annotations

import math
import os

import numpy as np

from tfl.errors import UsageError
from tfl.training.rundir import CALIBRATION

ECE_BINS = 15
# The search range of T. A fit at either end means the val split cannot place T. At the lower end every val example
# is right and the NLL keeps falling as T -> 0: that T is an artefact of the range, and sharpening by it would make
# every mistake on new data a confident one, so T stays 1. At the upper end the model ranks the classes no better
# than chance on val and T flattens its probabilities towards uniform, which is what such a model should say: it
# is used, with a warning.
T_RANGE = (0.01, 100.0)
MIN_GAIN = 1e-6  # nats of val NLL: a smaller gain keeps T = 1 (the fitted T is then 1 within the search tolerance)
_TOLERANCE = 1e-10  # of the golden-section search, in log T


# -- metrics --------------------------------------------------------------------------------------------------------
def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    labels = np.asarray(labels, dtype=np.int64)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def brier(probs, labels) -> float:
    """Mean over examples of sum over classes of (p_c - onehot_c)^2."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels, dtype=np.int64)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(probs, labels, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin of the top probability ((m-1)/bins, m/bins]: its edges, how many examples fall in it,
    their mean confidence and their accuracy (None for an empty bin)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probs.max(axis=1)
    hit = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    rows = []
    for m in range(bins):
        inside = which == m
        count = int(inside.sum())
        rows.append({"low": m / bins, "high": (m + 1) / bins, "count": count,
                     "confidence": float(confidence[inside].mean()) if count else None,
                     "accuracy": float(hit[inside].mean()) if count else None})
    return rows


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of |bin| / n x |accuracy(bin) - confidence(bin)|."""
    rows = reliability(probs, labels, bins)
    n = sum(row["count"] for row in rows)
    return float(sum(row["count"] / n * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]))


def scores(logits, labels, temperature: float = 1.0, bins: int = ECE_BINS) -> dict:
    """{"accuracy", "nll", "ece", "brier"} of softmax(logits / T) against the labels."""
    probs = softmax(logits, temperature)
    labels = np.asarray(labels, dtype=np.int64)
    return {"accuracy": round(float((probs.argmax(axis=1) == labels).mean()), 6),
            "nll": round(nll(logits, labels, temperature), 6), "ece": round(ece(probs, labels, bins), 6),
            "brier": round(brier(probs, labels), 6)}


# -- the fit --------------------------------------------------------------------------------------------------------
def fit_temperature(logits, labels, t_range: tuple[float, float] = T_RANGE) -> float:
    """The T in t_range minimising the mean NLL of softmax(logits / T): a golden-section search over log T.

    The NLL is convex in 1 / T (a log-sum-exp minus a linear term), so it has one minimum along log T and the
    search finds it (or the end of the range it lies beyond)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    low, high = math.log(t_range[0]), math.log(t_range[1])
    ratio = (math.sqrt(5) - 1) / 2

    def loss(u):
        return nll(logits, labels, math.exp(u))

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > _TOLERANCE:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return math.exp((low + high) / 2)


def calibrate_logits(val_logits, val_labels, test_logits=None, test_labels=None, bins: int = ECE_BINS) -> dict:
    """Fit T on the val logits; score val and (given) test before (T = 1) and after. T stays 1 when the fit does
    not lower the val NLL by MIN_GAIN; "kept" and "reason" say so. The record calibration.json holds."""
    val_logits = np.asarray(val_logits, dtype=np.float64)
    if not len(val_logits):
        raise UsageError("the val split has no examples, so there is nothing to fit a temperature on; give the run "
                         "a val split (an image folder's val/, or train a run with a larger --val-split)")
    if not np.isfinite(val_logits).all():
        raise UsageError("the model's logits on the val split are not all finite (NaN or infinity): no temperature "
                         "can fix that; train the run again (a lower --lr)")
    fitted = fit_temperature(val_logits, val_labels)
    before, after = nll(val_logits, val_labels), nll(val_logits, val_labels, fitted)
    at_bound = not T_RANGE[0] * 1.001 < fitted < T_RANGE[1] / 1.001
    if not after < before - MIN_GAIN:
        reason = (f"the fitted T = {fitted:.4f} lowers the val NLL by {before - after:.2g} nats, less than "
                  f"{MIN_GAIN:g}: the model is already calibrated on val, so T stays 1")
    elif at_bound and fitted < 1:
        reason = (f"every val example is right and the val NLL keeps falling as T goes to 0 (the fit stopped at the "
                  f"end of its range, T = {T_RANGE[0]:g}): the val split cannot place T, so T stays 1; a larger val "
                  "split, with some mistakes in it, gives a temperature to trust")
    else:
        reason = None
    kept = reason is not None
    temperature = 1.0 if kept else fitted
    record = {
        "temperature": round(temperature, 8),
        "fitted_temperature": round(fitted, 8),
        "kept": kept,
        "reason": reason,
        "at_range_bound": at_bound,
        "range": list(T_RANGE),
        "bins": bins,
        "method": "temperature scaling: T minimising the mean NLL of softmax(logits / T) on the val split",
    }
    for split, logits, labels in (("val", val_logits, val_labels), ("test", test_logits, test_labels)):
        if logits is None or not len(logits):
            record[split] = None
            continue
        record[split] = {"examples": int(len(labels)), "before": scores(logits, labels, 1.0, bins),
                         "after": scores(logits, labels, temperature, bins)}
    return record


# -- test-time augmentation: kept only if val says so (tfl.tta has the views) --------------------------------------
def tta_decision(mode: str, val_plain, val_tta, val_labels, test_plain=None, test_tta=None, test_labels=None) -> dict:
    """Whether TTA's logits (the mean over the views') replace the plain ones, decided on val alone: kept when the
    TTA logits get more val images right, or as many and a val NLL lower by more than MIN_GAIN nats (both at T = 1);
    anything else, a tie included, keeps the plain logits. calibration.json's "tta" record: {"mode", "kept",
    "reason", "val": {"plain": {"accuracy", "nll"}, "tta": {...}}, "test": the same or None}."""
    labels = np.asarray(val_labels, dtype=np.int64)
    hits = {name: int((np.asarray(logits).argmax(axis=1) == labels).sum())
            for name, logits in (("plain", val_plain), ("tta", val_tta))}
    losses = {"plain": nll(val_plain, labels), "tta": nll(val_tta, labels)}
    n = len(labels)
    if hits["tta"] != hits["plain"]:
        kept = hits["tta"] > hits["plain"]
        reason = (f"val accuracy {hits['plain'] / n:.4f} -> {hits['tta'] / n:.4f} with {mode} "
                  f"({hits['tta'] - hits['plain']:+d} of {n} images): " + ("kept" if kept else "not kept"))
    else:
        kept = losses["tta"] < losses["plain"] - MIN_GAIN
        reason = (f"val accuracy equal ({hits['plain'] / n:.4f}); val NLL {losses['plain']:.4f} -> "
                  f"{losses['tta']:.4f} with {mode}: " + ("kept" if kept else "not kept (at equal "
                                                                                 "accuracy only a lower NLL keeps it)"))

    def both(plain, tta, split_labels):
        return {"examples": int(len(split_labels)), "plain": accuracy_nll(plain, split_labels),
                "tta": accuracy_nll(tta, split_labels)}

    return {"mode": mode, "kept": bool(kept), "reason": reason, "val": both(val_plain, val_tta, labels),
            "test": (None if test_plain is None or not len(test_plain)
                     else both(test_plain, test_tta, test_labels)),
            "rule": "kept if the val accuracy with TTA is higher, or equal with a val NLL lower by more than "
                    f"{MIN_GAIN:g} (T = 1)"}


def accuracy_nll(logits, labels) -> dict:
    """{"accuracy", "nll"} of logits against labels (T = 1), rounded to 6 digits as every record writes them."""
    labels = np.asarray(labels, dtype=np.int64)
    return {"accuracy": round(float((np.asarray(logits).argmax(axis=1) == labels).mean()), 6),
            "nll": round(nll(logits, labels), 6)}


# -- abstaining: a threshold on the calibrated top probability ------------------------------------------------------
ABSTAIN_KINDS = ("coverage", "precision")


def parse_abstain(spec: str | None) -> tuple[str, float] | None:
    """"coverage:0.95" -> ("coverage", 0.95); None -> None. The one place an --abstain value is checked."""
    if spec is None:
        return None
    kind, _, value = str(spec).partition(":")
    try:
        target = float(value)
    except ValueError:
        target = None
    if kind not in ABSTAIN_KINDS or target is None or not 0 < target <= 1:
        raise UsageError(f"--abstain {spec!r}: give coverage:C (answer on at least a share C of the val images) or "
                         "precision:P (be right on at least a share P of those answered), with 0 < C, P <= 1, e.g. "
                         "--abstain coverage:0.95")
    return kind, target


def selective(confidence, hit, threshold: float) -> dict:
    """Answering only where the top probability >= threshold: {"coverage": share answered, "selective_accuracy":
    accuracy on those (None when none is answered), "examples"}."""
    confidence, hit = np.asarray(confidence, dtype=np.float64), np.asarray(hit, dtype=bool)
    answered = confidence >= threshold
    count = int(answered.sum())
    return {"examples": int(len(confidence)), "coverage": round(count / len(confidence), 6) if len(confidence) else 0.0,
            "selective_accuracy": round(float(hit[answered].mean()), 6) if count else None}


def risk_coverage(confidence, hit) -> list[dict]:
    """One row per distinct top probability t, highest first: {"threshold": t, "coverage", "risk"}, where coverage is
    the share with confidence >= t and risk the error rate among them (1 - selective accuracy)."""
    confidence, hit = np.asarray(confidence, dtype=np.float64), np.asarray(hit, dtype=bool)
    order = np.argsort(-confidence, kind="stable")
    confidence, hit = confidence[order], hit[order]
    answered = np.arange(1, len(confidence) + 1)
    errors = np.cumsum(~hit)
    last = np.r_[confidence[1:] != confidence[:-1], True]  # the last of each run of equal confidences
    return [{"threshold": float(confidence[i]), "coverage": float(answered[i] / len(confidence)),
             "risk": float(errors[i] / answered[i])} for i in np.flatnonzero(last)]


def choose_threshold(confidence, hit, kind: str, target: float) -> float:
    """The threshold on val, meeting its target there by construction. coverage:c -> the largest threshold whose
    coverage is >= c (the ceil(c n)-th highest confidence); precision:p -> the smallest threshold whose selective
    accuracy is >= p. A precision no threshold reaches is refused, naming the best one."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if not len(confidence):
        raise UsageError("--abstain: the val split has no examples to choose a threshold on")
    if kind == "coverage":
        k = max(1, math.ceil(target * len(confidence) - 1e-9))
        return float(np.sort(confidence)[::-1][k - 1])
    rows = risk_coverage(confidence, hit)
    meeting = [row for row in rows if 1 - row["risk"] >= target - 1e-12]
    if not meeting:
        best = min(rows, key=lambda row: (row["risk"], -row["coverage"]))
        raise UsageError(f"--abstain precision:{target:g}: no threshold reaches that selective accuracy on the val "
                         f"split (the best is {1 - best['risk']:.4f}, answering {best['coverage']:.2%} of it); "
                         "lower the target, or use coverage:C")
    return min(row["threshold"] for row in meeting)


def abstain_record(spec: str, val_logits, val_labels, test_logits, test_labels, temperature: float) -> dict:
    """calibration.json's "abstain": the threshold chosen on val for the target, its coverage and selective
    accuracy on val and test (top probability of softmax(logits / T))."""
    kind, target = parse_abstain(spec)

    def confident_hits(logits, labels):
        probs = softmax(logits, temperature)
        return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels, dtype=np.int64)

    threshold = choose_threshold(*confident_hits(val_logits, val_labels), kind, target)
    record = {"target": f"{kind}:{target:g}", "kind": kind, "value": target, "threshold": threshold}
    for split, logits, labels in (("val", val_logits, val_labels), ("test", test_logits, test_labels)):
        record[split] = (None if logits is None or not len(logits)
                         else selective(*confident_hits(logits, labels), threshold))
    return record


def describe(record: dict, run_path: str | None = None) -> str:
    """The record as a few lines: the TTA decision (with --tta), T and why, then ECE / NLL / Brier before and after
    on each split."""
    t = record["temperature"]
    val = record["val"]
    if record["kept"]:
        head = f"temperature 1 (kept): {record['reason']}"
    else:
        head = (f"temperature {t:.4f}: val NLL {val['before']['nll']:.4f} -> {val['after']['nll']:.4f} on "
                f"{val['examples']} examples")
    lines = [head]
    if record.get("tta"):
        tta = record["tta"]
        lines.insert(0, f"TTA {tta['mode']} {'kept' if tta['kept'] else 'not kept'}: {tta['reason']}")
        if tta["test"] is not None:
            plain, averaged = tta["test"]["plain"], tta["test"]["tta"]
            lines.insert(1, f"test   plain accuracy {plain['accuracy']:.4f} NLL {plain['nll']:.4f}, {tta['mode']} "
                            f"accuracy {averaged['accuracy']:.4f} NLL {averaged['nll']:.4f}")
    if record["at_range_bound"] and not record["kept"]:
        lines.append(f"warning: T reached the upper end of its search range ({record['range'][1]:g}): on val the "
                     "model ranks the classes no better than chance, so its probabilities are now close to "
                     "uniform; a better model (or a larger val split) gives a temperature to trust")
    lines.append(f"{'split':<6} {'':<7} {'ECE':>7} {'NLL':>8} {'Brier':>7} {'accuracy':>9}")
    for split in ("val", "test"):
        if record[split] is None:
            lines.append(f"{split:<6} (no {split} split)")
            continue
        for when in ("before", "after"):
            s = record[split][when]
            lines.append(f"{split:<6} {when:<7} {s['ece']:>7.4f} {s['nll']:>8.4f} {s['brier']:>7.4f} "
                         f"{s['accuracy']:>9.4f}")
    if record.get("abstain"):
        a = record["abstain"]
        lines.append(f"abstain ({a['target']}): confident when the top probability >= {a['threshold']:.4f}")
        for split in ("val", "test"):
            if a[split] is not None:
                accuracy = a[split]["selective_accuracy"]
                lines.append(f"{split:<6} coverage {a[split]['coverage']:.4f}, selective accuracy "
                             + ("- (nothing answered)" if accuracy is None else f"{accuracy:.4f}"))
    if run_path:
        lines.append(f"ECE over {record['bins']} bins; wrote {os.path.join(run_path, CALIBRATION)}")
    return "\n".join(lines)
