"""finetune's behaviour, pinned: the losses of a seeded tiny run as they were before the job/recipe split.

Any change to the data order, the model, the freeze plan, the optimizers, the schedules or the loss shows up here.
Numbers recorded on main at 72b5599 (TF 2.21, Keras 3.15, CPU, op determinism on).
"""

import csv
import json
import os

import pytest

from tfl.recipes.finetune import FinetuneOptions, finetune

# (stage, train_loss, val_loss, lr_backbone, lr_head) per epoch
PINNED = [
    ("head", 0.364482, 0.304029, None, 0.003),
    ("head", 0.272641, 0.278225, None, 0.0015),
    ("finetune", 0.100392, 0.003821, 0.0003, 0.003),
    ("finetune", 0.008078, 0.001462, 0.00015, 0.0015),
]


def test_seeded_tiny_finetune_reproduces_its_pinned_losses(data, tmp_path):
    root = data
    opts = FinetuneOptions(backbone="efficientnet_lite0", weights="default", image_size=32, head_epochs=2, epochs=2,
                           val_split=0.25, freeze_up_to="block6", lr=0.003, backbone_lr=0.0003, dataset=root,
                           output_dir=str(tmp_path / "run"), batch_size=8, seed=3)
    metrics = finetune(opts, log=lambda *_: None)
    with open(tmp_path / "run" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == [p[0] for p in PINNED]
    for row, (stage, train_loss, val_loss, lr_backbone, lr_head) in zip(rows, PINNED):
        assert float(row["train_loss"]) == pytest.approx(train_loss, rel=1e-4, abs=2e-6), row
        assert float(row["val_loss"]) == pytest.approx(val_loss, rel=1e-4, abs=2e-6), row
        assert float(row["lr_head"]) == pytest.approx(lr_head, rel=1e-5)
        assert (row["lr_backbone"] == "") == (lr_backbone is None)
        if lr_backbone is not None:
            assert float(row["lr_backbone"]) == pytest.approx(lr_backbone, rel=1e-5)
    assert metrics["best_epoch"] == 1 and metrics["test_loss"] == pytest.approx(0.273326, rel=1e-4)
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["test_accuracy"] == 1.0
    assert os.path.isfile(tmp_path / "run" / "model.keras")
