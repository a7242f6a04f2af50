"""Image folders and predict inputs that are not plain image files: directory links, loops, FIFOs, odd types."""

from __future__ import annotations

import contextlib
import errno
import os
import threading

import numpy as np
import pytest
from PIL import Image

from tfl.data import DataError, load_dataset
from tfl.data.image_check import IMAGE_EXTENSIONS, BadImage, file_problem, inspect_image


def quiet(*_args):
    pass


def _png(path, value):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = value
    Image.fromarray(pixels).save(path)


def _folder(root, per_class=4):
    for cls, base in (("cat", 10), ("dog", 100)):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(per_class):
            _png(root / "train" / cls / f"{i}.png", base + i)


def _labels_by_id(splits) -> dict[int, int]:
    out = {}
    for ds in (splits.train, splits.val):
        for image, label in ds.as_numpy_iterator():
            out[int(image[0, 0, 0])] = int(label)
    return out


@contextlib.contextmanager
def _unblocker(path, after=20.0):
    """If code under test ever blocks opening the FIFO for reading, open it for writing after `after` seconds so
    the read sees EOF: the test then fails on its assertions instead of hanging the suite."""
    done = threading.Event()

    def run():
        if done.wait(after):
            return
        while not done.wait(0.2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody has it open for reading
            except OSError as error:
                if error.errno in (errno.ENXIO, errno.ENOENT):
                    continue
                return
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)


def test_directory_links_inside_class_folders_are_not_followed(tmp_path):
    _folder(tmp_path)
    up = tmp_path / "train" / "cat" / "up"
    loop = tmp_path / "train" / "dog" / "loop"
    os.symlink("..", up)  # would make every dog image a cat
    os.symlink(".", loop)  # would recurse 40 levels deep
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path), log=quiet)
    message = str(error.value)
    assert "2 file(s)" in message
    listed = sorted(line.split("  (")[0].strip() for line in message.splitlines() if line.startswith("  /"))
    assert listed == sorted([str(up), str(loop)])  # the links themselves, not a path 41 levels deep
    assert "symbolic link to the directory" in message and "not followed" in message

    logged = []
    splits = load_dataset(str(tmp_path), skip_bad_images=True, log=logged.append)
    assert splits.num_examples["train"] + splits.num_examples["val"] == 8  # not 8 + the other class again
    labels = _labels_by_id(splits)
    assert sorted(labels) == [10, 11, 12, 13, 100, 101, 102, 103]
    assert all(labels[i] == 0 for i in (10, 11, 12, 13)) and all(labels[i] == 1 for i in (100, 101, 102, 103))
    assert any("skipping 2" in line for line in logged)


def test_file_links_count_as_their_target_and_broken_ones_are_bad(tmp_path):
    _folder(tmp_path)
    pool = tmp_path / "pool"
    pool.mkdir()
    _png(pool / "extra.png", 50)
    os.symlink(pool / "extra.png", tmp_path / "train" / "cat" / "extra.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "train" / "cat" / "gone.png")
    with pytest.raises(DataError, match=r"1 file\(s\)[\s\S]*gone\.png  \(a broken symbolic link"):
        load_dataset(str(tmp_path), log=quiet)
    splits = load_dataset(str(tmp_path), skip_bad_images=True, log=quiet)
    assert _labels_by_id(splits)[50] == 0


def test_a_fifo_named_like_an_image_is_listed_without_being_opened(tmp_path):
    _folder(tmp_path)
    fifo = tmp_path / "train" / "cat" / "p.jpg"
    os.mkfifo(fifo)
    assert file_problem(str(fifo)).startswith("not a regular file (a FIFO)")
    with _unblocker(fifo):
        with pytest.raises(DataError) as error:
            load_dataset(str(tmp_path), log=quiet)
        assert f"{fifo}  (not a regular file (a FIFO)" in str(error.value)
        splits = load_dataset(str(tmp_path), skip_bad_images=True, log=quiet)
        with pytest.raises(BadImage, match="a FIFO"):
            inspect_image(str(fifo))
    assert splits.num_examples["train"] + splits.num_examples["val"] == 8


def test_predict_refuses_a_fifo_before_opening_it(tmp_path):
    from tfl.inference import check_image_files

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with _unblocker(fifo):
        with pytest.raises(ValueError, match=r"photo\.jpg: not a regular file \(a FIFO\)"):
            check_image_files([str(fifo)])


@pytest.mark.parametrize("suffix,fmt", [(".webp", "WEBP"), (".tif", "TIFF"), (".tiff", "TIFF")])
def test_webp_and_tiff_train_as_they_predict(tmp_path, suffix, fmt):
    from tfl.data import read_image

    _folder(tmp_path, per_class=2)
    odd = tmp_path / "train" / "cat" / f"odd{suffix}"
    Image.fromarray(np.full((4, 6, 3), 77, np.uint8)).save(odd, format=fmt, lossless=True)
    assert suffix in IMAGE_EXTENSIONS
    splits = load_dataset(str(tmp_path), log=quiet)  # refused as "not an image file type" before
    assert _labels_by_id(splits)[77] == 0
    assert np.array_equal(read_image(str(odd)), np.full((4, 6, 3), 77, np.uint8))


def test_predict_refuses_the_file_types_training_refuses(tmp_path):
    from tfl.data import read_image

    ppm = tmp_path / "photo.ppm"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(ppm)
    with pytest.raises(DataError, match="not an image file type; expected one of .jpg"):
        read_image(str(ppm))


def test_class_folder_links_may_not_overlap_other_classes(tmp_path):
    _folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _png(elsewhere / "0.png", 200)
    os.symlink(elsewhere, tmp_path / "train" / "emu")  # a class folder that is a link: fine
    splits = load_dataset(str(tmp_path), val_split=0.5, log=quiet)
    assert splits.class_names == ["cat", "dog", "emu"]
    os.symlink(".", tmp_path / "train" / "all")  # a "class" holding every other class's images
    with pytest.raises(DataError, match=r"must not share images[\s\S]*train/all -> .*overlaps its split folder"):
        load_dataset(str(tmp_path), log=quiet)
    os.remove(tmp_path / "train" / "all")
    os.symlink(tmp_path / "train" / "dog", tmp_path / "train" / "fox")
    with pytest.raises(DataError, match=r"train/dog -> .* overlaps class folder .*train/fox"):
        load_dataset(str(tmp_path), log=quiet)
