"""Image folders a careless or hostile user hands over: file and class names that are not plain text, images too
large to decode, new pixels under an old size and mtime, a file that changes while a job runs; and the run outputs
that must say what they are (metrics without a test split, what --val-split held out, a run that trains nothing)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tfl.data import DataError, load_dataset
from tfl.data import pixel_limit
from tfl.errors import UsageError

# compact_cnn from scratch at 32 px: a real finetune run in a few seconds.
TINY = dict(backbone="compact_cnn", weights="none", image_size=32, batch_size=8, tensorboard=False)


def quiet(*_args):
    pass


def _png(path, value, size=(4, 6)):
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[0, 0] = value
    Image.fromarray(pixels).save(path)


def _values(splits) -> dict[int, int]:
    """First-pixel value -> label, over train and val."""
    return {int(image[0, 0, 0]): int(label) for ds in (splits.train, splits.val) for image, label in
            ds.as_numpy_iterator()}


# -- file and class names --------------------------------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_trains_like_any_other(tmp_path):
    root = os.fsencode(tmp_path)
    for cls, base in ((b"cat", 10), (b"dog", 100)):
        os.makedirs(os.path.join(root, b"train", cls))
        for i in range(3):
            _png(os.path.join(root, b"train", cls, b"%d.png" % i), base + i)
    _png(os.path.join(root, b"train", b"cat", b"caf\xe9.png"), 50)  # Latin-1 "café": not UTF-8
    splits = load_dataset(str(tmp_path), log=quiet)
    assert _values(splits) == {10: 0, 11: 0, 12: 0, 50: 0, 100: 1, 101: 1, 102: 1}

    with open(os.path.join(root, b"train", b"dog", b"bad\xff.png"), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path), log=quiet)
    message = str(error.value)
    assert f"{tmp_path}/train/dog/bad\\xff.png  (" in message  # named, escaped, printable
    message.encode("utf-8")  # no stand-in characters that a terminal's encoder would choke on
    logged = []
    splits = load_dataset(str(tmp_path), skip_bad_images=True, log=logged.append)
    assert _values(splits) == {10: 0, 11: 0, 12: 0, 50: 0, 100: 1, 101: 1, 102: 1}
    assert any("bad\\xff.png" in line for line in logged)


@pytest.mark.parametrize("name, shown", [(b"new\nline", "new\\nline"), (b"tab\there", "tab\\there"),
                                         (b"caf\xe9", "caf\\xe9")])
def test_a_class_name_that_cannot_be_one_line_of_text_is_refused_before_training(tmp_path, name, shown):
    root = os.fsencode(tmp_path)
    for cls in (b"ok", name):
        os.makedirs(os.path.join(root, b"train", cls))
        for i in range(2):
            _png(os.path.join(root, b"train", cls, b"%d.png" % i), i)
    with pytest.raises(DataError, match="cannot be class names") as error:
        load_dataset(str(tmp_path), log=quiet)
    assert f"\n  {shown}\n" in str(error.value)


def test_val_split_says_what_it_held_out_per_class(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            _png(tmp_path / "train" / cls / f"{i}.png", i)
    logged = []
    splits = load_dataset(str(tmp_path), val_split=0.1, log=logged.append)
    assert splits.num_examples == {"train": 2, "val": 2, "test": 0}
    text = "\n".join(logged)
    assert "held out 2 of 4 train images (--val-split 0.1" in text
    assert "  cat: 1 of 2\n  dog: 1 of 2" in text


# -- the pixel limit -------------------------------------------------------------------------------------------------
FORMATS = {"a.png": dict(format="PNG"), "a.jpg": dict(format="JPEG"), "p.jpg": dict(format="JPEG", progressive=True),
           "a.gif": dict(format="GIF"), "a.bmp": dict(format="BMP"), "a.webp": dict(format="WEBP"),
           "l.webp": dict(format="WEBP", lossless=True), "a.tif": dict(format="TIFF")}


@pytest.mark.parametrize("name", FORMATS)
def test_the_header_gives_the_size_pillow_decodes(tmp_path, name):
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (37, 53, 3)).astype(np.uint8))
    image.save(tmp_path / name, **FORMATS[name])
    assert pixel_limit.header_size(str(tmp_path / name)) == (53, 37)
    if name.endswith(".webp"):  # with alpha: the extended (VP8X) layout
        image.convert("RGBA").save(tmp_path / "x.webp", format="WEBP", exact=True)
        assert pixel_limit.header_size(str(tmp_path / "x.webp")) == (53, 37)


def test_an_image_above_the_pixel_limit_is_refused_in_the_folder_check_and_predict(tmp_path, monkeypatch):
    from tfl.inference import check_image_files

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            _png(tmp_path / "train" / cls / f"{i}.png", i)
    big = tmp_path / "train" / "dog" / "big.png"
    _png(big, 7, size=(20, 30))  # 600 pixels
    monkeypatch.setenv("TFL_MAX_PIXELS", "500")
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path), log=quiet)
    assert f"{big}  (30x20 pixels (600 pixels) is above the limit of 500 pixels" in str(error.value)
    assert "raise $TFL_MAX_PIXELS" in str(error.value)
    splits = load_dataset(str(tmp_path), skip_bad_images=True, log=quiet)
    assert splits.num_examples["train"] + splits.num_examples["val"] == 4
    with pytest.raises(UsageError, match=r"big\.png: 30x20 pixels \(600 pixels\) is above the limit"):
        check_image_files([str(big)])

    monkeypatch.setenv("TFL_MAX_PIXELS", "600")
    assert load_dataset(str(tmp_path), log=quiet).num_examples["train"] == 3
    check_image_files([str(big)])
    monkeypatch.setenv("TFL_MAX_PIXELS", "lots")
    with pytest.raises(UsageError, match="TFL_MAX_PIXELS='lots': expected a positive whole number"):
        load_dataset(str(tmp_path), log=quiet)


def test_the_serving_signature_refuses_an_image_above_the_limit_before_decoding(tmp_path, monkeypatch):
    import keras
    import tensorflow as tf

    from tfl.serving.saved_model import BYTES_INPUT, SERVING_SIGNATURE, write_saved_model

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inputs)))
    monkeypatch.setenv("TFL_MAX_PIXELS", "1000")
    write_saved_model(model, "cat\ndog\n", str(tmp_path / "export"), 1)
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures[SERVING_SIGNATURE]

    def encoded(width, height, fmt):
        out = io.BytesIO()
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(out, fmt)
        return out.getvalue()

    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP"):
        assert serve(**{BYTES_INPUT: tf.constant([encoded(40, 25, fmt)])})["labels"].shape == (1, 1)  # 1000: fine
        with pytest.raises(tf.errors.InvalidArgumentError, match="an image of 41x25 pixels is above the limit of 1000"):
            serve(**{BYTES_INPUT: tf.constant([encoded(41, 25, fmt)])})
    # A PNG whose header claims 20000 x 20000 (1.6 GB decoded): refused by the header, never decoded.
    bomb = bytearray(encoded(8, 8, "PNG"))
    bomb[16:24] = (20000).to_bytes(4, "big") * 2
    with pytest.raises(tf.errors.InvalidArgumentError, match="20000x20000 pixels is above the limit"):
        serve(**{BYTES_INPUT: tf.constant([bytes(bomb)])})


# -- new pixels, same size and mtime ---------------------------------------------------------------------------------
def _bmp_folder(root, per_class=8, test=False):
    """cat: dark discs, dog: bright squares; 16x16 BMPs, so every file has the same size in bytes."""
    rng = np.random.RandomState(0)
    for split, n in (("train", per_class), *((("test", 4),) if test else ())):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.randint(0, 60, (16, 16, 3)).astype(np.uint8)
                img[4:12, 4:12] = 40 if c == 0 else 230
                Image.fromarray(img).save(root / split / cls / f"{i}.bmp")
    return root


def _swap_keeping_size_and_mtime(a, b):
    """What `cp -p` / `rsync -a` of a corrected set does: other pixels, the same sizes and modification times."""
    stats = {p: os.stat(p) for p in (a, b)}
    data = {p: p.read_bytes() for p in (a, b)}
    assert len(data[a]) == len(data[b])
    a.write_bytes(data[b])
    b.write_bytes(data[a])
    for p, st in stats.items():
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(p).st_size == st.st_size and os.stat(p).st_mtime_ns == st.st_mtime_ns


def test_new_pixels_with_the_same_size_and_mtime_change_the_fingerprint(tmp_path):
    root = _bmp_folder(tmp_path / "data")
    before = load_dataset(str(root), log=quiet)
    _swap_keeping_size_and_mtime(root / "train" / "cat" / "0.bmp", root / "train" / "dog" / "0.bmp")
    after = load_dataset(str(root), log=quiet)
    assert after.fingerprint != before.fingerprint
    changed = {s for s in after.split_fingerprints if after.split_fingerprints[s] != before.split_fingerprints[s]}
    assert changed and changed <= {"train", "val"}


class _Stop(Exception):
    pass


def _callback(on_epoch_end):
    from tfl.training import trainer

    class Hook(trainer.Callback):
        def on_epoch_end(self, result):
            on_epoch_end(result)

    return Hook()


def test_swapped_pixels_are_not_served_from_the_cache_nor_resumed(tmp_path, monkeypatch):
    """Cat and dog pixels swapped file for file, sizes and mtimes kept: the rerun computes the cache anew (it does
    not train on the old features), a resume is refused naming the data; and without a test folder metrics.json
    names its scores for the validation split they come from."""
    from tfl.recipes.finetune import FinetuneOptions, finetune
    from tfl.training import checkpoint, trainer

    root = _bmp_folder(tmp_path / "data")
    opts = dict(TINY, dataset=str(root), val_split=0.25, head_epochs=2, epochs=0, cache="on",
                cache_dir=str(tmp_path / "cache"))

    def stop(result):
        raise _Stop

    monkeypatch.setattr(trainer, "default_callbacks", lambda: [_callback(stop)])
    with pytest.raises(_Stop):  # a run stopped after its first epoch, its cache on disk
        finetune(FinetuneOptions(**opts, output_dir=str(tmp_path / "a")), log=quiet)
    monkeypatch.setattr(trainer, "default_callbacks", lambda: [])
    for i in range(8):
        _swap_keeping_size_and_mtime(root / "train" / "cat" / f"{i}.bmp", root / "train" / "dog" / f"{i}.bmp")

    with pytest.raises(checkpoint.ResumeError, match=r"cannot resume .*the (train|val) images changed since the run "
                                                     r"started \(their content"):
        finetune(FinetuneOptions(**opts, output_dir=str(tmp_path / "a"), resume=True), log=quiet)

    config = json.loads((tmp_path / "a" / "config.json").read_text())  # as a tfl that keyed by size and mtime wrote it
    config.pop("data_fingerprints")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "dataset_fingerprint": "0123456789abcdef"}))
    with pytest.raises(checkpoint.ResumeError, match="by file size and modification time .* cannot be told"):
        finetune(FinetuneOptions(**opts, output_dir=str(tmp_path / "a"), resume=True), log=quiet)

    logged = []
    metrics = finetune(FinetuneOptions(**opts, output_dir=str(tmp_path / "b")), log=logged.append)
    cache_lines = [line for line in logged if line.startswith("cache: pooled features")]
    assert len(cache_lines) == 2 and not any("reused from an earlier run" in line for line in cache_lines)
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["eval_split"] == "val" and "test_accuracy" not in saved and "test_loss" not in saved
    assert saved["val_loss"] > 0 and 0 <= saved["val_accuracy"] <= 1
    assert metrics["val_accuracy"] == saved["val_accuracy"]


# -- a file that changes under a running job -------------------------------------------------------------------------
def test_a_test_image_broken_during_training_is_named_and_resume_finishes_the_run(tmp_path, monkeypatch):
    from tfl.recipes.finetune import FinetuneOptions, finetune
    from tfl.training import trainer

    root = _bmp_folder(tmp_path / "data", test=True)
    victim = root / "test" / "dog" / "2.bmp"
    good = victim.read_bytes()
    opts = FinetuneOptions(**TINY, dataset=str(root), val_split=0.25, head_epochs=2, epochs=0,
                           cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"))

    def break_the_file(result):
        if result.epoch == 2:  # after the check before training, before the final evaluation
            victim.write_bytes(b"BM" + b"\x00" * 100)

    monkeypatch.setattr(trainer, "default_callbacks", lambda: [_callback(break_the_file)])
    with pytest.raises(DataError) as error:
        finetune(opts, log=quiet)
    message = str(error.value)
    assert f"\n  {victim}  (" in message and "the final evaluation stopped" in message
    assert "--resume" in message and "model.keras holds the trained model" in message
    run = tmp_path / "run"
    assert (run / "model.keras").is_file() and not (run / "metrics.json").exists()
    history = (run / "history.csv").read_text()
    assert len(history.splitlines()) == 3  # a header and both epochs

    monkeypatch.setattr(trainer, "default_callbacks", lambda: [])
    fixed = bytearray(good)
    fixed[-30:] = bytes(30)  # fixed, though not to the same bytes: a changed test file does not stop the resume
    victim.write_bytes(bytes(fixed))
    logged = []
    metrics = finetune(opts.__class__(**{**opts.__dict__, "resume": True}), log=logged.append)
    assert "resuming after epoch 2 (stage head)" in "\n".join(logged)
    assert any("the test images changed since this run started" in line for line in logged)
    assert metrics["eval_split"] == "test" and 0 <= metrics["test_accuracy"] <= 1
    assert (run / "history.csv").read_text() == history  # what training produced is kept, nothing retrained
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] == metrics["test_accuracy"]


def test_tfl_evaluate_names_a_test_image_broken_after_its_check(tmp_path, monkeypatch):
    """`tfl evaluate` checks the folder, then reads it again to evaluate: a file rewritten in between (a sync job) is
    named in one message, not TensorFlow's decode error naming no file; once fixed, the same command evaluates."""
    from tfl import inference
    from tfl.recipes.finetune import FinetuneOptions, finetune

    root = _bmp_folder(tmp_path / "data", test=True)
    victim = root / "test" / "cat" / "1.bmp"
    good = victim.read_bytes()
    finetune(FinetuneOptions(**TINY, dataset=str(root), val_split=0.25, head_epochs=1, epochs=0,
                             cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run")), log=quiet)
    checked = inference.load_run

    def check_then_break(*args, **kwargs):
        loaded = checked(*args, **kwargs)
        victim.write_bytes(b"BM" + b"\x00" * 100)
        return loaded

    monkeypatch.setattr(inference, "load_run", check_then_break)
    with pytest.raises(DataError) as error:
        inference.evaluate_run(str(tmp_path / "run"), batch_size=4, log=quiet)
    message = str(error.value)
    assert f"\n  {victim}  (" in message and "of the test split" in message and "run the same command" in message
    monkeypatch.setattr(inference, "load_run", checked)
    victim.write_bytes(good)
    result = inference.evaluate_run(str(tmp_path / "run"), batch_size=4, log=quiet)
    assert (result["split"], result["examples"]) == ("test", 8) and 0 <= result["accuracy"] <= 1


# -- a run that trains nothing ---------------------------------------------------------------------------------------
def test_finetune_with_no_epochs_at_all_is_refused(tmp_path):
    from click.testing import CliRunner

    from tfl.cli import cli

    result = CliRunner().invoke(cli, ["finetune", "--dataset", str(tmp_path / "nowhere"), "--head-epochs", "0",
                                      "--epochs", "0", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "--head-epochs 0 and --epochs 0: nothing would be trained" in result.output
    assert not (tmp_path / "run").exists()
