"""tfl advise: the transferability scores against hand-checked cases and the reference implementation, the
recommendation rules on synthetic inputs, and `--freeze-up-to auto` end to end (advice.json, config.json, resume)."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from tfl.cli import cli
from tfl.recipes import advise as adv
from tfl.recipes import transferability as t

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def reference_cases():
    with open(os.path.join(FIXTURES, "logme_reference.json")) as f:
        return {case["name"]: case for case in json.load(f)["cases"]}


# -- LogME ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tall", "wide", "separable"])
def test_logme_reproduces_the_reference_implementation(name):
    case = reference_cases()[name]
    f, y = np.array(case["features"]), np.array(case["labels"])
    evidences, _, _ = t.logme_per_class(f, y, as_reference=True)
    np.testing.assert_allclose(evidences, case["per_class"], rtol=1e-9, atol=1e-12)
    assert t.logme(f, y, as_reference=True) == pytest.approx(case["logme"], rel=1e-9)
    if f.shape[0] > f.shape[1]:  # full column rank: the exact evidence is the reference's
        assert t.logme(f, y) == pytest.approx(case["logme"], rel=1e-9)


@pytest.mark.parametrize("name", ["tall", "wide"])
def test_logme_is_the_maximum_of_the_directly_computed_evidence(name):
    case = reference_cases()[name]
    f, y = np.array(case["features"]), np.array(case["labels"])
    evidences, alphas, betas = t.logme_per_class(f, y)
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(float)
        # The closed form equals the Gaussian log density N(y | 0, I/beta + F F^T / alpha) ...
        assert evidences[c] == pytest.approx(t.log_evidence(f, target, alphas[c], betas[c]), abs=1e-4)
        if name == "wide":  # N < D nearly interpolates: 11 updates (the reference's cap) stop short of the maximum
            continue
        # ... and no nearby (alpha, beta) gives more: the fixed point is the maximum.
        for da in (0.7, 1.0, 1.4):
            for db in (0.7, 1.0, 1.4):
                assert t.log_evidence(f, target, alphas[c] * da, betas[c] * db) <= evidences[c] + 1e-4


def test_logme_of_all_zero_features_is_the_noise_models_evidence():
    y = np.array([0, 1, 1, 0])
    # y_c ~ N(0, 1/beta) alone, beta = N / |y_c|^2 = 2: log evidence per example 0.5 log 2 - 0.5 - 0.5 log 2 pi
    expected = 0.5 * np.log(2.0) - 0.5 - 0.5 * np.log(2 * np.pi)
    assert t.logme(np.zeros((4, 3)), y) == pytest.approx(expected, abs=1e-4)


def test_logme_ranks_label_carrying_features_above_noise():
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    informative = np.eye(3)[y] + 0.1 * rng.normal(size=(90, 3))
    noise = rng.normal(size=(90, 3))
    assert t.logme(informative, y) > t.logme(noise, y) + 0.5


# -- H-score ----------------------------------------------------------------------------------------------------
def test_h_score_hand_checked_one_dimensional_cases():
    y = np.array([0, 0, 1, 1])
    # f = y: all variance is between classes: cov 0.25, cov(E[f|y]) 0.25 -> 1
    assert t.h_score(y[:, None].astype(float), y, shrinkage=None) == pytest.approx(1.0)
    # class 0 at -0.5, 0.5 and class 1 at 0.5, 1.5: total variance 0.5, between 0.25 -> 0.5
    f = np.array([[-0.5], [0.5], [0.5], [1.5]])
    assert t.h_score(f, y, shrinkage=None) == pytest.approx(0.5)
    assert t.h_score(f, y) == pytest.approx(0.5)  # in one dimension the shrinkage target is the covariance


def test_h_score_in_the_examples_span_equals_the_direct_inverse():
    rng = np.random.default_rng(1)
    y = np.arange(12) % 3
    f = rng.normal(size=(12, 30)) + rng.normal(size=(3, 30))[y]
    centred = f - f.mean(axis=0)
    cov = centred.T @ centred / 12
    means = np.stack([centred[y == c].mean(axis=0) for c in y])
    for a in (0.3, t.ledoit_wolf_shrinkage(centred)):
        shrunk = (1 - a) * cov + a * np.trace(cov) / 30 * np.eye(30)
        direct = np.trace(np.linalg.inv(shrunk) @ (means.T @ means / 12))
        assert t.h_score(f, y, shrinkage=a) == pytest.approx(direct, rel=1e-8)


def test_ledoit_wolf_matches_the_textbook_d_by_d_formula():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 7)) @ rng.normal(size=(7, 7))
    x = x - x.mean(axis=0)
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d
    beta = min(sum(np.sum((np.outer(r, r) - s) ** 2) for r in x) / n**2 / d, delta)
    assert t.ledoit_wolf_shrinkage(x) == pytest.approx(beta / delta, rel=1e-8)


# -- probe, BN gap, Kendall's tau -------------------------------------------------------------------------------
def test_probe_accuracy_hand_checked():
    train = np.array([[-1.0], [-1.1], [1.0], [1.1]])
    labels = np.array([0, 0, 1, 1])
    test = np.array([[-0.2], [0.3]])
    assert t.probe_accuracy(train, labels, test, np.array([0, 1])) == 1.0
    assert t.probe_accuracy(train, labels, test, np.array([1, 0])) == 0.0
    wide = np.hstack([train, np.zeros((4, 9))])  # more dimensions than examples: the dual form
    assert t.probe_accuracy(wide, labels, np.hstack([test, np.zeros((2, 9))]), np.array([0, 1])) == 1.0


def test_bn_gap_is_the_gaussian_kl_per_channel():
    same = np.array([0.0, 1.0]), np.array([1.0, 4.0])
    assert t.bn_gap(*same, *same, eps=0.0) == pytest.approx(0.0)
    # one sd of mean shift, same variance: KL = 0.5 in that channel, 0 in the other
    assert t.bn_gap(np.array([1.0, 1.0]), np.array([1.0, 4.0]), *same, eps=0.0) == pytest.approx(0.25)
    # variance doubled, no shift: 0.5 (log 1/2 + 2 - 1)
    assert t.bn_gap(np.zeros(1), np.array([2.0]), np.zeros(1), np.ones(1), eps=0.0) == pytest.approx(
        0.5 * (np.log(0.5) + 1.0))


def test_kendall_tau_hand_checked():
    assert t.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert t.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert t.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))  # tau-b with a tie
    assert np.isnan(t.kendall_tau([1, 1, 1], [1, 2, 3]))


# -- sampling ---------------------------------------------------------------------------------------------------
def test_stratified_sample_and_holdout_keep_every_class():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    sample = adv.stratified_sample(labels, 100, seed=0)
    counts = np.bincount(labels[sample])
    assert list(counts) == [50, 25, 15, 10]
    assert np.array_equal(sample, adv.stratified_sample(labels, 100, seed=0))
    assert not np.array_equal(sample, adv.stratified_sample(labels, 100, seed=1))
    assert len(adv.stratified_sample(labels, 1000, seed=0)) == 200
    fit, held = adv.holdout_split(labels[sample], 1 / 3, seed=0)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == 100
    assert set(labels[sample][held]) == set(range(4)) == set(labels[sample][fit])


# -- the rules --------------------------------------------------------------------------------------------------
STAGES = ["stem", "block1", "block2", "block3", "block4", "block5", "block6", "block7", "head"]


def synthetic(per_class, logme, gaps=0.1, native=(28, 28)):
    summary = {"train_examples": per_class * 10, "num_classes": 10, "median_per_class": float(per_class),
               "native_size": list(native) if native else None, "image_size": 64}
    scores = [{"boundary": s, "logme": v} for s, v in zip(STAGES, logme)]
    gap = {s: (gaps if np.isscalar(gaps) else gaps[i]) for i, s in enumerate(STAGES)}
    return summary, scores, gap


RISING = [0.1 * i for i in range(9)]  # best at the pooled features
PEAK_BLOCK4 = [0.0, 0.1, 0.2, 0.3, 0.8, 0.6, 0.5, 0.4, 0.3]


@pytest.mark.parametrize("per_class, scores, gaps, expected, words", [
    (50, RISING, 0.1, "head", "head only"),
    (adv.SMALL_PER_CLASS, RISING, 0.1, STAGES[-3], "fine-tune the top"),
    (adv.LARGE_PER_CLASS, RISING, 0.1, STAGES[-5], "upper half"),
    (50, PEAK_BLOCK4, 0.1, "block4", "the best boundary block4"),
    (adv.SMALL_PER_CLASS, PEAK_BLOCK4, 0.1, "stem", "everything above stem"),
    (adv.SMALL_PER_CLASS, RISING, adv.BN_GAP_HIGH * 1.5, "stem", "different domain"),
    (50, RISING, adv.BN_GAP_HIGH * 1.5, STAGES[-3], "never the head alone"),
    (adv.LARGE_PER_CLASS, PEAK_BLOCK4, 0.1, None, "everything"),
    (adv.LARGE_PER_CLASS, RISING, adv.BN_GAP_HIGH * 3, None, "everything"),  # BN statistics alone: different
])
def test_recommend_rules(per_class, scores, gaps, expected, words):
    rec = adv.recommend(*synthetic(per_class, scores, gaps), stride=32, input_size=224, lr=1e-3)
    assert rec["freeze_up_to"] == expected
    assert words in rec["reasons"]["freeze_up_to"]
    assert f"{per_class * 10:,} images" in rec["reasons"]["freeze_up_to"]


def test_recommend_ignores_a_shallower_peak_within_the_margin():
    scores = RISING[:-1] + [RISING[-2] - 0.001]  # block7 beats the pooled features by a hair
    rec = adv.recommend(*synthetic(50, scores), stride=32, input_size=224, lr=1e-3)
    assert rec["freeze_up_to"] == "head" and rec["best_boundary"] == "head"


@pytest.mark.parametrize("native, expected", [((8, 8), 96), ((28, 28), 112), ((32, 32), 128), (None, 64),
                                              ((300, 300), 64)])
def test_recommend_upscales_small_images(native, expected):
    rec = adv.recommend(*synthetic(50, RISING, native=native), stride=32, input_size=224, lr=1e-3)
    assert rec["image_size"] == expected
    small = rec["backbone_lr"] == pytest.approx(1e-3 * adv.SMALL_DATA_BACKBONE_LR)
    assert small and rec["epochs"] == 5


def proxied(accuracies: dict, val_examples: int, per_class=100, tie_rule=None, settings=None):
    summary, scores, gap = synthetic(per_class, RISING)
    for row in scores:
        row[adv.PROXY] = accuracies.get(row["boundary"])
    settings = {"head_epochs": 8, "epochs": 2, "train_rows": summary["train_examples"], "val_examples": val_examples,
                **(settings or {})}
    return adv.recommend(summary, scores, gap, stride=32, input_size=224, lr=1e-3, score=adv.PROXY, proxy=settings,
                         tie_rule=tie_rule)


def test_proxy_depths_are_every_other_boundary_and_the_pooled_features():
    assert adv.proxy_depths(STAGES) == ["stem", "block2", "block4", "block6", "head"]
    assert adv.proxy_depths(STAGES[:6]) == ["stem", "block2", "block4", "block5"]
    assert adv.proxy_depths(["stem"]) == ["stem"]


ACCURACIES = {"stem": 0.84, "block2": 0.83, "block4": 0.81, "block6": 0.79, "head": 0.77}


def test_proxy_picks_the_best_depth_and_ties_go_deeper():
    rec = proxied(ACCURACIES, 300)
    assert rec["freeze_up_to"] == "stem" and rec["best_boundary"] == "stem" and rec["score"] == adv.PROXY
    assert "stem 0.840, block2 0.830" in rec["reasons"]["freeze_up_to"] and "stem is best" in rec["reasons"][
        "freeze_up_to"]
    # best_mean's exact ties go to the deeper boundary; the size advice is the rules' own (28 px images: 112 px)
    flat = {"stem": 0.7, "block2": 0.7, "block4": 0.7, "block6": 0.7, "head": 0.7}
    tied = proxied(flat, 300, per_class=50, tie_rule="best_mean")
    assert tied["freeze_up_to"] == "head" and tied["image_size"] == 112
    # the default rule (shallowest, from the calibration) trains the most layers among depths it cannot tell apart
    assert adv.DEFAULT_TIE_RULE == "shallowest" and proxied(flat, 300, per_class=50)["freeze_up_to"] == "stem"
    # without the proxy's rates (an older advise.json) the epochs and lr come from the rules
    assert tied["epochs"] == 5 and tied["backbone_lr"] == pytest.approx(1e-3 * adv.SMALL_DATA_BACKBONE_LR)
    measured = proxied(ACCURACIES, 300, per_class=50, settings={"backbone_lr": 3e-4})
    assert (measured["head_epochs"], measured["epochs"], measured["backbone_lr"]) == (8, 2, 3e-4)
    assert "the proxy's" in measured["reasons"]["epochs"]


def test_proxy_deepest_tie_rule_is_the_one_standard_error_rule():
    # 300 val images: se = sqrt(0.84 * 0.16 / 300) = 0.0212; block2 (0.01 below) is within it, block4 (0.03) not
    rec = proxied(ACCURACIES, 300, tie_rule="deepest")
    assert rec["freeze_up_to"] == "block2" and rec["best_boundary"] == "stem" and rec["tied"] == ["stem", "block2"]
    assert rec["proxy_standard_error"] == pytest.approx(np.sqrt(0.84 * 0.16 / 300), abs=1e-6)
    assert "within 1 standard error (0.021)" in rec["reasons"]["freeze_up_to"]
    assert "tie rule deepest: block2" in rec["reasons"]["freeze_up_to"]
    # 10,000 val images: se 0.0037, so nothing else is within it
    assert proxied(ACCURACIES, 10_000, tie_rule="deepest")["freeze_up_to"] == "stem"
    # the rule advise.json records is the default one
    assert proxied(ACCURACIES, 300, settings={"tie_rule": "deepest"})["freeze_up_to"] == "block2"


# -- k-fold proxy: folds, spread, tie rules ---------------------------------------------------------------------
def test_stratified_folds_are_disjoint_cover_the_rows_and_keep_each_class_share():
    from tfl.data.folds import stratified_folds

    labels = np.repeat(np.arange(3), [30, 12, 7])
    folds = stratified_folds(labels, 3, seed=0)
    together = np.concatenate(folds)
    assert len(together) == len(labels) and set(together) == set(range(len(labels)))  # disjoint and covering
    for fold in folds:
        assert list(fold) == sorted(fold)
        counts = np.bincount(labels[fold], minlength=3)
        assert all(abs(c - n / 3) < 1 for c, n in zip(counts, [30, 12, 7])), counts  # floor or ceil of 1/3 each
    assert all(np.array_equal(a, b) for a, b in zip(folds, stratified_folds(labels, 3, seed=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, stratified_folds(labels, 3, seed=1)))
    with pytest.raises(ValueError, match="--proxy-folds 8: class 2 has only 7"):
        stratified_folds(labels, 8, seed=0)


def test_fold_splits_train_on_the_pool_but_the_fold_and_validate_on_it():
    import tensorflow as tf

    from tfl.data import DatasetSplits
    from tfl.data.folds import fold_splits, pool_labels, stratified_folds

    # train rows carry ids 0..9, val rows 100..103; the "image" is the id, so the rows a view yields are visible
    def split(ids, labels):
        images = np.broadcast_to(np.asarray(ids, np.uint8)[:, None, None, None], (len(ids), 1, 1, 3))
        return tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int64)))

    train_labels = np.arange(10) % 2
    splits = DatasetSplits("toy", split(range(10), train_labels), split(range(100, 104), [0, 1, 0, 1]), None,
                           ["a", "b"], {"train": 10, "val": 4, "test": 0}, (1, 1), "abc", train_labels=train_labels)
    rows = np.array([0, 1, 2, 3, 4, 5, 7, 8])  # the proxy's train rows (row 6 and 9 are not used)
    pool = pool_labels(splits, rows)
    assert list(pool) == [0, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1]
    ids = [0, 1, 2, 3, 4, 5, 7, 8, 100, 101, 102, 103]
    seen, prints = [], set()
    for held in stratified_folds(pool, 3, seed=0):
        view = fold_splits(splits, rows, held)
        train = [int(x[0, 0, 0]) for x, _ in view.train.as_numpy_iterator()]
        val = [int(x[0, 0, 0]) for x, _ in view.val.as_numpy_iterator()]
        assert val == [ids[i] for i in held] and not set(train) & set(val) and sorted(train + val) == ids
        assert view.num_examples == {"train": len(train), "val": len(val), "test": 0} and view.test is None
        assert list(view.train_labels) == [int(y) for _, y in view.train.as_numpy_iterator()]
        seen += val
        prints.add(view.fingerprint)
    assert sorted(seen) == ids and len(prints) == 3 and "abc" not in prints  # caches never mix the folds
    sample = np.setdiff1d(np.arange(12), held)[[0, 1, -1]]  # a fold that trains on a sample of the rest
    capped = fold_splits(splits, rows, held, train=sample)
    assert [int(x[0, 0, 0]) for x, _ in capped.train.as_numpy_iterator()] == [ids[i] for i in sample]
    assert capped.num_examples["train"] == 3 and capped.fingerprint not in prints
    with pytest.raises(ValueError, match="outside the fold"):
        fold_splits(splits, rows, held, train=[int(held[0])])


def test_a_fold_trains_on_no_more_images_than_the_run():
    from tfl.data.folds import stratified_folds

    labels = np.repeat(np.arange(10), 40)  # 100 train + 300 val pooled: a fold's other rows (267) outnumber 100
    held = stratified_folds(labels, 3, seed=0)[0]
    train = adv.fold_train(labels, held, 100, seed=0)
    assert len(train) == 100 and not set(train) & set(held) and list(np.bincount(labels[train])) == [10] * 10
    assert np.array_equal(adv.fold_train(labels, held, 1000, seed=0), np.setdiff1d(np.arange(400), held))


def test_proxy_spread_is_the_folds_mean_sd_and_standard_error():
    spread = adv.proxy_spread([0.70, 0.80, 0.75], {"pool_rows": 10_000})
    assert spread[adv.PROXY] == pytest.approx(0.75) and spread["proxy_sd"] == pytest.approx(0.05)
    assert spread["proxy_se"] == pytest.approx(0.05 / np.sqrt(3), abs=1e-6)  # larger than the binomial 0.0043
    assert spread["proxy_fold_accuracies"] == [0.7, 0.8, 0.75]
    # three agreeing folds are no surer than the rows they scored: the binomial floor on 120 rows
    agreeing = adv.proxy_spread([0.75, 0.75, 0.75], {"pool_rows": 120})
    assert agreeing["proxy_se"] == pytest.approx(np.sqrt(0.75 * 0.25 / 120), abs=1e-6)
    one = adv.proxy_spread([0.8], {"val_examples": 100})
    assert one["proxy_sd"] is None and one["proxy_se"] == pytest.approx(0.04)
    assert adv.proxy_spread(None, {})[adv.PROXY] is None


# stem .. head, shallow to deep; head is 0.01 best, block2 and block4 within its se of 0.02, block6 not
MEANS, SES = [0.70, 0.74, 0.73, 0.70, 0.75, None], [0.02, 0.02, 0.02, 0.02, 0.02, None]


@pytest.mark.parametrize("rule, expected", [("best_mean", 4), ("deepest", 4), ("shallowest", 1), ("middle", 2)])
def test_each_tie_rule_picks_its_depth_among_those_within_one_standard_error(rule, expected):
    chosen, best, candidates = adv.choose_depth(MEANS, SES, rule)
    assert (best, candidates) == (4, [1, 2, 4]) and chosen == expected
    assert adv.choose_depth(MEANS, SES, rule, band_se=0.0)[0] == 4  # no band: every rule takes the best


def test_tie_rules_on_a_deep_best_and_their_registry():
    means, ses = [0.80, 0.79, 0.70, 0.60], [0.02] * 4  # stem best; block2 within; the rest not
    assert [adv.choose_depth(means, ses, r)[0] for r in adv.TIE_RULES] == [0, 1, 0, 1]
    assert adv.choose_depth([0.7, 0.7, 0.7], [0.0] * 3, "best_mean")[0] == 2  # exact ties: the deeper
    from tfl.options import TIE_RULES

    assert tuple(adv.TIE_RULES) == TIE_RULES
    with pytest.raises(ValueError, match="--proxy-tie-rule 'nope'"):
        adv.choose_depth(means, ses, "nope")


def test_proxy_depth_recomputes_the_spread_from_the_recorded_folds():
    summary, scores, gap = synthetic(40, RISING)
    folds = {"stem": [0.70, 0.74, 0.72], "block2": [0.72, 0.70, 0.74], "block4": [0.75, 0.71, 0.73],
             "block6": [0.77, 0.73, 0.75], "head": [0.66, 0.70, 0.68]}
    for row in scores:  # only the folds: what calibrate_advise.py --rules reads from advise.json
        row["proxy_fold_accuracies"] = folds.get(row["boundary"])
        row[adv.PROXY] = None
    settings = {"head_epochs": 1, "epochs": 1, "train_rows": 400, "val_examples": 100, "folds": 3,
                "pool_rows": 200}
    picks = {rule: adv.recommend(summary, scores, gap, 32, 224, 1e-3, score=adv.PROXY, proxy=settings,
                                 tie_rule=rule) for rule in adv.TIE_RULES}
    # block6's mean 0.75, se max(0.02 / sqrt 3, sqrt(.75 * .25 / 200)) = 0.0306: everything but head is within
    assert picks["best_mean"]["freeze_up_to"] == "block6" and picks["deepest"]["freeze_up_to"] == "block6"
    assert picks["shallowest"]["freeze_up_to"] == "stem" and picks["middle"]["freeze_up_to"] == "block4"
    assert picks["shallowest"]["tied"] == ["stem", "block2", "block4", "block6"]
    reason = picks["shallowest"]["reasons"]["freeze_up_to"]
    assert "mean ± standard error of 3 folds of 200 train+val images" in reason and "block6 0.750 ± 0.031" in reason


def test_proxy_needs_proxy_rows():
    summary, scores, gap = synthetic(100, RISING)
    with pytest.raises(ValueError, match="proxy_accuracy"):
        adv.recommend(summary, scores, gap, stride=32, input_size=224, lr=1e-3, score=adv.PROXY)


# -- end to end -------------------------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_advise_then_finetune_auto_share_the_pass_and_record_the_choice(data, tmp_path):
    cache = tmp_path / "cache"
    common = ["--dataset", data, "--backbone", "compact_cnn", "--weights", "none", "--image-size", "32",
              "--val-split", "0.25", "--cache-dir", cache]
    # 8 val images: k-fold (2 folds here, to keep the test short) over the 24 train + 8 val, with the run's --ema
    result = run("advise", *common, "--output-dir", tmp_path / "advice", "--head-epochs", "1", "--batch-size", "8",
                 "--proxy-epochs", "1", "--proxy-folds", "2", "--ema", "0.9", "--json")
    assert result.exit_code == 0, result.output
    advice = json.loads(result.stdout)
    for name in ("advise.json", "advise.csv", "advise.png"):
        assert (tmp_path / "advice" / name).is_file(), name
    stages = [row["boundary"] for row in advice["boundaries"]]
    # the compact CNN's stages; `head` (its top conv) is the last boundary, the backbone's output
    assert stages == ["stem", "block1", "block2", "block3", "head"]
    assert advice["sample"]["rows"] == 24 and advice["data"]["examples_per_class"] == {"circle": 12, "square": 12}
    assert all(np.isfinite(row["logme"]) and 0 <= row["probe_accuracy"] <= 1 for row in advice["boundaries"])
    assert advice["pass"]["reused"] is False
    # The proxy: a real two-stage run above every other boundary, its val accuracy the score that chose the depth.
    proxy_depths = ["stem", "block2", "head"]
    assert advice["proxy"]["depths"] == proxy_depths and advice["proxy"]["val_examples"] == 8
    assert advice["proxy"]["epochs"] == 1 and advice["proxy"]["train_rows"] == 24
    assert advice["proxy"]["image_size"] == 32  # --image-size; without it, the size the advice recommends
    assert (advice["proxy"]["folds"], advice["proxy"]["folds_requested"], advice["proxy"]["pool_rows"]) == (2, 2, 32)
    assert advice["proxy"]["applied"] == {"ema": 0.9, "lr": 1e-3}  # the run's options, in every proxy run
    assert advice["proxy"]["fold_train_rows"] == [16, 16]  # the other fold: fewer than the run's 24 images
    for row in advice["boundaries"]:
        if row["boundary"] in proxy_depths:
            folds = []
            for fold in (0, 1):  # a real two-stage run per fold: train on the rest of train+val, validate on the fold
                folder = tmp_path / "advice" / "proxy" / row["boundary"] / f"fold{fold}"
                folds.append(json.loads((folder / "metrics.json").read_text())["val_accuracy"])
                config = json.loads((folder / "config.json").read_text())
                assert config["ema"] == 0.9 and config["fold"] == fold and config["folds"] == 2
                assert config["num_examples"]["train"] + config["num_examples"]["val"] == 32
                assert config["num_examples"]["val"] == 16  # stratified: 8 circles and 8 squares a fold
                plan = json.loads((folder / "freeze_plan.json").read_text())
                assert plan["freeze_up_to"] == row["boundary"]
            assert row["proxy_fold_accuracies"] == pytest.approx(folds, abs=1e-6)
            assert row["proxy_accuracy"] == pytest.approx(np.mean(folds), abs=1e-6)
            assert row["proxy_sd"] == pytest.approx(np.std(folds, ddof=1), abs=1e-6)
            assert row["proxy_se"] >= np.sqrt(row["proxy_accuracy"] * (1 - row["proxy_accuracy"]) / 32) - 1e-6
        else:
            assert row["proxy_accuracy"] is None and row["proxy_fold_accuracies"] is None
    assert "proxy_se" in (tmp_path / "advice" / "advise.csv").read_text().splitlines()[0]
    assert " ± " in adv.format_table(advice)
    assert advice["recommendation"]["score"] == "proxy_accuracy"
    assert (advice["recommendation"]["head_epochs"], advice["recommendation"]["epochs"]) == (1, 1)
    assert advice["recommendation"]["freeze_up_to"] in proxy_depths
    assert "proxy fine-tuning (1 head + 1 fine-tune epochs on 24 images)" in advice["recommendation"]["reasons"][
        "freeze_up_to"]
    rules = run("advise", *common, "--output-dir", tmp_path / "rules", "--proxy-epochs", "0", "--json")
    assert rules.exit_code == 0, rules.output
    rules = json.loads(rules.stdout)
    assert rules["proxy"] is None and rules["recommendation"]["score"] == "logme" and rules["pass"]["reused"]
    assert not (tmp_path / "rules" / "proxy").exists()

    # the backbone advise scored above, so its pass is reused
    flags = ["--backbone", "compact_cnn", "--weights", "none", "--image-size", "32", "--head-epochs", "1", "--epochs",
             "2", "--val-split", "0.25", "--lr", "0.01", "--backbone-lr", "0.01"]
    out = tmp_path / "run"
    args = ["finetune", *flags, "--dataset", data, "--batch-size", "8", "--freeze-up-to", "auto", "--cache-dir", cache,
            "--output-dir", out, "--no-tensorboard", "--proxy-folds", "1"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "backbone pass over 24 sample images reused" in result.output  # tfl advise's, from the cache
    recorded = json.loads((out / "advice.json").read_text())
    assert recorded["requested"] == "auto"
    # auto ran its own proxy with the run's budget (--head-epochs 1 and --epochs 2, batch 8), in a
    # temporary directory it removed
    proxy = recorded["proxy"]
    assert (proxy["head_epochs"], proxy["epochs"], proxy["batch_size"]) == (1, 2, 8)
    assert proxy["folds"] == 1 and proxy["pool_rows"] is None  # --proxy-folds 1: today's single val score
    assert not os.path.exists(proxy["runs"])
    chosen = recorded["recommendation"]["freeze_up_to"]
    assert recorded["resolved"]["freeze_up_to"] == chosen and chosen in proxy_depths
    assert f"--freeze-up-to auto -> {chosen}" in result.output
    assert [row["boundary"] for row in recorded["boundaries"]] == stages
    config = json.loads((out / "config.json").read_text())
    assert config["freeze_up_to_requested"] == "auto" and config["freeze_up_to"] == chosen
    assert json.loads((out / "freeze_plan.json").read_text())["freeze_up_to"] == chosen

    # Resume compares the resolved depth: a run whose recorded depth differs is refused, naming it.
    config["freeze_up_to"] = "stem" if chosen != "stem" else "block1"
    (out / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code != 0 and "freeze_up_to" in result.output


def test_advise_rejects_a_tiny_sample():
    result = CliRunner().invoke(cli, ["advise", "--sample", "5"])
    assert result.exit_code == 2 and "--sample 5" in result.output


@pytest.mark.parametrize("command, value, words", [("advise", "0", "must be auto, 1"), ("advise", "x", "'x' is not"),
                                                   ("finetune", "11", "2-10 folds"), ("compare", "-1", "must be")])
def test_bad_proxy_folds_exit_2_with_one_line(command, value, words):
    result = CliRunner().invoke(cli, [command, "--proxy-folds", value])
    assert result.exit_code == 2 and words in result.output
    assert result.output.strip().count("\n") == 0 and "--proxy-folds" in result.output


def test_proxy_folds_auto_cross_validates_only_a_small_val_split():
    from tfl.options import DEFAULT_PROXY_FOLDS, PROXY_SMALL_VAL

    assert adv.proxy_fold_count("auto", 100) == DEFAULT_PROXY_FOLDS == 3
    assert adv.proxy_fold_count("auto", PROXY_SMALL_VAL - 1) == 3 and adv.proxy_fold_count("auto", 500) == 1
    assert adv.proxy_fold_count(1, 100) == 1 and adv.proxy_fold_count(5, 10_000) == 5


def test_auto_needs_the_commands_resolver():
    """tfl.job calls no recipe: `auto` means what the command passes as resolve_depth, and without one is refused."""
    from tfl.job import Job, JobOptions

    with pytest.raises(ValueError, match="--freeze-up-to auto: this command cannot choose the depth"):
        Job.setup(JobOptions(freeze_up_to="auto"), log=print, strategy=None)


def test_calibrate_rules_report_scores_every_tie_rule_from_advise_json_without_training(tmp_path):
    """scripts/calibrate_advise.py --rules: the depth of every tie rule from the recorded folds, against the
    hand-swept best depth, for two made-up datasets."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "calibrate_advise.py")
    spec = importlib.util.spec_from_file_location("calibrate_advise", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    depths = ["stem", "block2", "block4", "block6", "head"]
    folds = {"a": [[0.70, 0.74, 0.72], [0.72, 0.70, 0.74], [0.75, 0.71, 0.73], [0.77, 0.73, 0.75], [0.66, 0.70, 0.68]],
             "b": [[0.90, 0.92, 0.91], [0.80, 0.80, 0.80], [0.70, 0.70, 0.70], [0.60, 0.60, 0.60], [0.5, 0.5, 0.5]]}
    test = {"a": [0.80, 0.70, 0.70, 0.70, 0.60], "b": [0.90, 0.80, 0.70, 0.60, 0.50]}  # stem best on both
    calibration = {"datasets": {}}
    for name in folds:
        summary, scores, gap = synthetic(40, RISING)
        for row in scores:
            row["proxy_fold_accuracies"] = folds[name][depths.index(row["boundary"])] if row["boundary"] in depths \
                else None
        advice = {"data": {**summary, "backbone_input_size": 224}, "boundaries": scores, "bn_gap_per_stage": gap,
                  "stride": 32, "lr": 1e-3, "proxy": {"head_epochs": 1, "epochs": 1, "train_rows": 400,
                                                      "val_examples": 100, "folds": 3, "pool_rows": 200}}
        (tmp_path / "advise" / name).mkdir(parents=True)
        (tmp_path / "advise" / name / "advise.json").write_text(json.dumps(advice))
        calibration["datasets"][name] = {"runs": {d: {"test_accuracy": a} for d, a in zip(depths, test[name])}}
    (tmp_path / "calibration.json").write_text(json.dumps(calibration))
    report = script.rules_report(str(tmp_path), log=lambda m: None)
    # a: stem, block2, block4 and block6 tie (block6 best): shallowest picks stem, middle block4, the others block6
    picks = {rule: report["datasets"]["a"]["rules"][rule]["recommended"] for rule in adv.TIE_RULES}
    assert picks == {"best_mean": "block6", "deepest": "block6", "shallowest": "stem", "middle": "block4"}
    assert report["datasets"]["b"]["best_depth"] == "stem"  # b: stem alone is best, every rule takes it
    assert report["rules"]["shallowest"]["within_one_stage"] == "2/2"
    assert report["rules"]["best_mean"]["within_one_stage"] == "1/2"
    assert report["rules"]["best_mean"]["mean_regret"] == pytest.approx((0.10 + 0.0) / 2)
    assert "| shallowest | 2/2 |" in (tmp_path / "rules.md").read_text()
