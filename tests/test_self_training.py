"""tfl self-train: the selection rule and its record on hand-made numbers, the option checks, a tiny end-to-end
run writing every output (--label-fraction and --unlabeled DIR), and resume in the middle of a round."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import tfl.cli as cli
from tfl.recipes.self_training import SelfTrainOptions, check_options, select, selection_record, self_train
from tfl.training import checkpoint, trainer as trainer_module
from tiny_runs import Stop, stop_at

CLASSES = ("c0", "c1", "c2", "c3")
TINY = dict(backbone="efficientnet_lite0", image_size=32, head_epochs=2, val_split=0.25, batch_size=8, lr=0.01,
            tensorboard=False)


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data(data_c0_to_c3):
    return data_c0_to_c3


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("st-run") / "run")
    opts = SelfTrainOptions(**TINY, dataset=data, output_dir=out, label_fraction=0.5, threshold=0.3, rounds=2)
    return self_train(opts, log=lambda *_: None)


# -- the selection rule ----------------------------------------------------------------------------------------------
def test_select_keeps_rows_at_or_above_the_threshold_with_their_top_class():
    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    rows, labels = select(p, 0.6)
    assert rows.tolist() == [0, 2, 3] and labels.tolist() == [0, 1, 0]


def test_selection_record_counts_per_pseudo_class_and_scores_only_rows_with_true_labels():
    truths = {"train": np.array([0, 1, 1, 0, 1]), "unlabeled": np.array([-1, -1])}
    pools = {"train": (np.array([0, 1, 3]), np.array([0, 0, 0])), "unlabeled": (np.array([1]), np.array([1]))}
    record = selection_record(pools, ["a", "b"], truths)
    assert record["passed"] == 4 and record["per_class"] == {"a": 3, "b": 1}
    assert record["checked"] == 3 and record["accuracy"] == pytest.approx(2 / 3)  # row 1 is really b
    assert record["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": None}  # b: only the folder row
    assert record["from_pool"] == {"train": 3, "unlabeled": 1}


@pytest.mark.parametrize("changes, words", [
    ({}, "--label-fraction F"),
    ({"label_fraction": 1.0}, "leaves no training row unlabeled"),
    ({"label_fraction": 0.1, "threshold": 1.0}, "--threshold 1.0"),
    ({"label_fraction": 0.1, "rounds": -1}, "--rounds -1"),
    ({"label_fraction": 0.1, "augment": True}, "--augment"),
    ({"unlabeled": "/nonexistent/folder"}, "not a directory"),
])
def test_bad_options_are_refused_naming_them(changes, words):
    with pytest.raises(ValueError, match=words.replace("-", r"\-").replace(".", r"\.")):
        check_options(SelfTrainOptions(**changes))


# -- end to end --------------------------------------------------------------------------------------------------------
def test_a_run_records_every_round_and_writes_its_outputs(reference):
    out = reference["output_dir"]
    rounds = reference["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # 4 classes x 12 training rows, half labeled (stratified): 24 labeled, 24 unlabeled.
    assert all(r["labeled"] == 24 and r["unlabeled"] == 24 for r in rounds)
    assert rounds[0]["pseudo_labeled"] == 0 and rounds[0]["pseudo_accuracy_trained"] is None
    for before, after in zip(rounds, rounds[1:]):  # round k trains on what round k-1 selected
        assert after["pseudo_labeled"] == before["selected"]["passed"]
        assert after["pseudo_accuracy_trained"] == before["selected"]["accuracy"]
    for r in rounds:
        chosen = r["selected"]
        assert sum(chosen["per_class"].values()) == chosen["passed"] <= 24 and chosen["checked"] == chosen["passed"]
    assert reference["metrics"]["baseline_test_accuracy"] == rounds[0]["test_accuracy"]
    assert _json(os.path.join(out, "self_training.json"))["rounds"] == rounds
    with open(os.path.join(out, "self_training.csv")) as f:
        table = list(csv.DictReader(f))
    assert [int(row["round"]) for row in table] == [0, 1, 2]
    assert {f"passed_{c}" for c in CLASSES} <= set(table[0])
    with open(os.path.join(out, "self_training.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "history.csv")) as f:
        stages = [row["stage"] for row in csv.DictReader(f)]
    assert stages == ["round0"] * 2 + ["round1"] * 2 + ["round2"] * 2
    config = _json(os.path.join(out, "config.json"))
    assert config["label_fraction"] == 0.5 and config["threshold"] == 0.3 and config["recipe"] == "self_train"
    assert os.path.isfile(os.path.join(out, "model.keras"))


def test_round_zero_is_the_labeled_only_baseline(data, reference, tmp_path):
    """--rounds 0 trains round 0 alone: the same model, so the same test accuracy as the longer run's round 0."""
    opts = SelfTrainOptions(**TINY, dataset=data, output_dir=str(tmp_path / "r0"), label_fraction=0.5,
                            threshold=0.3, rounds=0)
    result = self_train(opts, log=lambda *_: None)
    assert result["rounds"][0]["test_accuracy"] == reference["rounds"][0]["test_accuracy"]
    assert result["rounds"][0]["val_accuracy"] == reference["rounds"][0]["val_accuracy"]


def test_an_unlabeled_folder_joins_the_pool_without_accuracy(data, tmp_path):
    folder = tmp_path / "unlabeled"
    for name in CLASSES[:2]:  # 8 images, in nested folders; their classes are not told
        shutil.copytree(os.path.join(data, "test", name), folder / "some" / name)
    result = CliRunner().invoke(cli.cli, ["self-train", "--dataset", data, "--unlabeled", str(folder),
                                          "--backbone", "efficientnet_lite0", "--image-size", "32", "--head-epochs",
                                          "1", "--val-split", "0.25", "--batch-size", "8", "--threshold", "0.3",
                                          "--rounds", "1", "--no-tensorboard", "--output-dir", str(tmp_path / "run"),
                                          "--json"])
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout)["rounds"]
    assert all(r["labeled"] == 48 and r["unlabeled"] == 8 for r in rounds)  # every training row labeled
    assert rounds[0]["selected"]["accuracy"] is None and rounds[0]["selected"]["checked"] == 0
    assert rounds[1]["pseudo_labeled"] == rounds[0]["selected"]["from_pool"].get("unlabeled", 0)


def test_the_cli_refuses_a_missing_pool_with_exit_2(data, tmp_path):
    result = CliRunner().invoke(cli.cli, ["self-train", "--dataset", data, "--output-dir", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--label-fraction F" in result.output


def test_resume_in_the_middle_of_a_round_is_exact(data, reference, tmp_path, monkeypatch):
    """Stopped after epoch 3 (the first of round 1, which trains on round 0's pseudo-labels), the rerun continues
    from the checkpoint and ends with the uninterrupted run's rounds."""
    opts = SelfTrainOptions(**TINY, dataset=data, output_dir=str(tmp_path / "run"), label_fraction=0.5,
                            threshold=0.3, rounds=2)
    monkeypatch.setattr(trainer_module, "default_callbacks", lambda: [stop_at(3)])
    with pytest.raises(Stop):
        self_train(opts, log=lambda *_: None)
    state = checkpoint.load_latest(os.path.join(tmp_path, "run", "checkpoints"), log=lambda *_: None).state
    assert state["recipe"]["done"] == 1 and state["stage"] == "round1"
    monkeypatch.setattr(trainer_module, "default_callbacks", lambda: [])
    lines = []
    result = self_train(opts, log=lines.append)
    assert any("resuming after epoch 3" in line for line in lines)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in result["rounds"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in reference["rounds"]]
