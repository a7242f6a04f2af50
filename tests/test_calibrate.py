"""Temperature scaling: the fit against a numpy reference minimiser, the metrics against hand computations, and one
tiny calibrated run whose temperature every reader uses (predict, evaluate, report, the SavedModel and TFLite
exports), driven from the command line as a user would."""

import json
import math
import os
import pathlib

import numpy as np
import pytest
from click.testing import CliRunner

from tfl import calibration
from tfl.cli import cli
from tfl.errors import UsageError
from tfl.training import rundir
from tfl.training.rundir import CALIBRATION, RunDir
from test_export import evaluation_pixels, tflite_outputs


# -- the fit and the metrics, on hand-made arrays ------------------------------------------------------------------
def reference_temperature(logits, labels):
    """A grid over log T in 0.01..100, then a finer grid around its best point: no search shared with tfl's."""
    def best_on(grid):
        z = logits[None] / np.exp(grid)[:, None, None]
        z = z - z.max(axis=2, keepdims=True)
        nll = -(z[:, np.arange(len(labels)), labels] - np.log(np.exp(z).sum(axis=2))).mean(axis=1)
        return grid[np.argmin(nll)]

    coarse = best_on(np.linspace(math.log(0.01), math.log(100), 2001))  # steps of 0.0046 in log T
    return math.exp(best_on(np.linspace(coarse - 0.005, coarse + 0.005, 2001)))  # steps of 5e-6


@pytest.mark.parametrize("true_t", [0.4, 2.5])
def test_fitted_temperature_equals_a_numpy_reference_minimiser(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (300, 5))
    z = np.exp(logits / true_t - (logits / true_t).max(axis=1, keepdims=True))
    labels = np.array([rng.choice(5, p=p / p.sum()) for p in z])  # drawn as a model with temperature true_t says
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(reference_temperature(logits, labels), abs=1e-4)
    record = calibration.calibrate_logits(logits, labels)
    assert not record["kept"] and record["temperature"] == pytest.approx(fitted, abs=1e-7)
    assert record["val"]["after"]["nll"] < record["val"]["before"]["nll"]
    assert abs(fitted - true_t) / true_t < 0.3  # and near the temperature the labels were drawn with


@pytest.mark.parametrize("logits,labels", [
    # p(first class) = 3/4 and three of four labels are the first class: T = 1 is the exact minimiser
    (np.array([[math.log(3.0), 0.0]] * 4), np.array([0, 0, 0, 1])),
    # uniform predictions: no T changes the NLL
    (np.zeros((6, 3)), np.array([0, 1, 2, 0, 1, 2])),
])
def test_temperature_stays_1_and_says_why_when_val_nll_does_not_improve(logits, labels):
    record = calibration.calibrate_logits(logits, labels, logits, labels)
    assert record["kept"] is True and record["temperature"] == 1.0
    assert "T stays 1" in record["reason"] and "val NLL" in record["reason"]
    assert record["test"]["after"] == record["test"]["before"]
    assert calibration.describe(record).startswith("temperature 1 (kept): ")


def test_a_fit_at_the_end_of_the_range_is_kept_at_1_when_it_sharpens_and_used_when_it_flattens():
    separated = calibration.calibrate_logits(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([0, 1]))
    assert separated["kept"] and separated["temperature"] == 1.0 and separated["at_range_bound"]
    assert separated["fitted_temperature"] == pytest.approx(calibration.T_RANGE[0], rel=1e-3)
    assert "every val example is right" in separated["reason"] and "T stays 1" in separated["reason"]
    wrong = calibration.calibrate_logits(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([1, 0]))
    assert not wrong["kept"] and wrong["at_range_bound"]
    assert wrong["temperature"] == pytest.approx(calibration.T_RANGE[1], rel=1e-3)
    assert "warning: T reached the upper end" in calibration.describe(wrong)


def test_ece_brier_and_nll_against_hand_computations():
    probs = np.array([[0.9, 0.1], [0.08, 0.92], [0.3, 0.7], [0.55, 0.45], [0.62, 0.38]])
    labels = np.array([0, 0, 1, 1, 0])
    # Confidences .9 (right) and .92 (wrong) share the bin (13/15, 14/15]; .7 (right), .55 (wrong), .62 (right)
    # are alone in theirs.
    hand_ece = 2 / 5 * abs(0.5 - 0.91) + 1 / 5 * abs(1 - 0.7) + 1 / 5 * abs(0 - 0.55) + 1 / 5 * abs(1 - 0.62)
    assert hand_ece == pytest.approx(0.41)
    assert calibration.ece(probs, labels) == pytest.approx(hand_ece, abs=1e-12)
    rows = calibration.reliability(probs, labels)
    assert len(rows) == 15 and [r["count"] for r in rows if r["count"]] == [1, 1, 1, 2]
    assert rows[13]["confidence"] == pytest.approx(0.91) and rows[13]["accuracy"] == 0.5
    hand_brier = ((0.1 ** 2 + 0.1 ** 2) + (0.92 ** 2 + 0.92 ** 2) + (0.3 ** 2 + 0.3 ** 2) + (0.55 ** 2 + 0.55 ** 2)
                  + (0.38 ** 2 + 0.38 ** 2)) / 5
    assert calibration.brier(probs, labels) == pytest.approx(hand_brier, abs=1e-12) == pytest.approx(0.55732)

    rng = np.random.default_rng(1)
    logits, labels = rng.normal(0, 4, (50, 7)), rng.integers(0, 7, 50)
    for t in (0.5, 1.0, 3.0):
        direct = np.exp(logits / t) / np.exp(logits / t).sum(axis=1, keepdims=True)
        assert calibration.nll(logits, labels, t) == pytest.approx(-np.log(direct[np.arange(50), labels]).mean(),
                                                                  abs=1e-10)
        onehot = np.eye(7)[labels]
        assert calibration.brier(calibration.softmax(logits, t), labels) == pytest.approx(
            np.mean([np.sum((p - o) ** 2) for p, o in zip(direct, onehot)]), abs=1e-10)


def test_an_empty_val_split_and_a_bad_temperature_file_are_refused(tmp_path):
    with pytest.raises(UsageError, match="the val split has no examples"):
        calibration.calibrate_logits(np.zeros((0, 3)), np.zeros(0, np.int64))
    run = RunDir(str(tmp_path))
    assert run.temperature() == 1.0  # no calibration.json: the run is used as it is
    run.write_json(CALIBRATION, {"temperature": -2})
    with pytest.raises(UsageError, match=r"'temperature' is -2, not a positive number; run `tfl calibrate --run"):
        run.temperature()
    with pytest.raises(UsageError, match="logits on the val split are not all finite"):
        calibration.calibrate_logits(np.array([[np.nan, 0.0]]), np.array([0]))


def test_a_new_model_in_the_run_directory_drops_the_old_temperature(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_json(CALIBRATION, {"temperature": 2.0})
    assert run.temperature() == 2.0 and run.forget_calibration() and run.temperature() == 1.0  # Job.finish's step
    assert not run.forget_calibration()
    run.write_json("config.json", {})
    run.write_json(CALIBRATION, {"temperature": 2.0})
    removed = rundir.check_reusable(str(tmp_path), overwrite=True, has_checkpoint=False)  # --overwrite
    assert sorted(os.path.basename(p) for p in removed) == [CALIBRATION, "config.json"]


# -- abstaining: the threshold and the risk-coverage curve, on hand-made arrays ----------------------------------------
def test_risk_coverage_and_selective_scores_against_a_hand_computation():
    confidence = np.array([0.9, 0.6, 0.8, 0.6, 0.95, 0.5])
    hit = np.array([True, False, True, True, False, True])
    # By confidence: .95 wrong, .9 right, .8 right, .6 wrong + .6 right (a tie: one threshold), .5 right.
    assert calibration.risk_coverage(confidence, hit) == [
        {"threshold": 0.95, "coverage": 1 / 6, "risk": 1.0},
        {"threshold": 0.9, "coverage": 2 / 6, "risk": 1 / 2},
        {"threshold": 0.8, "coverage": 3 / 6, "risk": 1 / 3},
        {"threshold": 0.6, "coverage": 5 / 6, "risk": 2 / 5},
        {"threshold": 0.5, "coverage": 1.0, "risk": 2 / 6}]
    assert calibration.selective(confidence, hit, 0.8) == {"examples": 6, "coverage": 0.5,
                                                            "selective_accuracy": pytest.approx(2 / 3, abs=1e-6)}
    assert calibration.selective(confidence, hit, 0.99)["selective_accuracy"] is None  # nothing answered
    # coverage:0.5 -> the 3rd highest confidence; coverage:0.8 -> ceil(4.8) = 5th, a tie at .6 (coverage 5/6)
    assert calibration.choose_threshold(confidence, hit, "coverage", 0.5) == 0.8
    assert calibration.choose_threshold(confidence, hit, "coverage", 0.8) == 0.6
    assert calibration.choose_threshold(confidence, hit, "coverage", 1.0) == 0.5
    # selective accuracies by threshold: 0, .5, .667, .6, .667; the smallest meeting precision:0.66 is .5
    assert calibration.choose_threshold(confidence, hit, "precision", 0.66) == 0.5  # 4/6 = .667 at .5 as well
    wrong_last = hit.copy()
    wrong_last[5] = False  # selective accuracies now 0, .5, .667, .6, .5
    assert calibration.choose_threshold(confidence, wrong_last, "precision", 0.5) == 0.5
    assert calibration.choose_threshold(confidence, wrong_last, "precision", 0.6) == 0.6
    assert calibration.choose_threshold(confidence, wrong_last, "precision", 0.65) == 0.8
    with pytest.raises(UsageError, match=r"--abstain precision:0.9: no threshold reaches .*the best is 0.6667"):
        calibration.choose_threshold(confidence, hit, "precision", 0.9)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind,target", [("coverage", 0.95), ("coverage", 0.5), ("coverage", 0.83),
                                         ("precision", 0.9), ("precision", 0.99)])
def test_the_threshold_meets_its_target_on_val_by_construction(seed, kind, target):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    logits = rng.normal(0, 3, (n, 4))
    labels = np.where(rng.random(n) < 0.8, logits.argmax(axis=1), rng.integers(0, 4, n))
    if seed == 5:  # ties: confidences on a coarse grid
        logits = np.round(logits)
    probs = calibration.softmax(logits)
    confidence, hit = probs.max(axis=1), probs.argmax(axis=1) == labels
    try:
        threshold = calibration.choose_threshold(confidence, hit, kind, target)
    except UsageError:  # only a precision no threshold reaches, checked against every threshold
        assert kind == "precision"
        assert all(1 - row["risk"] < target for row in calibration.risk_coverage(confidence, hit))
        return
    at = calibration.selective(confidence, hit, threshold)
    raw_coverage, raw_accuracy = (confidence >= threshold).mean(), hit[confidence >= threshold].mean()
    rows = calibration.risk_coverage(confidence, hit)
    if kind == "coverage":
        assert raw_coverage >= target
        assert all(row["coverage"] < target for row in rows if row["threshold"] > threshold)  # the largest
    else:
        assert raw_accuracy >= target
        assert all(1 - row["risk"] < target for row in rows if row["threshold"] < threshold)  # the smallest
    assert at["coverage"] == pytest.approx(raw_coverage, abs=1e-6)
    record = calibration.abstain_record(f"{kind}:{target}", logits, labels, logits, labels, 1.0)
    assert record["threshold"] == threshold and record["val"] == record["test"] == at


@pytest.mark.parametrize("spec", ["coverage:1.5", "coverage", "precision:0", "recall:0.9", "coverage:x", ""])
def test_a_bad_abstain_value_is_named_with_the_fix(spec):
    with pytest.raises(UsageError, match=rf"^--abstain {spec!r}: give coverage:C .* e\.g\. --abstain coverage:0\.95$"):
        calibration.parse_abstain(spec)
    assert calibration.parse_abstain("precision:0.99") == ("precision", 0.99)


# -- one tiny calibrated run, every reader of it --------------------------------------------------------------------
ABSTAIN = "coverage:0.75"  # of 8 val images: the 6th highest top probability


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def calibrated(data_a_to_d, tmp_path_factory):
    """`finetune --calibrate --export` (the export made after the fit), then `tfl calibrate` again on the run."""
    root = tmp_path_factory.mktemp("calibrate")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        trained = invoke("finetune", "--dataset", data_a_to_d, "--backbone", "compact_cnn", "--weights", "none",
                         "--image-size", 32, "--head-epochs", 1, "--epochs", 1, "--batch-size", 8, "--val-split",
                         0.25, "--lr", 0.01, "--no-tensorboard", "--output-dir", root / "run", "--calibrate",
                         "--abstain", ABSTAIN, "--export", "--json")
        assert trained.exit_code == 0, trained.output
        record = json.loads((root / "run" / CALIBRATION).read_text())
        again = invoke("calibrate", "--run", root / "run", "--abstain", ABSTAIN, "--json")
        assert again.exit_code == 0, again.output
    files = sorted(str(p) for p in pathlib.Path(data_a_to_d).glob("test/*/*.png"))
    model = RunDir(str(root / "run"), create=False).load_model()
    logits = np.asarray(model(evaluation_pixels(files), training=False), dtype=np.float64)
    return {"root": root, "run": root / "run", "metrics": json.loads(trained.stdout), "record": record,
            "again": json.loads(again.stdout), "files": files, "logits": logits}


def expected_probabilities(calibrated):
    return calibration.softmax(calibrated["logits"], calibrated["record"]["temperature"])


def expected_confident(calibrated):
    top = expected_probabilities(calibrated).max(axis=1).astype(np.float32)
    return top >= np.float32(calibrated["record"]["abstain"]["threshold"])


def test_finetune_calibrate_writes_calibration_json_and_calibrate_refits_the_same(calibrated):
    record, t = calibrated["record"], calibrated["record"]["temperature"]
    assert record["val"]["examples"] == 8 and record["test"]["examples"] == 8 and record["bins"] == 15
    assert not record["kept"] and not record["at_range_bound"] and t != 1.0  # this run's fit is a real one
    assert calibrated["metrics"]["temperature"] == t
    # From model.keras's own logits again: the earlier temperature is not applied twice.
    assert calibrated["again"]["temperature"] == pytest.approx(t, rel=1e-6)
    assert calibrated["again"]["test"] == record["test"]
    abstain = record["abstain"]
    assert abstain["target"] == ABSTAIN and calibrated["metrics"]["abstain_threshold"] == abstain["threshold"]
    assert abstain["val"]["coverage"] >= 0.75 and abstain["val"]["examples"] == 8  # its target, on val
    assert abstain["test"]["examples"] == 8 and 0 <= abstain["test"]["coverage"] <= 1
    assert calibrated["again"]["abstain"]["threshold"] == pytest.approx(abstain["threshold"], abs=1e-6)
    without = calibration.describe(record)
    assert f"abstain ({ABSTAIN}): confident when the top probability >= " in without


def test_predict_returns_softmax_of_logits_over_t(calibrated):
    result = invoke("predict", "--run", calibrated["run"], "--top-k", 4, "--json", *calibrated["files"])
    assert result.exit_code == 0, result.output
    expected = expected_probabilities(calibrated)
    rows = json.loads(result.stdout)
    for row, p in zip(rows, expected):
        for top in row["top"]:
            assert top["prob"] == pytest.approx(p[top["index"]], abs=2e-6)
    confident = [row["confident"] for row in rows]
    assert confident == list(expected_confident(calibrated))
    assert 0 < sum(confident) < len(confident)  # this run has both verdicts on test
    assert sum(confident) / len(confident) == calibrated["record"]["abstain"]["test"]["coverage"]
    text = invoke("predict", "--run", calibrated["run"], *calibrated["files"]).stdout
    assert [line.endswith("  unsure") for line in text.splitlines() if not line.startswith(" ")] == [
        not c for c in confident]
    assert not np.allclose(expected, calibration.softmax(calibrated["logits"]), atol=1e-3)  # T changed them


def test_evaluate_reports_the_calibrated_nll(calibrated):
    result = invoke("evaluate", "--run", calibrated["run"], "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["temperature"] == calibrated["record"]["temperature"]
    assert scores["loss"] == pytest.approx(calibrated["record"]["test"]["after"]["nll"], abs=1e-5)
    assert scores["accuracy"] == calibrated["record"]["test"]["after"]["accuracy"]
    text = invoke("evaluate", "--run", calibrated["run"])
    assert f"(calibrated, T = {scores['temperature']:.4g})" in text.stdout
    assert scores["abstain"] == {"threshold": calibrated["record"]["abstain"]["threshold"],
                                 **calibrated["record"]["abstain"]["test"]}
    assert "selective accuracy" in text.stdout


def test_saved_model_serves_the_probabilities_predict_returns(calibrated):
    import tensorflow as tf

    base = calibrated["root"] / "saved_models" / "run"
    assert os.listdir(base) == ["1"]
    version = base / "1"
    assert json.loads((version / "assets.extra" / CALIBRATION).read_text())["temperature"] == (
        calibrated["record"]["temperature"])
    signatures = tf.saved_model.load(str(version)).signatures
    for name in ("serving_default", "predict_images"):
        assert set(signatures[name].structured_outputs) == {"probabilities", "classes", "labels", "confident"}
        assert signatures[name].structured_outputs["confident"].dtype == tf.bool
    images = evaluation_pixels(calibrated["files"])
    served = signatures["predict_images"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected_probabilities(calibrated), atol=1e-5)
    assert list(served["confident"].numpy()) == list(expected_confident(calibrated))

    by_bytes = invoke("predict", "--saved-model", base, "--top-k", 4, "--json", *calibrated["files"])
    direct = invoke("predict", "--run", calibrated["run"], "--top-k", 4, "--json", *calibrated["files"])
    assert by_bytes.exit_code == 0 and direct.exit_code == 0, by_bytes.output + direct.output
    for s, d in zip(json.loads(by_bytes.stdout), json.loads(direct.stdout)):
        assert {t["label"]: t["prob"] for t in s["top"]} == pytest.approx({t["label"]: t["prob"] for t in d["top"]},
                                                                           abs=1e-5)
        assert s["confident"] == d["confident"]  # the export's verdict from the files' bytes, and predict's


def test_tflite_returns_the_calibrated_probabilities(calibrated):
    out = calibrated["root"] / "lite"
    result = invoke("export", "--run", calibrated["run"], "--format", "tflite", "--output", out, "--json")
    assert result.exit_code == 0, result.output
    version = out / "1"
    assert sorted(os.listdir(version)) == [CALIBRATION, "labels.txt", "model.tflite"]
    outputs = tflite_outputs(str(version / "model.tflite"), evaluation_pixels(calibrated["files"]))
    assert set(outputs) == {"probabilities", "confident"} and outputs["confident"].dtype == np.bool_
    np.testing.assert_allclose(outputs["probabilities"], expected_probabilities(calibrated), atol=1e-5)
    assert list(outputs["confident"]) == list(expected_confident(calibrated))


def test_report_draws_the_reliability_diagram(calibrated):
    result = invoke("report", "--run", calibrated["run"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    png = calibrated["run"] / "report" / "reliability.png"
    assert report["files"]["reliability_png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert report["calibration"]["temperature"] == calibrated["record"]["temperature"]
    assert report["calibration"]["after"] == calibrated["record"]["test"]["after"]
    assert report["loss"] == pytest.approx(calibrated["record"]["test"]["after"]["nll"], abs=1e-5)
    curve = calibrated["run"] / "report" / "risk_coverage.png"
    assert report["files"]["risk_coverage_png"] == str(curve)
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curve.stat().st_size > 10_000
    abstain = calibrated["record"]["abstain"]
    assert report["abstain"] == {"target": ABSTAIN, "threshold": abstain["threshold"], **abstain["test"]}


@pytest.mark.parametrize("args,message", [
    (["--run", "{root}/nope"], "--run '{root}/nope': no such run directory"),
    (["--run", "{run}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--run", "{run}", "--abstain", "coverage:1.5"], "--abstain 'coverage:1.5': give coverage:C"),
])
def test_calibrate_usage_errors_exit_2_with_one_line(calibrated, args, message):
    fill = {"root": calibrated["root"], "run": calibrated["run"]}
    result = invoke("calibrate", *[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert message.format(**fill) in result.output
    assert len(result.output.strip().splitlines()) == 1 or "Usage:" in result.output
