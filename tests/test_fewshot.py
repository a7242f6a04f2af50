"""tfl fewshot: the episode sampler (its draw, pairing across K, the error naming a short class), both classifiers
and the interval on hand-made numbers, and a tiny end-to-end run through the CLI writing every output."""

import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import tfl.cli as cli
from tfl.recipes.fewshot import (EpisodeSampler, FewShotOptions, interval, linear_predict, prototype_predict,
                                 run_episodes)

NAMES = ["a", "b", "c", "d"]
LABELS = np.repeat(np.arange(4), 10)  # 10 rows per class


def test_an_episode_has_ways_classes_disjoint_support_and_queries_of_those_classes():
    sampler = EpisodeSampler(LABELS, NAMES, ways=3, shots=2, queries=4, seed=0)
    classes, s_rows, s_y, q_rows, q_y = sampler.episode(7)
    assert len(set(classes.tolist())) == 3 and len(s_rows) == 6 and len(q_rows) == 12
    assert not set(s_rows.tolist()) & set(q_rows.tolist())
    assert (LABELS[s_rows] == classes[s_y]).all() and (LABELS[q_rows] == classes[q_y]).all()
    assert s_y.tolist() == [0, 0, 1, 1, 2, 2]


def test_episodes_are_seeded_and_paired_across_shots():
    sampler = EpisodeSampler(LABELS, NAMES, ways=2, shots=5, queries=3, seed=1)
    one, five = sampler.episode(3, shots=1), sampler.episode(3, shots=5)
    assert (one[0] == five[0]).all() and (one[3] == five[3]).all()  # same classes, same queries
    assert set(one[1].tolist()) <= set(five[1].tolist())  # the 1-shot support is in the 5-shot one
    again = EpisodeSampler(LABELS, NAMES, ways=2, shots=5, queries=3, seed=1).episode(3, shots=5)
    assert all((x == y).all() for x, y in zip(five, again))
    other = EpisodeSampler(LABELS, NAMES, ways=2, shots=5, queries=3, seed=2)
    assert any(not np.array_equal(other.episode(i)[3], sampler.episode(i)[3]) for i in range(5))


def test_the_sampler_stops_naming_the_class_with_too_few_images():
    labels = np.concatenate([np.repeat([0, 1, 3], 10), [2, 2, 2]])  # class c has 3 rows
    with pytest.raises(ValueError, match=r"class 'c' has 3 image\(s\).*--shots 2 \+ --queries 4 = 6"):
        EpisodeSampler(labels, NAMES, ways=2, shots=2, queries=4, seed=0)
    with pytest.raises(ValueError, match="--ways 5: .* only 4 classes"):
        EpisodeSampler(LABELS, NAMES, ways=5, shots=1, queries=1, seed=0)


def test_prototypes_use_class_means_and_cosine_similarity():
    support = np.array([[1.0, 0.0], [3.0, 0.2], [0.0, 1.0], [0.0, 5.0]])
    labels = np.array([0, 0, 1, 1])
    # Class 0's mean points along x, class 1's along y; a long query on the diagonal slightly below it goes to x
    # by angle even though it is nearer class 1's mean in Euclidean distance.
    query = np.array([[10.0, 9.0], [0.1, 2.0], [2.0, 0.1]])
    assert prototype_predict(support, labels, query, 2).tolist() == [0, 1, 0]


def test_the_linear_head_learns_a_separable_support_set():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    support_y, query_y = np.repeat(np.arange(3), 5), np.repeat(np.arange(3), 20)
    support = centres[support_y] + rng.normal(size=(15, 16))
    query = centres[query_y] + rng.normal(size=(60, 16))
    predicted = linear_predict(support, support_y, query, 3, steps=100, lr=1.0, decay=1e-3)
    assert np.mean(predicted == query_y) > 0.9
    untrained = linear_predict(support, support_y, query, 3, steps=0, lr=1.0, decay=0.0)
    assert np.mean(untrained == query_y) == pytest.approx(1 / 3)  # zero init: every query ties, argmax says 0


def test_interval_is_the_normal_95_percent_half_width():
    result = interval([0.0, 1.0, 0.0, 1.0])
    sd = np.std([0, 1, 0, 1], ddof=1)
    assert result["mean"] == 0.5 and result["ci95"] == pytest.approx(1.959964 * sd / 2, abs=1e-6)


def test_run_episodes_summarises_each_shot_and_method_on_easy_features():
    rng = np.random.default_rng(0)
    features = np.eye(4)[LABELS] * 5 + rng.normal(scale=0.5, size=(40, 4))
    opts = FewShotOptions(ways=3, shots=(1, 3), queries=4, episodes=10, seed=0)
    run = run_episodes(features, LABELS, NAMES, opts, log=lambda *_: None)
    assert [(r["shots"], r["method"]) for r in run["results"]] == [(1, "prototype"), (1, "linear"),
                                                                   (3, "prototype"), (3, "linear")]
    assert all(r["episodes"] == 10 and r["mean"] > 0.9 for r in run["results"])
    assert len(run["episodes"]) == 20


# -- end to end --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(data_c0_to_c3):
    return data_c0_to_c3


TINY = ["--backbone", "efficientnet_lite0", "--image-size", "32", "--val-split", "0.25", "--batch-size", "8"]


def test_a_tiny_run_writes_every_output(data, tmp_path):
    out = tmp_path / "fs"
    result = CliRunner().invoke(cli.cli, ["fewshot", "--dataset", data, *TINY, "--split", "train", "--ways", "3",
                                          "--shots", "1,5", "--queries", "4", "--episodes", "12", "--output-dir",
                                          str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["class_counts"] == {"c0": 12, "c1": 12, "c2": 12, "c3": 12}
    assert [(r["shots"], r["method"]) for r in printed["results"]] == [(1, "prototype"), (1, "linear"),
                                                                       (5, "prototype"), (5, "linear")]
    assert all(0.0 <= r["mean"] <= 1.0 and r["ci95"] >= 0 for r in printed["results"])
    with open(out / "fewshot.json") as f:
        assert json.load(f)["results"] == printed["results"]
    with open(out / "fewshot_episodes.csv") as f:
        assert len(list(csv.DictReader(f))) == 24
    with open(out / "fewshot.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    with open(out / "fewshot.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = CliRunner().invoke(cli.cli, ["fewshot", "--dataset", data, *TINY, "--split", "train", "--ways", "2",
                                         "--shots", "1", "--queries", "2", "--episodes", "3", "--output-dir",
                                         str(tmp_path / "t")])
    assert table.exit_code == 0 and "prototype" in table.stdout and "± 95%" in table.stdout


def test_the_cli_exits_2_naming_a_class_with_too_few_images(data, tmp_path):
    result = CliRunner().invoke(cli.cli, ["fewshot", "--dataset", data, *TINY, "--split", "test", "--shots", "1",
                                          "--queries", "4", "--ways", "2", "--output-dir", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "'c0' has 4" in result.output and "--shots 1 + --queries 4 = 5" in result.output
    assert not os.path.exists(tmp_path / "x" / "fewshot.json")


def test_the_batch_size_does_not_stop_episodes_on_a_small_folder(data, tmp_path):
    # 48 train images, fewer than the default --batch-size 64: nothing trains, so only the episodes are checked.
    args = ["fewshot", "--dataset", data, *[a for a in TINY if a not in ("--batch-size", "8")], "--split", "test",
            "--ways", "2", "--shots", "1"]
    short = CliRunner().invoke(cli.cli, [*args, "--queries", "4", "--output-dir", str(tmp_path / "x")])
    assert short.exit_code == 2, short.output
    assert "'c0' has 4" in short.output and "--batch-size" not in short.output
    fits = CliRunner().invoke(cli.cli, [*args, "--queries", "3", "--episodes", "3", "--output-dir",
                                        str(tmp_path / "y"), "--json"])
    assert fits.exit_code == 0, fits.output
    assert json.loads(fits.stdout)["settings"]["shots"] == [1]
