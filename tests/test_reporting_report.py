"""tfl.reporting.report: a real run directory made by hand (no trainer), reported, checked against evaluate_run."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfl.reporting.report import class_scores, confusion_matrix, format_report, report_run, top_confusions
from tiny_runs import image_folder

CLASSES = ["circle", "square"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """mobilenet at 32 px, seeded random weights; the head reads a random direction of the pooled features, with
    its bias at the median over the test split, so the test split gets both classes and some mistakes."""
    import keras

    from tfl import data, models
    from tfl.training import rundir

    root = tmp_path_factory.mktemp("report")
    folder = image_folder(root / "data", classes=CLASSES, per_class=16)
    config = {"dataset": folder, "data_dir": None, "val_split": 0.25, "seed": 0, "image_size": 32,
              "skip_bad_images": False, "batch_size": 4, "backbone": "mobilenet", "weights": "none"}
    splits = data.load_dataset(folder, val_split=0.25, seed=0, log=lambda *_: None)
    assert list(splits.class_names) == CLASSES
    keras.utils.set_random_seed(0)
    model = models.build_classifier("mobilenet", 2, 32, "none")
    batches = list(data.make_pipeline(splits.test, 32, 8, training=False, seed=0))
    images = np.concatenate([b["image"] if isinstance(b, dict) else b[0] for b in batches])
    labels = np.concatenate([b["label"] if isinstance(b, dict) else b[1] for b in batches])
    head = model.layers[-1]
    pooled = keras.ops.convert_to_numpy(keras.Model(model.input, head.input)(images, training=False))
    # A random-init backbone's features are ~1e-21 and nearly alike; scale the margin to unit spread.
    direction = np.random.RandomState(5).normal(size=pooled.shape[1])  # a seed that gives 2 of 8 wrong
    margin = pooled.astype(np.float64) @ direction
    scale = 1.0 / margin.std()
    kernel = np.zeros((pooled.shape[1], 2), np.float32)
    kernel[:, 1] = direction * scale
    head.set_weights([kernel, np.array([0.0, -np.median(margin * scale)], np.float32)])
    predicted = keras.ops.convert_to_numpy(model(images, training=False)).argmax(axis=1)
    assert 0 < (predicted != labels).sum() < len(labels) / 2 and 0 < predicted.sum() < len(labels), \
        f"the fixture's head is degenerate: predicts {predicted} for labels {labels}"
    run = rundir.RunDir(str(root / "run"))
    run.save_model(model)
    run.write_json(rundir.CONFIG, config)
    run.write_json(rundir.CLASSES, CLASSES)
    run.write_json(rundir.METRICS, {"test_accuracy": 0.0, "eval_split": "test"})
    return run.path


@pytest.fixture(scope="module")
def report(run_dir):
    return report_run(run_dir, batch_size=3, max_images=1, log=lambda *_: None)


def test_report_counts_and_scores(report):
    matrix = np.array(report["confusion_matrix"])
    assert report["split"] == "test" and report["examples"] == 8 == matrix.sum()
    assert (matrix.sum(axis=0) > 0).all()  # both classes predicted: the fixture's bias worked
    assert report["accuracy"] == round(np.trace(matrix) / matrix.sum(), 6)
    for i, row in enumerate(report["per_class"]):
        assert row["class"] == CLASSES[i]
        assert row["support"] == matrix[i].sum()
        assert row["recall"] == pytest.approx(matrix[i, i] / matrix[i].sum(), abs=1e-6)
        assert row["precision"] == pytest.approx(matrix[i, i] / matrix[:, i].sum(), abs=1e-6)
    wrong = int(matrix.sum() - np.trace(matrix))
    assert report["misclassified"]["total"] == wrong
    assert len(report["misclassified"]["shown"]) == 1


def test_report_keeps_the_most_confident_mistakes(run_dir, report, tmp_path):
    everything = report_run(run_dir, batch_size=8, max_images=8, output_dir=str(tmp_path), log=lambda *_: None)
    shown = everything["misclassified"]["shown"]
    assert len(shown) == everything["misclassified"]["total"] == report["misclassified"]["total"]
    assert [m["prob"] for m in shown] == sorted((m["prob"] for m in shown), reverse=True)
    assert all(m["true"] != m["predicted"] for m in shown)
    assert report["misclassified"]["shown"] == shown[:1]  # batch size 3 kept the same one as batch size 8


def test_report_accuracy_equals_evaluate_run(run_dir, report):
    from tfl.inference import evaluate_run

    evaluated = evaluate_run(run_dir, batch_size=5, log=lambda *_: None)
    assert (evaluated["split"], evaluated["examples"]) == (report["split"], report["examples"])
    assert evaluated["accuracy"] == report["accuracy"]
    assert evaluated["loss"] == pytest.approx(report["loss"], abs=1e-4)


def test_report_files(run_dir, report):
    out = os.path.join(run_dir, "report")
    assert sorted(os.listdir(out)) == ["confusion_matrix.json", "confusion_matrix.png", "misclassified.png",
                                       "per_class.csv", "report.json"]
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f) == report
    with open(os.path.join(out, "confusion_matrix.json")) as f:
        assert json.load(f)["matrix"] == report["confusion_matrix"]
    with open(os.path.join(out, "per_class.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASSES
    assert [int(r["support"]) for r in rows] == [row["support"] for row in report["per_class"]]
    for name in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(os.path.join(out, name)) as image:
            assert image.format == "PNG" and image.width > 100
            assert np.asarray(image.convert("RGB"), dtype=float).std() > 0
    text = format_report(report)
    assert "macro avg" in text and "weighted avg" in text and "circle" in text


def test_report_other_split_and_output_dir(run_dir, tmp_path):
    result = report_run(run_dir, split="val", output_dir=str(tmp_path), max_images=0, log=lambda *_: None)
    assert result["split"] == "val" and result["examples"] == 8 == np.sum(result["confusion_matrix"])
    assert result["misclassified"]["shown"] == []
    assert os.path.isfile(tmp_path / "misclassified.png") and os.path.isfile(tmp_path / "report.json")


def test_report_rejects_a_bad_split(run_dir):
    with pytest.raises(ValueError, match="split 'dev' is not a split; choose one of train, val, test"):
        report_run(run_dir, split="dev")


def test_scores_on_a_hand_made_matrix():
    matrix = np.array([[5, 1, 0, 0],
                       [2, 3, 0, 0],
                       [0, 0, 0, 0],   # absent and never predicted: left out of the macro mean
                       [0, 4, 0, 0]])  # never predicted right: precision, recall, F1 all 0
    scores = class_scores(matrix)
    per = scores["per_class"]
    assert per["support"] == [6, 5, 0, 4]
    assert per["precision"] == [round(5 / 7, 6), round(3 / 8, 6), 0.0, 0.0]
    assert per["recall"] == [round(5 / 6, 6), round(3 / 5, 6), 0.0, 0.0]
    f1 = [2 * p * r / (p + r) for p, r in ((5 / 7, 5 / 6), (3 / 8, 3 / 5))]
    assert per["f1"] == pytest.approx([*f1, 0.0, 0.0], abs=1e-6)
    assert scores["macro_avg"]["recall"] == pytest.approx((5 / 6 + 3 / 5) / 3, abs=1e-6)
    assert scores["weighted_avg"]["recall"] == pytest.approx(8 / 15, abs=1e-6)  # = accuracy
    assert top_confusions(matrix, list("abcd"), k=2) == [{"true": "d", "predicted": "b", "count": 4},
                                                         {"true": "b", "predicted": "a", "count": 2}]
    assert np.array_equal(confusion_matrix([0, 0, 1, 3], [0, 1, 1, 1], 4),
                          [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match="predicted labels must lie in 0..3"):
        confusion_matrix([0], [4], 4)


def test_a_missing_split_names_the_ones_there():
    from types import SimpleNamespace

    from tfl.inference import LoadedRun

    splits = SimpleNamespace(train=object(), val=object(), test=None, num_examples={"train": 3, "val": 1, "test": 0})
    loaded = LoadedRun("run", {}, CLASSES, None, "folder", splits)
    assert loaded.split()[0] == "val"
    with pytest.raises(ValueError, match="split 'test': folder has no test split; choose one of train, val"):
        loaded.split("test")
