"""tfl's Python API, used as a notebook would: import tfl, call a command with keyword arguments, read the result.
(The recipes called this way, compare, distill, forgetting and the rest: tests/test_docs_examples.py, which runs
the Python API page.)"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

import tfl

TINY = dict(backbone="compact_cnn", weights="none", image_size=32, head_epochs=1, epochs=1, batch_size=8,
            val_split=0.25, tensorboard=False)


@pytest.fixture(scope="module")
def four_classes(data_a_to_d):
    return data_a_to_d


@pytest.fixture(scope="module")
def finetuned(four_classes, tmp_path_factory):
    return tfl.finetune(dataset=four_classes, output_dir=str(tmp_path_factory.mktemp("api") / "run"), **TINY)


def test_import_tfl_is_light():
    import subprocess
    import sys

    code = "import sys, tfl; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_finetune_returns_its_run_directory_metrics_and_model(finetuned, four_classes):
    r = finetuned
    assert r.command == "finetune" and os.path.isdir(r.run_dir)
    with open(os.path.join(r.run_dir, "metrics.json")) as f:
        assert r.metrics["test_accuracy"] == json.load(f)["test_accuracy"]
    assert 0.0 <= r.metrics["test_accuracy"] <= 1.0
    model = r.load_model()
    assert model.output_shape == (None, 4)
    assert r.runs == [r.run_dir]
    same = tfl.load_model(r.run_dir)
    x = np.zeros((1, 32, 32, 3), "float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), same.predict(x, verbose=0))


def test_predict_evaluate_and_export_take_the_run(finetuned, four_classes, tmp_path):
    image = os.path.join(four_classes, "test", "a", "0.png")
    top = tfl.predict(image, finetuned.run_dir, top_k=2)
    assert top[0]["image"] == image and len(top[0]["top"]) == 2
    assert top[0]["top"][0]["label"] in ("a", "b", "c", "d")
    scores = tfl.evaluate(finetuned.run_dir)
    assert scores["accuracy"] == pytest.approx(finetuned.metrics["test_accuracy"])
    path = tfl.export(finetuned.run_dir, format="tflite", output=str(tmp_path / "export"))
    assert os.path.isfile(os.path.join(path, "model.tflite"))


def test_restore_copies_a_runs_weights_into_a_fresh_model_strictly(finetuned, tmp_path):
    import keras

    trained = finetuned.load_model()
    fresh = keras.models.clone_model(trained)
    path = str(tmp_path / "weights.weights.h5")
    trained.save_weights(path)
    report = tfl.restore(fresh, path)
    assert len(report.loaded) == len(trained.weights) and not report.problems()
    for a, b in zip(trained.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_messages_go_to_the_tfl_logger(four_classes, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tfl"):
        tfl.finetune(dataset=four_classes, output_dir=str(tmp_path / "run"), **{**TINY, "epochs": 0})
    assert any("test accuracy" in r.getMessage() for r in caplog.records if r.name == "tfl")


def test_options_are_checked_as_the_command_line_checks_them(four_classes):
    with pytest.raises(tfl.UsageError, match="takes no option 'epoch'; did you mean 'epochs'"):
        tfl.finetune(dataset=four_classes, epoch=3)
    with pytest.raises(tfl.UsageError, match="--epochs -1: must be >= 0"):
        tfl.finetune(dataset=four_classes, epochs=-1)
    with pytest.raises(tfl.UsageError, match="tfl.dann\\(\\) takes no option 'epochs'"):
        tfl.dann(dataset=four_classes, epochs=3)  # dann trains --head-epochs only: it does not take epochs
    opts = tfl.FinetuneOptions(dataset=four_classes, **TINY)
    assert tfl.api.options("finetune", opts, head_hidden=[16]).head_hidden == (16,)  # a list becomes a tuple


def test_option_facts_are_checked_in_one_place_for_every_command():
    """Field metadata (choices of each listed value, at least one value, options a command does not use) is what
    every recipe checks: the same sentence from the API, the CLI and a recipe called directly."""
    from tfl.options import check_options
    from tfl.recipes.compare import CompareOptions
    from tfl.recipes.forgetting import ForgettingOptions, forgetting

    with pytest.raises(tfl.UsageError, match=r"--arms \(none\): give at least one, e.g. scratch,"):
        check_options(CompareOptions(arms=()))
    with pytest.raises(tfl.UsageError, match="--strategies 'bogus': choose from naive"):
        forgetting(ForgettingOptions(strategies=("naive", "bogus")))
    with pytest.raises(tfl.UsageError, match=r"--worker-hosts \('a:1', 'b:2'\): ForgettingOptions does not use it"):
        forgetting(ForgettingOptions(worker_hosts=("a:1", "b:2")))


def test_weight_averaging_commands_are_functions_of_tfl():
    assert {"wise_ft", "soup"} <= set(tfl.__all__)
    assert tfl.wise_ft.__module__ == tfl.soup.__module__ == "tfl.api"


def test_lr_find_is_a_function_of_tfl_with_its_options_class():
    assert "lr_find" in tfl.__all__ and "LrFindOptions" in tfl.__all__
    assert tfl.lr_find.__module__ == "tfl.api"
    assert tfl.LrFindOptions().stage == "head"
    with pytest.raises(tfl.UsageError, match="--steps 5: give at least 10"):
        tfl.lr_find(steps=5)
    with pytest.raises(tfl.UsageError, match="takes no option 'epochs'"):
        tfl.lr_find(epochs=3)
    with pytest.raises(tfl.UsageError, match="--lr 'fast' is not a number or find"):
        tfl.finetune(lr="fast")
