"""MNIST and Fashion-MNIST from local IDX files (or the Keras cache), downloading only as a last resort."""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
from typing import Callable

import numpy as np

from tfl.data.errors import DataError
from tfl.data.fingerprint import file_digest, fingerprint
from tfl.data.idx import read_idx
from tfl.data.splits import DatasetSplits
from tfl.data.stratify import stratified_split

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Base names of the four IDX files, per split: (images, labels). Each may also carry a .gz suffix.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DOWNLOAD_TIMEOUT_S = 60  # per socket operation; without it an offline download can wait on DNS for minutes


@dataclasses.dataclass(frozen=True)
class IdxDataset:
    name: str
    class_names: tuple[str, ...]
    folder_names: tuple[str, ...]  # sub-folders of --data-dir and of the Keras cache that may hold the files
    system_dirs: tuple[str, ...]  # where OS packages install them
    keras_module: str  # keras.datasets.<module>.load_data() downloads into the Keras cache
    keras_npz: str | None = None  # the single file that module caches instead of IDX files, if any
    apt_package: str | None = None


IDX_DATASETS = {
    d.name: d
    for d in (
        IdxDataset("mnist", tuple(str(i) for i in range(10)), ("mnist",), (), "mnist", keras_npz="mnist.npz"),
        IdxDataset(
            "fashion_mnist",
            FASHION_MNIST_CLASSES,
            ("fashion_mnist", "fashion-mnist"),
            ("/usr/share/datasets/fashion-mnist",),
            "fashion_mnist",
            apt_package="dataset-fashion-mnist",
        ),
    )
}


def load_idx_dataset(
    name: str,
    data_dir: str | None = None,
    val_split: float = 0.1,
    seed: int = 0,
    download: bool = True,
    log: Callable = print,
) -> DatasetSplits:
    spec = IDX_DATASETS[name]
    found, searched = find_files(spec, data_dir)
    if found is None:
        if not download:
            raise _not_found(spec, searched, "download skipped (download=False)", allow_download=True)
        download_error = _download(spec, log)
        found, searched = find_files(spec, data_dir)
        if found is None:
            note = f"download failed: {download_error}" if download_error else "download ended without the files"
            raise _not_found(spec, searched, note, allow_download=False)
    log(f"reading {name} from {found['where']}")
    arrays = {split: _read_split(found, split, spec) for split in IDX_FILES}

    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    train_idx, val_idx = stratified_split(train_labels, val_split, seed)
    return DatasetSplits(
        name=name,
        train=_dataset(train_images[train_idx], train_labels[train_idx]),
        val=_dataset(train_images[val_idx], train_labels[val_idx]),
        test=_dataset(test_images, test_labels),
        class_names=list(spec.class_names),
        num_examples={"train": len(train_idx), "val": len(val_idx), "test": len(test_labels)},
        native_size=(int(train_images.shape[1]), int(train_images.shape[2])),
        fingerprint=fingerprint(name, {"val_split": val_split, "seed": seed}, [_file_id(p) for p in found["paths"]]),
        train_labels=train_labels[train_idx],
    )


def find_files(spec: IdxDataset, data_dir: str | None) -> tuple[dict | None, list[str]]:
    """The first complete copy, as {"where", "paths", split: (images, labels) | "npz"}, and all places tried."""
    searched = []
    for folder in _candidate_dirs(spec, data_dir):
        searched.append(folder)
        paths = {split: tuple(_with_or_without_gz(folder, b) for b in bases) for split, bases in IDX_FILES.items()}
        if all(p is not None for pair in paths.values() for p in pair):
            return {"where": folder, "paths": [p for pair in paths.values() for p in pair], **paths}, searched
    if spec.keras_npz:
        for cache in _keras_cache_dirs():
            npz = os.path.join(cache, spec.keras_npz)
            searched.append(npz)
            if os.path.isfile(npz):
                return {"where": npz, "paths": [npz], "train": "npz", "test": "npz"}, searched
    return None, searched


def _candidate_dirs(spec: IdxDataset, data_dir: str | None) -> list[str]:
    dirs = []
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
        dirs += [data_dir] + [os.path.join(data_dir, n) for n in spec.folder_names]
    dirs += list(spec.system_dirs)
    dirs += [os.path.join(cache, n) for cache in _keras_cache_dirs() for n in spec.folder_names]
    return list(dict.fromkeys(dirs))  # de-duplicated, order kept


def _keras_cache_dirs() -> list[str]:
    # Where keras.utils.get_file caches: $KERAS_HOME, else ~/.keras, else /tmp/.keras when home is read-only.
    # Keras reads $KERAS_HOME once at import, so ~/.keras is searched even when the variable is set now.
    homes = [os.environ.get("KERAS_HOME", ""), os.path.join(os.path.expanduser("~"), ".keras"), "/tmp/.keras"]
    homes = [home for home in homes if home]
    return [os.path.join(home, "datasets") for home in dict.fromkeys(homes)]


def _with_or_without_gz(folder: str, base: str) -> str | None:
    for name in (base, base + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _read_split(found: dict, split: str, spec: IdxDataset) -> tuple[np.ndarray, np.ndarray]:
    if found[split] == "npz":
        images, labels = _read_npz(found["where"], split)
        images_from = labels_from = found["where"]
    else:
        images_from, labels_from = found[split]
        images, labels = read_idx(images_from), read_idx(labels_from)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_from} should hold uint8 images [N, H, W], found {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{labels_from} should hold {len(images)} labels (one per image in {images_from}), "
            f"found shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(spec.class_names)):
        raise DataError(
            f"{labels_from} has labels outside 0..{len(spec.class_names) - 1}: it is not {spec.name}'s label file"
        )
    return images, labels.astype(np.int64)


def _read_npz(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[f"x_{split}"], npz[f"y_{split}"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{path} is not a readable Keras {split} archive ({error}); delete it to re-download") from None


def _dataset(images: np.ndarray, labels: np.ndarray):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images[..., None], labels))
    # Grey -> RGB per element: storing 3 channels would triple the in-memory copy for no information.
    return ds.map(lambda image, label: (tf.image.grayscale_to_rgb(image), label), num_parallel_calls=tf.data.AUTOTUNE)


def _file_id(path: str) -> tuple[str, int, str]:
    """By content, all of it (a file corrected in place keeps its size): 0.05 s for Fashion-MNIST's .gz files."""
    return os.path.basename(path), os.path.getsize(path), file_digest(path)


def _download(spec: IdxDataset, log: Callable) -> str | None:
    """Ask keras.datasets to fetch the files into its cache; the reason it failed, or None."""
    log(f"{spec.name}: no local copy found, trying to download it with keras.datasets.{spec.keras_module} ...")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # urllib's urlretrieve (used by Keras) takes no timeout
    try:
        importlib.import_module(f"keras.datasets.{spec.keras_module}").load_data()
    except Exception as error:  # noqa: BLE001 - any failure is reported with the search list below
        return f"{type(error).__name__}: {error}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _not_found(spec: IdxDataset, searched: list[str], download_note: str, allow_download: bool) -> DataError:
    fixes = []
    if spec.apt_package:
        fixes.append(f"install it with `apt-get install {spec.apt_package}`")
    idx_names = ", ".join(f"{b}[.gz]" for bases in IDX_FILES.values() for b in bases)
    fixes.append(f"pass --data-dir DIR where DIR or DIR/{spec.folder_names[0]} holds {idx_names}")
    fixes.append("allow downloading" if allow_download else "run once with internet access to fill the Keras cache")
    searched_list = "\n".join(f"  {s}" for s in searched)
    return DataError(
        f"{spec.name} was not found. Searched:\n{searched_list}\n{download_note[0].upper()}{download_note[1:]}.\n"
        f"To fix: {'; or '.join(fixes)}."
    )
