"""Augmentation policies (tfl.data.augment, tfl.data.mixing): seeded repeatability, mixing and the mixed-target loss
against numpy, bad values, and MixUp on cached boundary activations keeping the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tfl.cli import cli

CLASSES = 3


def _store(n=8, size=16):
    from tfl.data.pipeline import ImageStore

    rng = np.random.default_rng(0)
    return ImageStore(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                      (np.arange(n) % CLASSES).astype(np.int32), size)


def _epochs(store, policy, seed, epochs=1):
    """`epochs` passes over one pipeline (each pass draws anew, from the seed)."""
    from tfl.data.pipeline import index_order

    ds = store.batches(index_order(store.count, 4, training=True, seed=seed), policy, seed=seed)
    return [[{k: v.numpy() for k, v in b.items()} for b in ds] for _ in range(epochs)]


def test_every_policy_repeats_with_its_seed_and_draws_anew_each_epoch():
    import tensorflow as tf

    from tfl.data.augment import Policy, augment_batch
    from tfl.data.pipeline import IMAGE, LABEL, TARGET

    store = _store()
    policy = Policy("randaugment", mixup=0.4, cutmix=1.0, random_erasing=0.5, num_classes=CLASSES)
    first, second = _epochs(store, policy, 5, epochs=2)
    (again,) = _epochs(store, policy, 5)
    for a, b in zip(first, again):
        assert a.keys() == b.keys() == {IMAGE, LABEL, TARGET}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(np.concatenate([b[IMAGE] for b in first]), np.concatenate([b[IMAGE] for b in second]))
    for batch in first:
        assert batch[IMAGE].min() >= 0 and batch[IMAGE].max() <= 255
        np.testing.assert_allclose(batch[TARGET].sum(1), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(batch[LABEL], batch[TARGET].argmax(1))  # accuracy reads the larger share
    # basic is the augmentation --augment was before it took a policy, draw for draw
    images, seed = tf.constant(store.images[:4], tf.float32), tf.constant([3, 4], tf.int64)
    np.testing.assert_array_equal(Policy("basic").images({IMAGE: images}, seed)[IMAGE].numpy(),
                                  augment_batch(images, seed).numpy())


def test_mixup_and_cutmix_against_numpy():
    import tensorflow as tf

    from tfl.data import mixing
    from tfl.data.pipeline import IMAGE, LABEL, TARGET

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (4, 10, 12, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 1], np.int32)
    seed = tf.constant([7, 8], tf.int64)
    mixed = mixing.mixup({IMAGE: tf.constant(x), LABEL: tf.constant(labels)}, IMAGE, seed, 0.4, CLASSES)
    lam = mixed[TARGET].numpy()[0, 0]  # row 0 (class 0) is mixed with row 3 (class 1)
    np.testing.assert_allclose(mixed[IMAGE].numpy(), lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-3)
    onehot = np.eye(CLASSES, dtype=np.float32)[labels]
    np.testing.assert_allclose(mixed[TARGET].numpy(), lam * onehot + (1 - lam) * onehot[::-1], rtol=1e-6)

    cut = mixing.cutmix({IMAGE: tf.constant(x), LABEL: tf.constant(labels)}, IMAGE, seed, 1.0, CLASSES)
    pasted = np.all(cut[IMAGE].numpy() == x[::-1], axis=-1)  # [B, H, W]: pixels taken from the reversed batch
    kept = np.all(cut[IMAGE].numpy() == x, axis=-1)
    assert np.all(pasted | kept) and np.all(pasted == pasted[0])  # one box for the whole batch
    lam = 1.0 - pasted[0].mean()
    assert 0 < lam < 1
    np.testing.assert_allclose(cut[TARGET].numpy(), lam * onehot + (1 - lam) * onehot[::-1], rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_loss_trains_on_soft_targets_as_numpy_says(smoothing):
    import tensorflow as tf

    from tfl.data.pipeline import LABEL, TARGET
    from tfl.training.trainer import CrossEntropy

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, CLASSES)).astype(np.float32)
    target = rng.dirichlet(np.ones(CLASSES), 5).astype(np.float32)
    labels = target.argmax(1).astype(np.int32)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    smoothed = target * (1 - smoothing) + smoothing / CLASSES
    loss = CrossEntropy(CLASSES, smoothing)({LABEL: tf.constant(labels), TARGET: tf.constant(target)}, logits)
    np.testing.assert_allclose(loss.numpy(), -(smoothed * log_p).sum(1), rtol=1e-5)
    hard = CrossEntropy(CLASSES, smoothing)({LABEL: tf.constant(labels)}, logits)  # no TARGET: one-hot labels
    onehot = np.eye(CLASSES)[labels] * (1 - smoothing) + smoothing / CLASSES
    np.testing.assert_allclose(hard.numpy(), -(onehot * log_p).sum(1), rtol=1e-5)


def test_random_erasing_fills_one_rectangle_per_chosen_image():
    import tensorflow as tf

    from tfl.data.augment import ERASE_AREA, random_erasing_batch

    x = tf.fill([6, 20, 20, 3], 300.0)  # out of the noise's range: erased pixels are told apart exactly
    seed = tf.constant([1, 2], tf.int64)
    np.testing.assert_array_equal(random_erasing_batch(x, seed, 0.0).numpy(), x.numpy())
    erased = np.any(random_erasing_batch(x, seed, 1.0).numpy() != 300.0, axis=-1)
    for mask in erased:
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box == mask.sum()  # a rectangle
        assert ERASE_AREA[0] * 400 - 20 <= box <= ERASE_AREA[1] * 400 + 20  # (rounded to whole pixels)


@pytest.mark.parametrize("args, message", [
    (["--mixup", "-1"], "--mixup -1.0: must be >= 0"),
    (["--cutmix", "-0.5"], "--cutmix -0.5: must be >= 0"),
    (["--random-erasing", "2"], "--random-erasing 2.0: must be in [0, 1]"),
    (["--mixup-on", "labels"], "'labels' is not one of 'auto', 'features', 'pixels'"),
])
def test_bad_values_exit_2_with_one_line(args, message):
    result = CliRunner().invoke(cli, ["finetune", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_the_library_checks_the_same_values_and_a_bool_augment_keeps_its_meaning():
    from tfl.errors import UsageError
    from tfl.options import JobOptions, augmentation_flags, check_options

    with pytest.raises(UsageError, match=r"--random-erasing 1.5: must be in \[0, 1\]"):
        check_options(JobOptions(random_erasing=1.5))
    assert JobOptions(augment=True).augment == "basic" and JobOptions(augment=False).augment == "none"
    assert augmentation_flags(JobOptions(augment="randaugment", mixup=0.2)) == ["--augment randaugment",
                                                                                "--mixup 0.2"]


# -- MixUp on cached features --------------------------------------------------------------------------------------
def _compact_inputs(tmp_path, log, policy, freeze="block2"):
    import keras

    from tfl import freezing, models
    from tfl.backbones import registry
    from tfl.training.boundary import StageInputs, data_identity

    keras.utils.set_random_seed(0)
    model = models.build_classifier("compact_cnn", CLASSES, 32, None)
    store = _store(12, 32)
    inputs = StageInputs(model, "compact_cnn", {}, {"train": 12, "val": 12},
                         {s: data_identity("aug", s) for s in ("train", "val")}, 32, 4, 0, augment=policy,
                         cache_dir=str(tmp_path), log=log, stores={"train": store, "val": store})
    plan = freezing.make_plan(registry.get("compact_cnn"), model, freeze)
    stages = [("head", freezing.head_only_plan(plan), 1), ("finetune", plan, 1)]
    inputs.plan(stages)
    return inputs, stages, model


def test_feature_mixup_keeps_the_cache_mixes_the_activations_and_repeats_on_resume(tmp_path):
    from tfl import freezing
    from tfl.data.augment import Policy
    from tfl.data.pipeline import FEATURES, LABEL, TARGET
    from tfl.errors import UsageError

    log = []
    policy = Policy(mixup=0.4, num_classes=CLASSES)
    inputs, stages, model = _compact_inputs(tmp_path, log.append, policy)
    assert set(inputs.stage_boundary) == {"head", "finetune"}
    assert any("mixes the cached activations" in m for m in log)
    feed = inputs.feed("head", freezing.training_graph(model, stages[0][1]))
    entry = inputs.entries[(feed.boundary, "train")]
    epoch2 = [{k: v.numpy() for k, v in b.items()} for b in feed.train(2)]
    for batch in epoch2:
        assert batch.keys() == {FEATURES, LABEL, TARGET}
        lam = batch[TARGET].max(1).min()  # the larger share of every row; a row mixed with itself has 1
        assert batch[FEATURES].shape[1:] == entry.data.shape[1:] and 0.5 <= lam <= 1
    mixed = np.concatenate([b[FEATURES] for b in epoch2])
    assert not np.any(np.all(np.isclose(mixed[:, None], entry.data[None]), axis=-1).all(-1).any(-1))  # all mixed
    # a resumed run (new process: new StageInputs, same cache) gets epoch 2's batches exactly
    again, _, _ = _compact_inputs(tmp_path, log.append, policy)
    resumed = again.feed("head", freezing.training_graph(model, stages[0][1])).train(2)
    for a, b in zip(epoch2, resumed):
        np.testing.assert_array_equal(a[FEATURES], b[FEATURES].numpy())
        np.testing.assert_array_equal(a[TARGET], b[TARGET].numpy())
    assert not np.array_equal(mixed, np.concatenate([b[FEATURES].numpy() for b in feed.train(3)]))

    log.clear()
    pixels, _, _ = _compact_inputs(tmp_path, log.append, Policy(mixup=0.4, mixup_on="pixels", num_classes=CLASSES))
    assert not pixels.stage_boundary and any("cache: not used, --mixup 0.4 --mixup-on pixels" in m for m in log)
    with pytest.raises(UsageError, match="--mixup-on features: stage finetune trains on images"):
        _compact_inputs(tmp_path, log.append, Policy(mixup=0.4, mixup_on="features", num_classes=CLASSES),
                        freeze="none")


def test_finetune_with_mixup_trains_on_the_cache_and_records_the_options(data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "finetune", "--dataset", data, "--backbone", "compact_cnn", "--weights", "none", "--image-size", "32",
        "--head-epochs", "1", "--epochs", "1", "--val-split", "0.25", "--freeze-up-to", "block2",
        "--batch-size", "8", "--mixup", "0.4", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "mixes the cached activations of stage head, finetune" in result.output
    assert "cache: not used" not in result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["augment"], config["mixup"], config["cutmix"], config["random_erasing"],
            config["mixup_on"]) == ("none", 0.4, 0.0, 0.0, "auto")
