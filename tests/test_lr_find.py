"""tfl lr-find and finetune --lr find: fastai's valley rule on hand-made curves, the range test on a tiny model
(the weights put back afterwards), the command's files, the rate finetune records, and the usage errors."""

import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from tfl.cli import cli
from tfl.recipes.lr_find import DIVERGED, smooth, suggest, valley

TINY = ["--backbone", "compact_cnn", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--val-split", "0.25", "--freeze-up-to", "block2"]


# -- the rule (numpy) -----------------------------------------------------------------------------------------------
def test_valley_picks_halfway_down_the_longest_descent():
    # 10 flat points, 20 strictly falling ones, 10 rising ones. The longest strictly descending subsequence is one
    # of the flat 2.0s and the 20 falling points: length 21, ending at index 29. fastai's rule measures it from
    # 29 - 21 = 8 and steps int(21/3) + int(21/3/2) = 7 + 3 into it: index 18.
    curve = np.concatenate([np.full(10, 2.0), np.linspace(1.95, 0.5, 20), np.linspace(0.6, 3.0, 10)])
    assert valley(curve) == 18
    # the longest descent wins over a deeper but shorter one: 4 points down to 0.1, a jump to 5, then 12 points
    # falling to 2.0: the longest is 5.0 and those 12 (13 long, ending at 16), measured from 16 - 13 = 3
    two = np.concatenate([np.linspace(1.0, 0.1, 4), [5.0], np.linspace(4.9, 2.0, 12)])
    assert valley(two) == 3 + int(13 / 3) + int(13 / 3 / 2) == 9
    # a curve that only falls: the whole of it, from one before its start
    assert valley(np.linspace(1.0, 0.0, 9)) == -1 + 3 + 1


def test_suggest_leaves_out_the_first_tenth_and_the_last_five_steps():
    # Falling until step 30 of 40, then flat: the valley search runs on steps 4..34 (40 // 10 = 4, 40 - 5 = 35).
    curve = np.concatenate([np.linspace(2.0, 1.0, 30), np.full(10, 1.0)])
    search = curve[4:35]
    assert suggest(curve, 40) == 4 + valley(search)
    assert valley(search) == 25 - 26 + int(26 / 3) + int(26 / 3 / 2)  # 26 falling points of the search, end 25


def test_smoothing_is_the_bias_corrected_moving_average():
    losses = np.array([1.0, 3.0, 2.0, 5.0])
    beta, average, expected = 0.98, 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        expected.append(average / (1 - beta**i))
    np.testing.assert_allclose(smooth(losses), expected)
    np.testing.assert_allclose(smooth(np.full(5, 0.7)), 0.7)  # no bias towards zero at the start
    assert DIVERGED == 4.0


# -- the range test on a tiny model ------------------------------------------------------------------------------------
def test_the_range_test_grows_the_rate_stops_on_divergence_and_puts_the_weights_back(data):
    import tensorflow as tf

    from tfl.errors import UsageError
    from tfl.freezing import head_only_plan
    from tfl.job import Job
    from tfl.recipes.finetune import FinetuneOptions
    from tfl.recipes.lr_find import range_test

    opts = FinetuneOptions(dataset=data, backbone="compact_cnn", weights="none", image_size=32, batch_size=8,
                           val_split=0.25, freeze_up_to="block2", tensorboard=False)
    job = Job.setup(opts, log=lambda *_: None, strategy=tf.distribute.get_strategy())
    before = [np.array(v.numpy()) for v in job.model.variables]
    head = range_test(job, "head", 1e-4, 1e4, 40)
    after_head = [np.array(v.numpy()) for v in job.model.variables]
    tuned = range_test(job, "finetune", 1e-4, 1.0, 20)
    for b, a, t in zip(before, after_head, job.model.variables):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(b, t.numpy())
    lrs = [row["lr"] for row in head["curve"]]
    growth = (1e4 / 1e-4) ** (1 / 39)
    np.testing.assert_allclose(lrs, 1e-4 * growth ** np.arange(len(lrs)), rtol=1e-5)
    assert head["stopped"].startswith("diverged") and head["steps_run"] < 40  # 1e4 is far past any useful rate
    assert head["cached"] == "head_pool"  # the head stage trained on the cached pooled features
    assert head["suggestion"] == lrs[head["suggestion_step"] - 1]
    smoothed = smooth([row["loss"] for row in head["curve"]])
    assert head["suggestion_step"] - 1 == suggest(smoothed, 40)
    assert tuned["group"] == "backbone" and tuned["flag"] == "--backbone-lr"
    # the head moves with the backbone at --lr / --backbone-lr (0.3 x --lr by default)
    assert tuned["suggested_lrs"]["head"] == pytest.approx(tuned["suggestion"] / 0.3)
    job.plan = head_only_plan(job.plan)  # as --freeze-up-to at the backbone's last layer: nothing for --backbone-lr
    with pytest.raises(UsageError, match="freezes the whole backbone"):
        range_test(job, "finetune", 1e-4, 1.0, 20)


def test_lr_find_writes_its_json_csv_and_png_and_prints_the_suggestion(data, tmp_path):
    out = tmp_path / "find"
    result = CliRunner().invoke(cli, ["lr-find", "--dataset", data, *TINY, "--steps", "20", "--output-dir", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    found = json.loads((out / "lr_find.json").read_text())
    assert found["stage"] == "head" and found["flag"] == "--lr" and len(found["curve"]) == found["steps_run"]
    assert f"tfl finetune --lr {found['suggestion']:.3g}" in result.stdout
    with open(out / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == pytest.approx([p["lr"] for p in found["curve"]])
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(cli, ["lr-find", "--dataset", data, *TINY, "--steps", "20", "--output-dir", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output  # a finished test is not overwritten silently


def test_finetune_lr_find_trains_at_the_rate_found_and_records_it(data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, *TINY, "--head-epochs", "1", "--epochs", "1",
                                      "--lr", "find", "--no-tensorboard", "--output-dir", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    found = config["lr_find"]["lr"]
    assert found["requested"] == "find" and found["stage"] == "head" and "backbone_lr" not in config["lr_find"]
    assert config["lr"] == found["found"] == json.loads((out / "lr_find_head.json").read_text())["suggestion"]
    # both stages train at the rate found: the head at it, the backbone at 0.3 x it (no --backbone-lr given)
    assert [s["lrs"] for s in config["stages"]] == [{"head": found["found"]},
                                                    {"backbone": pytest.approx(0.3 * found["found"]),
                                                     "head": found["found"]}]
    assert os.path.isfile(out / "lr_find_head.png") and os.path.isfile(out / "model.keras")
    # the same command again continues the run (here: finished) at the rate it recorded, without a second test
    again = CliRunner().invoke(cli, ["finetune", "--dataset", data, *TINY, "--head-epochs", "1", "--epochs", "1",
                                     "--lr", "find", "--no-tensorboard", "--output-dir", str(out)])
    assert again.exit_code == 0, again.output
    assert f"--lr find: {found['found']:.3g}, as the run being resumed found it" in again.output
    assert "range test" not in again.output


@pytest.mark.parametrize("args, message", [
    (["finetune", "--lr", "fast"], "--lr': 'fast' is not a number or find"),
    (["finetune", "--backbone-lr", "-1"], "--backbone-lr': --backbone-lr -1.0: must be > 0"),
    (["finetune", "--lr", "find", "--freeze-up-to", "auto"], "--freeze-up-to auto with --lr find"),
    (["lr-find", "--stage", "all"], "'all' is not one of"),
    (["lr-find", "--start-lr", "1", "--end-lr", "0.1"], "--start-lr 1 and --end-lr 0.1: the range must grow"),
    (["lr-find", "--steps", "5"], "--steps 5: give at least 10"),
    (["lr-find", "--epochs", "3"], "No such option '--epochs'"),
    (["compare", "--lr", "find"], "--lr'"),  # only finetune takes find
])
def test_bad_values_are_usage_errors(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
