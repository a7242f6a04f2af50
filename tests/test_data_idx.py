"""IDX files (MNIST format): exact round trips, corrupt files, the search order, and the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from tfl.data import DataError, load_dataset
from tfl.data.idx import read_idx
from tfl.data.idx_source import FASHION_MNIST_CLASSES, IDX_FILES
from tfl.data import idx_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"
_TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, _TYPE_CODES[big_endian.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + big_endian.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)


def write_mnist_like(folder, n_train=50, n_test=20, size=(5, 4), gz=True, seed=0):
    """The four files of an MNIST-style dataset with random pixels and balanced labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, *size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        images_name, labels_name = IDX_FILES[split]
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(folder, images_name + suffix), images, gz)
        write_idx(os.path.join(folder, labels_name + suffix), labels, gz)
        arrays[split] = (images, labels)
    return arrays


def quiet(*_args):
    pass


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4"])
def test_idx_round_trips_exactly(tmp_path, gz, dtype):
    info = np.iinfo(np.dtype(dtype))
    array = np.random.default_rng(0).integers(info.min, info.max, (3, 4, 5), endpoint=True).astype(dtype)
    write_idx(tmp_path / "a.idx", array, gz)
    read = read_idx(str(tmp_path / "a.idx"))
    assert read.shape == (3, 4, 5) and read.dtype.isnative
    np.testing.assert_array_equal(read, array)


@pytest.mark.parametrize(
    "mangle, expected",
    [
        (lambda d: b"\x01\x02" + d[2:], "is not an IDX file"),
        (lambda d: d[:2] + b"\x42" + d[3:], "is not an IDX file"),
        (lambda d: d[:6], "ends inside its IDX header"),
        (lambda d: d[:-7], "truncated or corrupt"),
        (lambda d: d + b"extra", "truncated or corrupt"),
        (lambda d: gzip.compress(d)[:-12], "damaged gzip"),
    ],
)
def test_corrupt_idx_files_raise_data_errors_naming_the_file(tmp_path, mangle, expected):
    write_idx(tmp_path / "good.idx", np.zeros((4, 3, 3), np.uint8))
    (tmp_path / "bad.idx").write_bytes(mangle((tmp_path / "good.idx").read_bytes()))
    with pytest.raises(DataError, match=expected) as error:
        read_idx(str(tmp_path / "bad.idx"))
    assert str(tmp_path / "bad.idx") in str(error.value)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_data_dir_subfolder(tmp_path, gz, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    arrays = write_mnist_like(tmp_path / "mnist", gz=gz)
    splits = load_dataset("mnist", data_dir=str(tmp_path), val_split=0.2, seed=3, log=quiet)
    assert splits.class_names == [str(i) for i in range(10)]
    assert splits.num_examples == {"train": 40, "val": 10, "test": 20}
    assert splits.native_size == (5, 4)
    val_labels = [int(label) for _, label in splits.val.as_numpy_iterator()]
    assert sorted(val_labels) == list(range(10))  # 5 per class, 20% -> one of each class
    test = list(splits.test.as_numpy_iterator())
    images, labels = arrays["test"]
    for (image, label), expected_image, expected_label in zip(test, images, labels):
        assert image.shape == (5, 4, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, np.repeat(expected_image[..., None], 3, axis=2))
        assert label == expected_label
    # train and val together are exactly the IDX train images
    seen = np.stack([img[..., 0] for img, _ in splits.train.concatenate(splits.val).as_numpy_iterator()])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, arrays["train"][0]))

    again = load_dataset("mnist", data_dir=str(tmp_path), val_split=0.2, seed=3, log=quiet)
    assert again.fingerprint == splits.fingerprint
    assert [int(l) for _, l in again.val.as_numpy_iterator()] == val_labels
    other = load_dataset("mnist", data_dir=str(tmp_path), val_split=0.2, seed=4, log=quiet)
    assert other.fingerprint != splits.fingerprint


def test_data_dir_comes_before_the_system_copy(tmp_path):
    write_mnist_like(tmp_path, n_train=30, n_test=10)
    splits = load_dataset("fashion_mnist", data_dir=str(tmp_path), log=quiet)
    assert splits.num_examples == {"train": 20, "val": 10, "test": 10}  # at least one val image per class
    assert splits.class_names == list(FASHION_MNIST_CLASSES)


def test_keras_npz_cache_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (30, 4, 4), dtype=np.uint8),
        "y_train": (np.arange(30) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (10, 4, 4), dtype=np.uint8),
        "y_test": np.arange(10, dtype=np.uint8),
    }
    os.makedirs(tmp_path / "keras" / "datasets")
    np.savez(tmp_path / "keras" / "datasets" / "mnist.npz", **arrays)
    splits = load_dataset("mnist", data_dir=str(tmp_path / "empty"), download=False, log=quiet)
    assert splits.num_examples == {"train": 20, "val": 10, "test": 10}
    first, _ = next(splits.test.as_numpy_iterator())
    np.testing.assert_array_equal(first[..., 1], arrays["x_test"][0])


def test_mismatched_label_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    write_mnist_like(tmp_path, gz=False)
    write_idx(tmp_path / IDX_FILES["test"][1], np.arange(7, dtype=np.uint8))
    with pytest.raises(DataError, match="should hold 20 labels") as error:
        load_dataset("mnist", data_dir=str(tmp_path), log=quiet)
    assert IDX_FILES["test"][1] in str(error.value)


def test_missing_files_list_the_searched_paths_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    # Only this test's cache: a real ~/.keras or /tmp/.keras on the machine must not satisfy the search.
    monkeypatch.setattr(idx_source, "_keras_cache_dirs", lambda: [str(tmp_path / "keras" / "datasets")])
    monkeypatch.setenv("HOME", str(tmp_path))  # a real ~/.keras cache must not satisfy the search
    with pytest.raises(DataError) as error:
        load_dataset("mnist", data_dir=str(tmp_path / "mine"), download=False, log=quiet)
    message = str(error.value)
    assert str(tmp_path / "mine") in message and str(tmp_path / "keras" / "datasets" / "mnist.npz") in message
    assert "download skipped" in message.lower() and "--data-dir" in message


def test_offline_download_failure_is_a_data_error(tmp_path):
    # A fresh process, because Keras fixes its cache folder at import: the attempt must not touch ~/.keras.
    code = (
        "from tfl.data import DataError, load_dataset\n"
        "try:\n"
        f"    load_dataset('mnist', data_dir={str(tmp_path / 'mine')!r}, download=True, log=lambda *a: None)\n"
        "except DataError as error:\n"
        "    print('DataError:', error)\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "KERAS_HOME": str(tmp_path / "keras")}
    # Offline for sure, even on a machine with internet: every download goes to a closed local port.
    env.update({k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    for key in ("NO_PROXY", "no_proxy"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "DataError:" in result.stdout, result.stderr[-2000:]
    assert "download failed" in result.stdout.lower() and "--data-dir" in result.stdout


def test_real_fashion_mnist_test_split():
    images = read_idx(os.path.join(DEBIAN_FASHION, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(DEBIAN_FASHION, "t10k-labels-idx1-ubyte.gz"))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert 60 < images.mean() < 80  # Fashion-MNIST's mean pixel is about 73


def test_real_fashion_mnist_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # a Keras cache must not shadow the system copy
    logged = []
    splits = load_dataset("fashion_mnist", download=False, log=logged.append)
    assert any(DEBIAN_FASHION in line for line in logged)
    assert splits.num_examples == {"train": 54000, "val": 6000, "test": 10000}
    assert splits.native_size == (28, 28) and splits.class_names[0] == "T-shirt/top" and len(splits.class_names) == 10
    (images, labels), = splits.test.batch(10000).as_numpy_iterator()
    assert images.shape == (10000, 28, 28, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
