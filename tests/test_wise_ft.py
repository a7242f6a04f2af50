"""tfl wise-ft: the backbone interpolated between its pretrained and fine-tuned weights, the fine-tuned head kept.

On a tiny random-init run (compact_cnn, --weights none: "pretrained" is the seeded initialisation): alpha 0 is
exactly the initial backbone under the fine-tuned head, alpha 1 exactly the run, the chosen alpha the best on val,
and the new run directory works with evaluate and export."""

import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import tfl
from tfl.cli import cli
from tfl.errors import UsageError
from tfl.models import backbone_of, head_layers
from tfl.recipes import averaging
from tfl.training.rundir import RunDir

# circle vs square; the whole backbone trains in stage 2, where the best val epoch is (so the backbone moved)
TINY = dict(backbone="compact_cnn", weights="none", image_size=32, head_epochs=2, epochs=3, batch_size=8,
            val_split=0.25, lr=0.003, backbone_lr=0.003, freeze_up_to="none", tensorboard=False)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """A fine-tuned run, and the same run stopped after its head stage (its backbone never trained)."""
    root = tmp_path_factory.mktemp("wise")
    tuned = tfl.finetune(dataset=data, output_dir=str(root / "tuned"), **TINY).run_dir
    head = tfl.finetune(dataset=data, output_dir=str(root / "head"), **{**TINY, "epochs": 0}).run_dir
    return root, tuned, head


@pytest.fixture(scope="module")
def swept(runs):
    root, tuned, _ = runs
    done = invoke("wise-ft", "--run", tuned, "--alphas", "0,0.5", "--output", root / "wise", "--json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout), str(root / "wise")


def arrays(variables):
    return [np.asarray(v.numpy()) for v in variables]


def head_arrays(model):
    return [np.asarray(w) for layer in head_layers(model) for w in layer.get_weights()]


def test_the_rebuilt_pretrained_backbone_is_the_runs_own_initialisation(runs):
    _, _, head = runs  # epochs 0: the backbone stayed as the run built it
    job = averaging.pretrained_job(head, log=lambda *_: None)
    trained = RunDir(head, create=False).load_model()
    for rebuilt, kept in zip(arrays(backbone_of(job.model).weights), arrays(backbone_of(trained).weights),
                             strict=True):
        assert np.array_equal(rebuilt, kept)


def test_alpha_0_is_the_pretrained_backbone_under_the_fine_tuned_head(runs, swept):
    _, tuned, _ = runs
    result, _ = swept
    pretrained = arrays(backbone_of(averaging.pretrained_job(tuned, log=lambda *_: None).model).weights)
    model = RunDir(tuned, create=False).load_model()
    tuned_backbone, tuned_head = arrays(backbone_of(model).weights), head_arrays(model)
    assert any(not np.array_equal(p, t) for p, t in zip(pretrained, tuned_backbone)), "stage 2 trained the backbone"
    at_zero = averaging.interpolate(pretrained, tuned_backbone, 0.0)
    assert all(np.array_equal(a, p) and a.dtype == p.dtype for a, p in zip(at_zero, pretrained))
    # the same model scored by hand: the pretrained backbone put under the fine-tuned head
    for v, p in zip(backbone_of(model).weights, pretrained):
        v.assign(p)
    assert all(np.array_equal(a, b) for a, b in zip(head_arrays(model), tuned_head))
    val = averaging.Scorer(averaging.pretrained_job(tuned, log=lambda *_: None).splits, 32, 8).score(model, "val")
    row = next(r for r in result["rows"] if r["alpha"] == 0.0)
    assert (row["val_accuracy"], row["val_nll"]) == (val["accuracy"], val["nll"])


def test_alpha_1_reproduces_the_fine_tuned_run_exactly(runs, tmp_path):
    root, tuned, _ = runs
    done = invoke("wise-ft", "--run", tuned, "--alphas", "1", "--output", tmp_path / "one", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["alpha"] == 1.0
    source, copy = RunDir(tuned, create=False).load_model(), RunDir(str(tmp_path / "one"), create=False).load_model()
    assert all(np.array_equal(a, b) for a, b in zip(source.get_weights(), copy.get_weights(), strict=True))
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    assert np.array_equal(source(images, training=False).numpy(), copy(images, training=False).numpy())


def test_the_chosen_alpha_has_the_best_val_accuracy_and_1_is_always_tried(swept):
    result, out = swept
    rows = result["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]  # 1 added to --alphas 0,0.5
    best = max(r["val_accuracy"] for r in rows)
    assert result["alpha"] == max(r["alpha"] for r in rows if r["val_accuracy"] == best)  # ties: the larger
    with open(os.path.join(out, "wise_ft.csv")) as f:
        table = list(csv.DictReader(f))
    assert [float(r["alpha"]) for r in table] == [0.0, 0.5, 1.0]
    assert [float(r["val_accuracy"]) for r in table] == [r["val_accuracy"] for r in rows]
    assert {"test_accuracy", "test_nll", "val_nll"} <= set(table[0])
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["wise_ft"]["alpha"] == result["alpha"] and config["wise_ft"]["source_run"].endswith("tuned")
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["val_accuracy"] == best and metrics["alpha"] == result["alpha"]
    with open(os.path.join(out, "wise_ft.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_new_run_works_with_evaluate_and_export(swept, tmp_path):
    result, out = swept
    scored = invoke("evaluate", "--run", out, "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["accuracy"] == pytest.approx(result["metrics"]["test_accuracy"], abs=1e-6)
    exported = invoke("export", "--run", out, "--output", tmp_path / "served", "--json")
    assert exported.exit_code == 0, exported.output
    assert os.path.isfile(os.path.join(json.loads(exported.stdout)["path"], "saved_model.pb"))


def test_the_table_names_the_chosen_alpha(runs, swept):
    root, tuned, _ = runs
    done = invoke("wise-ft", "--run", tuned, "--alphas", "0.5", "--output", root / "table")
    assert done.exit_code == 0, done.output
    assert "chosen" in done.output and "val acc" in done.output and "(best val accuracy" in done.output


def test_a_fixed_alpha_is_kept_whatever_val_says_and_1_is_scored_beside_it(runs, swept, tmp_path):
    root, tuned, _ = runs
    done = invoke("wise-ft", "--run", tuned, "--alpha", "0", "--output", tmp_path / "fixed", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["alpha"] == 0.0 and [r["alpha"] for r in result["rows"]] == [0.0, 1.0]
    assert result["chosen_by"] == "fixed by --alpha"
    swept_rows = {r["alpha"]: r for r in swept[0]["rows"]}  # the same weights as the sweep's alpha 0 and 1
    assert [r["val_accuracy"] for r in result["rows"]] == [swept_rows[a]["val_accuracy"] for a in (0.0, 1.0)]
    both = invoke("wise-ft", "--run", tuned, "--alpha", "0.5", "--alphas", "0,1", "--output", tmp_path / "both")
    assert both.exit_code == 2 and "--alpha" in both.output and "--alphas" in both.output
    outside = invoke("wise-ft", "--run", tuned, "--alpha", "1.5", "--output", tmp_path / "outside")
    assert outside.exit_code == 2 and "1.5" in outside.output


@pytest.mark.parametrize("alphas,expected", [(None, tuple(i / 10 for i in range(11))), ("0.5,0", (0.0, 0.5, 1.0)),
                                             ([1, 0.25, 0.25], (0.25, 1.0))])
def test_alphas_are_sorted_distinct_and_include_1(alphas, expected):
    assert averaging.parse_alphas(alphas) == expected


@pytest.mark.parametrize("alphas,named", [("0,1.5", "1.5"), ("0,x", "'x'"), ("-0.1", "-0.1")])
def test_bad_alphas_are_refused_with_exit_2_before_any_work(runs, alphas, named, tmp_path):
    _, tuned, _ = runs
    done = invoke("wise-ft", "--run", tuned, "--alphas", alphas, "--output", tmp_path / "x")
    assert done.exit_code == 2 and "--alphas" in done.output and named in done.output
    assert not os.path.exists(tmp_path / "x")


def test_a_non_empty_output_is_refused(runs, swept):
    _, tuned, _ = runs
    _, out = swept
    with pytest.raises(UsageError, match="--output .* is not empty"):
        tfl.wise_ft(tuned, alphas="1", output=out)
