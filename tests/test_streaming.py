"""--decoded-images: train/val images kept decoded (ImageStore) or streamed from their files every epoch
(StreamedImages) give bit-identical batches and runs; streaming resumes exactly mid-epoch, writes nothing under
--cache-dir, and lets a folder bigger than the memory budget and the disk cap train."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import tfl
from tfl.cli import cli
from tfl.data.decode import image_files
from tfl.data.image_folder import load_image_folder
from tfl.data.pipeline import IMAGE, ImageStore, StreamedImages, index_order
from tfl.data.subset import take_rows
from tiny_runs import TINY, checkpoint_arrays, history, largest_change, run_here, start

# --cache off: the images (not cached boundary activations) feed every epoch of both stages.
STREAM_RUN = [*TINY, "--batch-size", "4", "--cache", "off"]


def _options(argv):
    """TINY-style argv -> keyword arguments of tfl.finetune."""
    pairs = dict(zip(argv[::2], argv[1::2]))
    return {k.lstrip("-").replace("-", "_"): v for k, v in pairs.items()}


def _finetune(data, out, **extra):
    lines = []
    kwargs = {**_options(STREAM_RUN), "dataset": data, "output_dir": str(out), **extra}
    for name in ("image_size", "head_epochs", "epochs", "batch_size"):
        kwargs[name] = int(kwargs[name])
    for name in ("val_split", "lr", "backbone_lr"):
        kwargs[name] = float(kwargs[name])
    tfl.finetune(log=lines.append, tensorboard=False, **kwargs)
    return lines


def _all_batches(ds):
    return [{k: v.numpy() for k, v in batch.items()} for batch in ds]


def test_streamed_batches_are_bit_identical_to_kept_ones(data):
    splits = load_image_folder(data, val_split=0.25, seed=0, log=lambda *_: None)
    rows = np.array([0, 2, 3, 5, 8, 9, 11, 13, 17, 20, 21, 23])
    source = take_rows(splits.train, splits.num_examples["train"], rows)  # a subset keeps its files too
    assert image_files(source).paths.tolist() == image_files(splits.train).paths[rows].tolist()
    size = 45  # not 32: every image is resized, and a batch's order is a seeded permutation
    kept = ImageStore.from_dataset(source, size)
    streamed = StreamedImages(image_files(source), size)
    assert streamed.count == kept.count == len(rows) and np.array_equal(streamed.labels, kept.labels)
    teacher = np.random.default_rng(0).normal(size=(len(rows), 3)).astype(np.float32)  # a recipe's extra column
    for epoch in (1, 2):
        def order():  # a new one for each pipeline, as StageInputs makes one an epoch (each iteration reshuffles)
            return index_order(len(rows), 5, training=True, seed=epoch)

        a = _all_batches(kept.batches(order(), augment=True, seed=epoch, extra={"teacher": teacher}))
        b = _all_batches(streamed.batches(order(), augment=True, seed=epoch, extra={"teacher": teacher}))
        assert [x.keys() for x in a] == [x.keys() for x in b] and len(a) == 3
        for x, y in zip(a, b):
            assert all(np.array_equal(x[k], y[k]) for k in x)
            assert np.array_equal(x["teacher"], teacher[_rows_of(x, teacher)])
    assert not np.array_equal(a[0][IMAGE], _all_batches(kept.batches(order(), augment=False))[0][IMAGE])  # augmented
    assert np.array_equal(streamed.images[[4, 1]], kept.images[[4, 1]])  # rows decoded on demand (self-train)


def _rows_of(batch, teacher):
    return [int(np.flatnonzero((teacher == t).all(axis=1))[0]) for t in batch["teacher"]]


def test_streamed_and_kept_runs_are_identical_and_streaming_writes_no_cache(data, tmp_path):
    kept_cache, streamed_cache = tmp_path / "cache-keep", tmp_path / "cache-stream"
    kept_log = _finetune(data, tmp_path / "keep", decoded_images="keep", cache_dir=str(kept_cache), augment=True)
    streamed_log = _finetune(data, tmp_path / "stream", decoded_images="stream", cache_dir=str(streamed_cache),
                             augment=True)
    assert history(tmp_path / "keep") == history(tmp_path / "stream") and len(history(tmp_path / "stream")) == 3
    a, b = checkpoint_arrays(tmp_path / "keep", 3), checkpoint_arrays(tmp_path / "stream", 3)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert largest_change(a, checkpoint_arrays(tmp_path / "keep", 2)) > 1e-4  # training moved the weights
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("keep", "stream")]
    assert metrics[0]["test_loss"] == metrics[1]["test_loss"]

    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert config["decoded_images"] == "stream"
    assert config["decoded_images_chosen"]["train"] == {"mode": "stream", "why": "--decoded-images stream"}
    assert any(line.startswith("images: train: 24 files streamed") for line in streamed_log)
    assert any(line.startswith("images: train: 24 decoded once") for line in kept_log)
    assert not [p for p in streamed_cache.rglob("*")]  # nothing under --cache-dir


def test_auto_streams_beyond_the_budget_and_a_cache_over_the_disk_cap_is_refused(data, tmp_path):
    """A folder whose decoded images (24 x 32x32x3 = 72 KB) exceed both --cache-budget and --cache-disk-limit
    trains: its images stream, and the boundary caches are refused with a message (the frozen layers run each
    epoch)."""
    cache_dir = tmp_path / "cache"
    log = _finetune(data, tmp_path / "run", cache="auto", cache_budget="1K", cache_disk_limit="1K",
                    cache_dir=str(cache_dir))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    chosen = config["decoded_images_chosen"]
    assert chosen["train"]["mode"] == chosen["val"]["mode"] == "stream"
    assert chosen["train"]["why"].startswith("auto: the decoded train and val images (96.00 KB) do not fit")
    refused = [line for line in log if line.startswith("cache: stage")]
    assert len(refused) == 2 and all("recomputes the backbone every epoch" in line for line in refused)
    assert all("--cache-disk-limit 1.00 KB" in line and "raise --cache-budget or --cache-disk-limit" in line
               for line in refused)
    assert len(history(tmp_path / "run")) == 3
    assert not [p for p in cache_dir.rglob("*")]

    # the same with a roomy budget keeps them in memory, saying why
    log = _finetune(data, tmp_path / "roomy", cache="off", cache_dir=str(cache_dir))
    chosen = json.loads((tmp_path / "roomy" / "config.json").read_text())["decoded_images_chosen"]
    assert chosen["train"]["mode"] == "keep" and " fit the memory budget" in chosen["train"]["why"]

    # --cache on cannot fall back, and keep cannot hold them: both refused, saying what to do
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, *STREAM_RUN[:-2], "--cache", "on",
                                      "--cache-budget", "1K", "--cache-disk-limit", "1K", "--cache-dir", str(cache_dir),
                                      "--output-dir", str(tmp_path / "on")])
    assert result.exit_code == 2 and "--cache-disk-limit" in result.output, result.output
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, *STREAM_RUN, "--decoded-images", "keep",
                                      "--cache-budget", "1K", "--cache-disk-limit", "1K", "--cache-dir", str(cache_dir),
                                      "--output-dir", str(tmp_path / "keep")])
    assert result.exit_code == 2, result.output
    assert "images cannot be held" in result.output
    assert "--decoded-images stream" in result.output


def test_streamed_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(data, tmp_path, monkeypatch):
    out, reference = tmp_path / "run", tmp_path / "reference"
    cache = {"TFL_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--dataset", data, *STREAM_RUN, "--decoded-images", "stream", "--augment"]
    uninterrupted = run_here([*args, "--output-dir", reference], cache)
    killed = start([*args, "--output-dir", out], {**cache, "TFL_FAULT": "kill-at-step:2:3"})  # in epoch 2, step 3
    assert killed.returncode == -9, killed.why()
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-0001.npz"

    monkeypatch.setenv("TFL_CACHE_DIR", cache["TFL_CACHE_DIR"])
    resumed = CliRunner().invoke(cli, ["finetune", *map(str, args), "--output-dir", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 1 (stage head)" in resumed.output
    assert "images: train: 24 files streamed" in resumed.output
    assert uninterrupted.returncode == 0, uninterrupted.why()
    assert len(history(out)) == 3 and history(out) == history(reference)
    final, expected = checkpoint_arrays(out, 3), checkpoint_arrays(reference, 3)
    assert final.keys() == expected.keys() and all(np.array_equal(final[k], expected[k]) for k in final)


@pytest.mark.parametrize("value", ["lots", "-1G"])
def test_a_bad_disk_limit_is_a_usage_error(value, data, tmp_path):
    result = CliRunner().invoke(cli, ["finetune", "--dataset", data, "--cache-disk-limit", value,
                                      "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and f"--cache-disk-limit {value!r} is not a size" in result.output, result.output


def test_the_cache_directory_cap_refuses_bigger_entries_and_trims_to_it(tmp_path):
    from tfl.cache import ArrayCache, parse_disk_limit

    assert parse_disk_limit(None) == 20 * 2**30 and parse_disk_limit("1.5K") == 1536
    cache = ArrayCache(str(tmp_path), budget=0, log=lambda *_: None, disk_limit=300)
    assert cache.can_store(200) is None
    why = cache.can_store(400)
    assert "is over the cache directory's cap (--cache-disk-limit 300 B)" in why and "raise --cache-budget" in why

    def fill(data, labels):
        data[:], labels[:] = 1.0, 0
        return {}

    first = cache.build({"n": 1}, 6, (2, 2), np.float32, fill)  # 120 bytes of arrays, ~700 on disk with headers
    second = cache.build({"n": 2}, 6, (2, 2), np.float32, fill)
    assert not os.path.exists(first.path) and os.path.exists(second.path)  # trimmed to the cap, newest kept


def test_files_that_need_pillow_stream_the_same_pixels(tmp_path):
    """WebP and TIFF go through Pillow (tf.numpy_function) inside the streamed batch, PNG through TensorFlow; the
    images are of several sizes, so each is resized on its own."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        os.makedirs(tmp_path / "train" / name)
        for i, (ext, size) in enumerate([(".png", 30), (".webp", 41), (".tif", 27), (".png", 50)]):
            pixels = rng.integers(0, 255, (size, size + c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / name / f"{i}{ext}", **({"lossless": True}
                                                                                      if ext == ".webp" else {}))
    splits = load_image_folder(str(tmp_path), val_split=0.25, seed=0, log=lambda *_: None)
    files = image_files(splits.train)
    assert files.needs_pillow.any() and not files.needs_pillow.all()
    kept, streamed = ImageStore.from_dataset(splits.train, 36), StreamedImages(files, 36)
    a = _all_batches(kept.batches(index_order(kept.count, 4, training=True, seed=3)))
    b = _all_batches(streamed.batches(index_order(kept.count, 4, training=True, seed=3)))
    assert len(a) == 2 and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
