"""Which source a dataset string goes to, and an end-to-end folder -> pipeline run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tfl.data import DataError, load_dataset, make_pipeline
from tfl.data.load import dataset_kind


def test_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert dataset_kind(str(tmp_path / "photos")) == "folder"
    assert dataset_kind("photos") == "folder"
    assert dataset_kind("mnist") == "idx" and dataset_kind("fashion_mnist") == "idx"
    assert dataset_kind("cifar10") == "tfds" and dataset_kind("imagenet2012_subset/1pct:5.*.*") == "tfds"


def test_a_folder_named_like_a_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    assert dataset_kind("mnist") == "idx"  # not an image-folder layout, so no rival
    (tmp_path / "mnist" / "train").mkdir()
    with pytest.raises(DataError, match=r"write \./mnist to use the folder"):
        dataset_kind("mnist")
    assert dataset_kind("./mnist") == "folder"


@pytest.mark.parametrize("value, expected", [("", "folder path or a dataset name"), (None, "folder path"),
                                             ("./no/such/dir", "does not exist"), ("Not A Name!", "unknown dataset")])
def test_strings_that_name_nothing(tmp_path, monkeypatch, value, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=expected):
        dataset_kind(value)


def test_a_file_is_not_a_dataset(tmp_path):
    (tmp_path / "pic.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file"):
        load_dataset(str(tmp_path / "pic.png"))


def test_folder_to_batches_end_to_end(tmp_path):
    colours = {"red": (230, 10, 10), "green": (10, 230, 10)}
    for split in ("train", "test"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(6):
                size = (30 + 7 * i, 20 + 3 * i)  # mixed sizes and formats, one needing the Pillow path
                image = Image.new("RGB", size, colour)
                if i == 5:
                    image.convert("P").save(tmp_path / split / name / f"{i}.bmp")
                elif i % 2:
                    image.save(tmp_path / split / name / f"{i}.jpg", quality=95)
                else:
                    image.convert("RGBA").save(tmp_path / split / name / f"{i}.png")
    splits = load_dataset(str(tmp_path), val_split=0.34, seed=0, log=lambda *_: None)
    assert splits.num_examples == {"train": 8, "val": 4, "test": 12}
    for ds, training in ((splits.train, True), (splits.test, False)):
        images, labels = [], []
        for batch in make_pipeline(ds, 16, 5, training=training, seed=0, augment=training):
            batch_images, batch_labels = batch["image"], batch["label"]
            images.append(batch_images.numpy())
            labels.append(batch_labels.numpy())
        images, labels = np.concatenate(images), np.concatenate(labels)
        assert images.shape[1:] == (16, 16, 3)
        for image, label in zip(images, labels):
            expected = colours[splits.class_names[label]]
            assert np.abs(image.mean(axis=(0, 1)) - expected).max() < 4
