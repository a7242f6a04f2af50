"""TFDS datasets through load_dataset, with real tiny tfds builders prepared in tmp_path (no network)."""

from __future__ import annotations


import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfl.data import DataError, load_dataset

SHAPES = ["circle", "square", "triangle"]


class TflTestShapes(tfds.core.GeneratorBasedBuilder):
    """RGB 8x8, train + test, no validation split. Pixel [0, 0, 0] is the example's id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(names=SHAPES)}
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 60), "test": self._generate_examples(100, 12)}

    def _generate_examples(self, first, count):
        for i in range(first, first + count):
            image = np.full((8, 8, 3), 50, np.uint8)
            image[0, 0, 0] = i
            yield i, {"image": image, "label": i % 3}


class TflTestGreyVal(tfds.core.GeneratorBasedBuilder):
    """Grey 6x6 under custom keys, train + validation, no test split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"pic": tfds.features.Image(shape=(6, 6, 1)), "kind": tfds.features.ClassLabel(names=["x", "y"])}
            ),
            supervised_keys=("pic", "kind"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "validation": self._generate_examples(4)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"pic": np.full((6, 6, 1), 10 * i, np.uint8), "kind": i % 2}


def quiet(*_args):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfds")
    for builder_class in (TflTestShapes, TflTestGreyVal):
        builder_class(data_dir=str(folder)).download_and_prepare()
    return str(folder)


def ids(ds) -> list[int]:
    return [int(image[0, 0, 0]) for image, _ in ds.as_numpy_iterator()]


def test_prepared_dataset_loads_by_name_with_a_seeded_val_slice(data_dir):
    splits = load_dataset("tfl_test_shapes", data_dir=data_dir, val_split=0.25, seed=0, download=False, log=quiet)
    assert splits.class_names == SHAPES
    assert splits.num_examples == {"train": 45, "val": 15, "test": 12}
    assert splits.native_size == (8, 8)
    train, val = ids(splits.train), ids(splits.val)
    assert len(train) == 45 and len(val) == 15
    assert not set(train) & set(val) and sorted(train + val) == list(range(60))
    assert sorted(ids(splits.test)) == list(range(100, 112))
    image, label = next(splits.train.as_numpy_iterator())
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and label.dtype == np.int64
    assert label == int(image[0, 0, 0]) % 3

    again = load_dataset("tfl_test_shapes", data_dir=data_dir, val_split=0.25, seed=0, download=False, log=quiet)
    assert ids(again.val) == val and again.fingerprint == splits.fingerprint
    other = [load_dataset("tfl_test_shapes", data_dir=data_dir, val_split=0.25, seed=s, log=quiet) for s in (1, 2, 3)]
    assert any(set(ids(o.val)) != set(val) for o in other)
    assert all(o.fingerprint != splits.fingerprint for o in other if set(ids(o.val)) != set(val))


def test_validation_split_and_grey_images(data_dir):
    splits = load_dataset("tfl_test_grey_val", data_dir=data_dir, download=False, log=quiet)
    assert splits.num_examples == {"train": 10, "val": 4, "test": 0}
    assert splits.test is None and splits.class_names == ["x", "y"]
    images = [image for image, _ in splits.val.as_numpy_iterator()]
    assert all(image.shape == (6, 6, 3) for image in images)
    assert sorted(int(image[3, 3, 2]) for image in images) == [0, 10, 20, 30]


def test_unprepared_dataset_is_prepared_when_download_is_allowed(tmp_path):
    # The same code path that downloads cifar10, with a builder that needs no network.
    logged = []
    splits = load_dataset("tfl_test_grey_val", data_dir=str(tmp_path), download=True, log=logged.append)
    assert splits.num_examples["val"] == 4
    assert any("downloading and preparing" in line for line in logged)


def test_unprepared_dataset_without_download_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"'tfl_test_shapes' is not prepared[\s\S]*--data-dir"):
        load_dataset("tfl_test_shapes", data_dir=str(tmp_path), download=False, log=quiet)


def test_unknown_name_lists_the_choices():
    with pytest.raises(DataError) as error:
        load_dataset("cifar1", log=quiet)
    message = str(error.value)
    assert "unknown dataset 'cifar1'" in message and "cifar10" in message
    assert "mnist" in message and "fashion_mnist" in message and "ROOT/train/<class>" in message


def test_offline_cifar10_fails_fast_with_the_fix(tmp_path, monkeypatch):
    # Offline for sure, even on a machine with internet: the download host is reached through a closed port.
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", data_dir=str(tmp_path), download=True, log=quiet)
    message = str(error.value)
    assert "'cifar10'" in message and "--data-dir" in message and "tfds build cifar10" in message
