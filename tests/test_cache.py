"""Boundary caching: the array cache's keys, budget and integrity checks; stage inputs; finetune with and without."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tfl.cli import cli
from tfl.cache import ArrayCache, parse_size


# -- ArrayCache --------------------------------------------------------------------------------------------------------
def _fill(values):
    def fill(data, labels):
        data[:] = values
        labels[:] = np.arange(len(values)) % 3
        return {"seconds": 1.5}

    return fill


VALUES = np.arange(24, dtype=np.float32).reshape(6, 2, 2)
KEY = {"kind": "features", "boundary": "block3", "data": {"dataset": "abc", "split": "train"}}


@pytest.mark.parametrize("text, expected", [("4G", 4 * 2**30), ("512M", 512 * 2**20), ("1.5g", 3 * 2**29),
                                            ("800K", 800 * 1024), ("0", 0), ("2GiB", 2 * 2**30), (123, 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage_naming_the_option():
    with pytest.raises(ValueError, match=r"--cache-budget '4 gigs'.*e\.g\. 4G"):
        parse_size("4 gigs")


@pytest.mark.parametrize("budget, in_memory", [(10**6, True), (0, False)])
def test_an_entry_persists_and_a_later_cache_reuses_it(tmp_path, budget, in_memory):
    entry = ArrayCache(str(tmp_path), budget, log=lambda *_: None).build(KEY, 6, (2, 2), np.float32, _fill(VALUES))
    assert entry.in_memory == in_memory and not entry.reused and entry.path
    np.testing.assert_array_equal(entry.data, VALUES)
    again = ArrayCache(str(tmp_path), budget, log=lambda *_: None).lookup(KEY)
    assert again.reused and again.info == {"seconds": 1.5} and again.in_memory == in_memory
    np.testing.assert_array_equal(again.data, VALUES)
    np.testing.assert_array_equal(again.labels, [0, 1, 2, 0, 1, 2])


def test_persist_false_keeps_an_entry_that_fits_off_the_disk(tmp_path):
    entry = ArrayCache(str(tmp_path), 10**6).build(KEY, 6, (2, 2), np.float32, _fill(VALUES), persist=False)
    assert entry.in_memory and entry.path is None and os.listdir(tmp_path) == []


def test_a_key_that_differs_in_anything_is_a_miss(tmp_path):
    ArrayCache(str(tmp_path), 10**6).build(KEY, 6, (2, 2), np.float32, _fill(VALUES))
    stale = {**KEY, "data": {"dataset": "abc", "split": "val"}}
    assert ArrayCache(str(tmp_path), 10**6).lookup(stale) is None


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "no manifest", "manifest of another key"])
def test_damaged_or_partial_entries_are_never_used_and_are_removed(tmp_path, damage):
    entry = ArrayCache(str(tmp_path), 10**6).build(KEY, 6, (2, 2), np.float32, _fill(VALUES))
    data_file, manifest = os.path.join(entry.path, "data.npy"), os.path.join(entry.path, "manifest.json")
    if damage == "flip a byte":
        with open(data_file, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            byte = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        os.truncate(data_file, os.path.getsize(data_file) - 8)
    elif damage == "no manifest":  # what a crash before the manifest was written leaves
        os.remove(manifest)
    else:
        with open(manifest) as f:
            text = f.read()
        with open(manifest, "w") as f:
            f.write(text.replace('"abc"', '"xyz"'))
    messages = []
    assert ArrayCache(str(tmp_path), 10**6, log=messages.append).lookup(KEY) is None
    assert "discarding" in messages[0] and not os.path.exists(entry.path)


def test_without_memory_or_disk_nothing_is_cached_and_the_reason_names_the_options():
    cache = ArrayCache(None, budget=100)
    assert cache.can_store(50) is None
    reason = cache.can_store(10**6)
    assert "--cache-budget" in reason and "--cache-dir" in reason
    with pytest.raises(ValueError, match="cannot cache features"):
        cache.build(KEY, 6, (2, 2), np.float32, _fill(VALUES))  # 96 + 24 bytes > 100


def test_trim_removes_the_least_recently_used_entries(tmp_path):
    cache = ArrayCache(str(tmp_path), 10**6)
    old = cache.build({"n": 1}, 6, (2, 2), np.float32, _fill(VALUES))
    new = cache.build({"n": 2}, 6, (2, 2), np.float32, _fill(VALUES))
    os.utime(os.path.join(old.path, "manifest.json"), (1, 1))
    cache.trim(limit=sum(e.stat().st_size for e in os.scandir(new.path)))  # room for one entry
    assert not os.path.exists(old.path) and os.path.exists(new.path)


# -- StageInputs -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    import keras

    from tfl import models

    keras.utils.set_random_seed(0)
    return models.build_classifier("efficientnet_lite0", 2, 32, "default")


def _inputs(model, cache_dir, log, dataset="d1", augment=False, mode="on"):
    from tfl import freezing
    from tfl.backbones import registry
    from tfl.data.pipeline import ImageStore
    from tfl.training.boundary import StageInputs, data_identity

    rng = np.random.default_rng(0)
    store = ImageStore(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), (np.arange(12) % 2).astype(np.int32), 32)
    inputs = StageInputs(model, "efficientnet_lite0", {}, {"train": 12, "val": 12},
                         {s: data_identity(dataset, s) for s in ("train", "val")}, 32, 4, 0, augment=augment,
                         mode=mode, cache_dir=str(cache_dir), log=log, stores={"train": store, "val": store})
    plan = freezing.make_plan(registry.get("efficientnet_lite0"), model, "block3")
    stages = [("head", freezing.head_only_plan(plan), 1), ("finetune", plan, 1)]
    inputs.plan(stages)
    return inputs, stages, store


def _feed_all(inputs, stages, model):
    from tfl import freezing

    return [inputs.feed(name, freezing.training_graph(model, plan)) for name, plan, _ in stages]


def test_stage_inputs_cache_the_right_boundaries_and_reuse_them_only_while_weights_and_data_match(lite0, tmp_path):
    from tfl.training.boundary import POOLED, frozen_forward

    log = []
    inputs, stages, store = _inputs(lite0, tmp_path, log.append)
    head, finetune = _feed_all(inputs, stages, lite0)
    assert (head.boundary, finetune.boundary) == (POOLED, "block3b_add")
    assert sum("computed in" in m for m in log) == 4  # block3b_add then pooled (derived), train and val
    # Pooled features derived from the block3 cache equal a straight forward pass through the whole backbone.
    direct = frozen_forward(lite0, POOLED)(store.batches(_order(12)).map(lambda b: b["image"]).get_single_element()).numpy()
    np.testing.assert_allclose(inputs.entries[(POOLED, "train")].data, direct, rtol=1e-4, atol=1e-5)
    # The cached models end in the classifier's own logits layer: same weights.
    assert head.model.get_layer("logits") is lite0.get_layer("logits") and head.eval_model is head.model

    def run(**kwargs):
        log.clear()
        _feed_all(*_inputs(lite0, tmp_path, log.append, **kwargs)[:2], lite0)
        described = [m[len("cache: "):].split(":")[0] for m in log if " activations of " in m or " features of " in m]
        return {what.replace(" of ", "/"): "reused" in m for what, m in zip(described, log)}

    assert all(run().values())  # same key: nothing recomputed
    assert not any(run(dataset="d2").values())  # other data: all recomputed
    top = lite0.get_layer("efficientnet_lite0").get_layer("top_conv")
    top.kernel.assign(top.kernel + 0.01)  # above block3: only the pooled features go stale
    assert run() == {"block3b_add activations/train": True, "block3b_add activations/val": True,
                     "pooled features/train": False, "pooled features/val": False}
    stem = lite0.get_layer("efficientnet_lite0").get_layer("stem_conv")
    stem.kernel.assign(stem.kernel * 1.01)  # below everything: all stale
    assert not any(run().values())


def _order(n):
    from tfl.data.pipeline import index_order

    return index_order(n, n, training=False, seed=0)


def test_augment_turns_auto_off_quietly_and_makes_on_refuse(lite0, tmp_path):
    log = []
    inputs, stages, _ = _inputs(lite0, tmp_path, log.append, augment=True, mode="auto")
    assert not inputs.stage_boundary and all(f.boundary is None for f in _feed_all(inputs, stages, lite0))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="--cache on cannot be used with --augment"):
        _inputs(lite0, tmp_path, log.append, augment=True, mode="on")


def test_off_trains_on_images(lite0, tmp_path):
    inputs, stages, _ = _inputs(lite0, tmp_path, lambda *_: None, mode="off")
    assert all(f.boundary is None and f.eval_model is None for f in _feed_all(inputs, stages, lite0))
    assert os.listdir(tmp_path) == []


# -- finetune, end to end ----------------------------------------------------------------------------------------------
def _shapes(root, per_split=(("train", 24), ("val", 8), ("test", 8))):
    rng = np.random.default_rng(0)
    for split, n in per_split:
        for c, name in enumerate(("circle", "square")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (40, 40, 3)).astype(np.float32)
                yy, xx = np.mgrid[:40, :40]
                if c == 0:
                    img[(yy - 20) ** 2 + (xx - 20) ** 2 < 13**2] = 230
                else:
                    img[10:30, 10:30] = [40, 200, 90]
                Image.fromarray(img.astype("uint8")).save(root / split / name / f"{i}.png")
    return root


def _history(run_dir):
    with open(run_dir / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}
                for row in csv.DictReader(f)]


def test_finetune_gives_the_same_losses_with_and_without_the_cache(tmp_path):
    from tfl.recipes.finetune import FinetuneOptions, finetune

    data = _shapes(tmp_path / "shapes")
    results, logs = {}, {}
    for mode in ("off", "on"):
        logs[mode] = []
        # backbone_lr stays small: a diverging run (loss ~6) would magnify the float-rounding differences between a
        # cached and a recomputed forward pass (same math, other op order) beyond any useful tolerance.
        options = FinetuneOptions(dataset=str(data), image_size=32, batch_size=8, head_epochs=2, epochs=1, lr=0.01,
                                  backbone_lr=0.001, freeze_up_to="block5", cache=mode, cache_dir=str(tmp_path / "cache"),
                                  output_dir=str(tmp_path / mode))
        results[mode] = finetune(options, log=logs[mode].append)
    off, on = _history(tmp_path / "off"), _history(tmp_path / "on")
    assert len(off) == len(on) == 3
    # The cache is extracted with BN folded into the convolutions (tfl.training.bn_folding): the same function, float
    # rounding apart. Head epochs agree to 1e-4; fine-tuning on 24 images at a high lr amplifies the rounding.
    for epoch, (a, b) in enumerate(zip(off, on)):
        tolerance = 1e-4 if epoch < 2 else 5e-3  # two head epochs, then one fine-tune epoch
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=tolerance, abs=1e-5), name
    assert off[0]["train_loss"] != pytest.approx(off[1]["train_loss"], rel=1e-2)  # it trained: the losses move
    assert results["on"]["test_accuracy"] == pytest.approx(results["off"]["test_accuracy"], abs=1e-6)
    assert not any(m.startswith("cache:") for m in logs["off"])
    cached = [m for m in logs["on"] if m.startswith("cache:")]
    assert any("block5c_add activations of train" in m for m in cached)
    assert any("pooled features of val" in m for m in cached)
    assert "saved about" in cached[-1]


def test_cache_on_with_augment_exits_2_before_the_run_directory_exists(tmp_path):
    data = _shapes(tmp_path / "shapes", (("train", 4), ("val", 2)))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--dataset", str(data), "--image-size", "32", "--batch-size", "4",
                                      "--weights", "none", "--augment", "--cache", "on", "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert "--cache on cannot be used with --augment" in result.output
    assert not out.exists()


def test_cache_budget_must_be_a_size():
    result = CliRunner().invoke(cli, ["finetune", "--cache-budget", "lots"])
    assert result.exit_code == 2 and "--cache-budget 'lots' is not a size" in result.output


def test_mixed_precision_computes_in_bfloat16_with_float32_logits_and_leaves_the_global_policy_alone():
    import keras

    from tfl import models

    model = models.build_classifier("mobilenet", 3, 32, "none", precision="bfloat16")
    assert keras.config.dtype_policy().name == "float32"
    assert model.get_layer("head_dropout").compute_dtype == "bfloat16"
    assert models.backbone_of(model).get_layer("conv1").compute_dtype == "bfloat16"
    logits = model(np.zeros((2, 32, 32, 3), np.float32))
    assert logits.dtype == "float32" and model.get_layer("logits").kernel.dtype == "float32"
