"""tfl soup: the greedy soup (Wortsman et al. 2022, Recipe 1) of tiny runs from one initialisation (compact_cnn,
--weights none, one seed, three learning rates): never below its best ingredient on val, the weights exactly the
average of the ingredients it kept, a soup of one run is that run, and runs that cannot be averaged are refused."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import tfl
from tfl.cli import cli
from tfl.recipes import averaging
from tfl.training.rundir import RunDir

TINY = dict(backbone="compact_cnn", weights="none", image_size=32, head_epochs=1, epochs=2, batch_size=8,
            val_split=0.25, tensorboard=False, freeze_up_to="none")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(data_c0_to_c3, tmp_path_factory):
    """Three runs of one seed (so one initialisation and one val split) at three learning rates: on this machine
    the best scores 0.5 on val and averaging either other one into it scores 0.25, so the guard is exercised."""
    root = tmp_path_factory.mktemp("soup")
    paths = [tfl.finetune(dataset=data_c0_to_c3, output_dir=str(root / f"lr{lr}"), lr=lr, backbone_lr=lr, **TINY).run_dir
             for lr in (0.003, 0.001, 0.01)]
    return root, paths


@pytest.fixture(scope="module")
def souped(runs):
    root, paths = runs
    done = invoke("soup", *paths, "--output", root / "soup", "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout), str(root / "soup")


def test_the_soup_never_scores_below_its_best_ingredient_on_val(souped):
    result, out = souped
    rows = result["ingredients"]
    best = max(r["val_accuracy"] for r in rows)
    assert rows[0]["val_accuracy"] == best and rows[0]["kept"]  # ranked by val accuracy, the best first
    assert result["metrics"]["val_accuracy"] >= best
    assert result["metrics"]["best_ingredient_val_accuracy"] == best
    # greedy: an ingredient is kept exactly when the soup's val accuracy with it did not drop
    current = rows[0]["soup_val_accuracy"]
    for r in rows[1:]:
        assert r["kept"] == (r["soup_val_accuracy"] >= current)
        current = r["soup_val_accuracy"] if r["kept"] else current
    assert current == result["metrics"]["val_accuracy"]
    assert any(r["soup_val_accuracy"] < best for r in rows), "no ingredient would have lowered val: a weak test"
    with open(os.path.join(out, "soup.csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["ingredient"] for t in table] == [r["ingredient"] for r in rows]
    assert [t["kept"] for t in table] == [str(r["kept"]) for r in rows]


def test_the_soup_is_the_uniform_average_of_the_kept_runs(souped):
    result, out = souped
    kept = [RunDir(p, create=False).load_model().get_weights() for p in result["kept"]]
    soup = RunDir(out, create=False).load_model().get_weights()
    for i, w in enumerate(soup):
        if np.issubdtype(w.dtype, np.floating):
            expected = (sum(k[i].astype(np.float64) for k in kept) / len(kept)).astype(w.dtype)
            assert np.array_equal(w, expected)
        else:  # counters are the best run's
            assert np.array_equal(w, kept[0][i])


def test_a_soup_of_one_run_is_that_run(runs, tmp_path):
    _, paths = runs
    result = tfl.soup([paths[0]], output=str(tmp_path / "one"), log=lambda *_: None)
    assert result["kept"] == [paths[0]]
    source, soup = RunDir(paths[0], create=False).load_model(), RunDir(result["run_dir"], create=False).load_model()
    assert all(np.array_equal(a, b) for a, b in zip(source.get_weights(), soup.get_weights(), strict=True))
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    assert np.array_equal(source(images, training=False).numpy(), soup(images, training=False).numpy())


def test_the_soup_works_with_evaluate(souped):
    result, out = souped
    scored = invoke("evaluate", "--run", out, "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["accuracy"] == pytest.approx(result["metrics"]["test_accuracy"], abs=1e-6)
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["recipe"] == "soup" and len(config["soup"]["kept"]) == len(result["kept"])


def _changed_copy(path, target, **changes):
    """A copy of a run directory whose config.json says it was trained differently."""
    shutil.copytree(path, target)
    config = json.loads(open(os.path.join(target, "config.json")).read())
    config.update(changes)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    return str(target)


@pytest.mark.parametrize("changes,named", [({"seed": 5}, "seed"), ({"head_hidden": [16]}, "head_hidden"),
                                           ({"image_size": 48}, "image_size"), ({"backbone": "resnet18"}, "backbone")])
def test_runs_of_another_architecture_or_initialisation_are_refused_with_exit_2(runs, tmp_path, changes, named):
    _, paths = runs
    other = _changed_copy(paths[1], tmp_path / "other", **changes)
    done = invoke("soup", paths[0], other, "--output", tmp_path / "soup")
    assert done.exit_code == 2, done.output
    assert named in done.output and "other" in done.output
    assert not os.path.exists(tmp_path / "soup")


def test_runs_with_other_classes_are_refused(runs, tmp_path):
    _, paths = runs
    other = tmp_path / "other"
    shutil.copytree(paths[1], other)
    (other / "classes.json").write_text(json.dumps(["c1", "c0", "c2", "c3"]))
    done = invoke("soup", paths[0], other, "--output", tmp_path / "soup")
    assert done.exit_code == 2 and "other classes" in done.output


def test_a_run_named_twice_is_refused(runs, tmp_path):
    _, paths = runs
    done = invoke("soup", paths[0], paths[0], "--output", tmp_path / "soup")
    assert done.exit_code == 2 and "named twice" in done.output


def test_the_average_is_exact_for_one_ingredient_and_copies_counters():
    a = [np.array([1.0, 2.0], np.float32), np.array(3, np.int64)]
    b = [np.array([2.0, 5.0], np.float32), np.array(7, np.int64)]
    assert all(np.array_equal(x, y) for x, y in zip(averaging.average([a]), a))
    mean = averaging.average([a, b])
    assert np.array_equal(mean[0], np.array([1.5, 3.5], np.float32)) and mean[1] == 3
    half = averaging.interpolate(a, b, 0.5)
    assert np.array_equal(half[0], mean[0]) and half[1] == 7  # WiSE-FT copies the fine-tuned counters


def test_runs_that_held_out_another_val_split_are_souped_with_a_warning(runs, tmp_path):
    _, paths = runs
    other = _changed_copy(paths[1], tmp_path / "other", val_split=0.3)
    done = invoke("soup", paths[0], other, "--output", tmp_path / "soup")
    assert done.exit_code == 0, done.output
    assert "warning: the runs differ in val_split" in done.output
    config = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert config["soup"]["scored_on"] == os.path.abspath(paths[0]) and "val_split" in config["soup"]["warnings"][0]
