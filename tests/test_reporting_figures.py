"""tfl.reporting.figures: every figure is a real, non-blank PNG, from edge cases (1 epoch, N=0) up."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from tfl.reporting import figures


def rows(n_head=2, n_finetune=3):
    """history.csv rows as strings, as read back from disk: a head stage, then a stage that unfreezes twice."""
    out, trainable = [], ["head"]
    for epoch in range(1, n_head + n_finetune + 1):
        stage = "head" if epoch <= n_head else "finetune"
        if epoch > n_head:
            trainable = [f"block{8 - (epoch - n_head)}", *trainable]
        out.append({"epoch": str(epoch), "stage": stage, "train_loss": str(1.0 / epoch),
                    "train_accuracy": str(0.5 + 0.08 * epoch), "val_loss": str(1.2 / epoch),
                    "val_accuracy": str(0.45 + 0.07 * epoch), "seconds": "1.5",
                    "lr_backbone": "" if stage == "head" else str(1e-3 / epoch), "lr_head": str(1e-2 / epoch),
                    "trainable": ";".join(trainable)})
    return out


def assert_png(path, min_size=(200, 100)):
    assert os.path.isfile(path)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]  # the write was atomic
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 0


def test_curves_with_stage_change_and_unfreezes(tmp_path):
    history = rows()
    path = figures.write_curves(history, str(tmp_path / "curves.png"), title="tiny run")
    assert path == str(tmp_path / "curves.png")
    assert_png(path, (1000, 300))
    labels = [label for marks in figures._events(history).values() for label, _ in marks]
    assert labels == ["finetune", "unfreeze block7", "unfreeze block6", "unfreeze block5"]


def test_curves_from_history_csv_and_one_epoch(tmp_path):
    history = rows(n_head=1, n_finetune=0)
    csv_path = tmp_path / "history.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    read = figures.read_history_csv(str(csv_path))
    assert read == history
    assert_png(figures.write_curves(read, str(tmp_path / "sub" / "one.png")))


def test_curves_without_trainable_column_and_float_values(tmp_path):
    history = [{k: (float(v) if k not in ("stage", "trainable", "lr_backbone") else v) for k, v in row.items()
                if k != "trainable"} for row in rows()]
    assert_png(figures.write_curves(history, str(tmp_path / "c.png")))
    assert [label for marks in figures._events(history).values() for label, _ in marks] == ["finetune"]


def test_curves_reject_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="at least one history row"):
        figures.write_curves([], str(tmp_path / "c.png"))
    with pytest.raises(ValueError, match="'epoch'"):
        figures.write_curves([{"stage": "head"}], str(tmp_path / "c.png"))
    with pytest.raises(ValueError, match="no such history file"):
        figures.read_history_csv(str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("classes", [2, 50])
def test_confusion_matrix(tmp_path, classes):
    rng = np.random.RandomState(classes)
    matrix = rng.randint(0, 5, (classes, classes)) + np.eye(classes, dtype=int) * 20
    matrix[-1] = 0  # a class with no examples: its row stays white instead of dividing by zero
    path = figures.write_confusion_matrix(matrix, [f"class_{i}" for i in range(classes)], str(tmp_path / "cm.png"))
    assert_png(path, (400, 400))


def test_confusion_matrix_needs_matching_names(tmp_path):
    with pytest.raises(ValueError, match=r"\[3, 3\] for 3 class names, got shape \(2, 2\)"):
        figures.write_confusion_matrix(np.eye(2, dtype=int), ["a", "b", "c"], str(tmp_path / "cm.png"))


@pytest.mark.parametrize("n", [0, 1, 11])
def test_misclassified_grid(tmp_path, n):
    images = np.random.RandomState(0).randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    path = figures.write_misclassified_grid(images, ["circle"] * n, ["square"] * n, [0.9] * n,
                                            str(tmp_path / "grid.png"), columns=8)
    assert_png(path, (150, 100))


def test_misclassified_grid_checks_lengths(tmp_path):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="got 2 images, 1 true"):
        figures.write_misclassified_grid(images, ["a"], ["b", "b"], [0.5, 0.5], str(tmp_path / "g.png"))
