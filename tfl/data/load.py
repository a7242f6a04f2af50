"""load_dataset: one string names a dataset; a small table says which source reads it."""

from __future__ import annotations

import os
import re
from typing import Callable

from tfl.data.errors import DataError
from tfl.data.idx_source import IDX_DATASETS, load_idx_dataset
from tfl.data.image_folder import load_image_folder
from tfl.data.splits import DatasetSplits
from tfl.data.tfds_source import UnknownTfdsDataset, load_tfds_dataset  # tensorflow_datasets itself loads on use

# tfds names: snake_case, optional /config, optional :version ("cifar10", "imagenet2012_subset/1pct:5.*.*").
_TFDS_NAME = re.compile(r"[a-z0-9_]+(/[A-Za-z0-9_.+-]+)?(:[0-9.*]+)?")


def _load_folder(dataset, data_dir, val_split, seed, skip_bad_images, download, log):
    return load_image_folder(dataset, val_split=val_split, seed=seed, skip_bad_images=skip_bad_images, log=log)


def _load_idx(dataset, data_dir, val_split, seed, skip_bad_images, download, log):
    return load_idx_dataset(dataset, data_dir=data_dir, val_split=val_split, seed=seed, download=download, log=log)


def _load_tfds(dataset, data_dir, val_split, seed, skip_bad_images, download, log):
    try:
        return load_tfds_dataset(dataset, data_dir=data_dir, val_split=val_split, seed=seed, download=download, log=log)
    except UnknownTfdsDataset as error:
        raise DataError(_unknown_message(dataset, error.close_matches)) from None


# kind -> (does this kind claim the string?, loader). tfds is not in the claims: it takes what nobody claims.
SOURCES: dict[str, tuple[Callable[[str], bool], Callable]] = {
    "folder": (lambda s: os.path.isdir(os.path.expanduser(s)), _load_folder),
    "idx": (lambda s: s in IDX_DATASETS, _load_idx),
}


def load_dataset(
    dataset: str,
    data_dir: str | None = None,
    val_split: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
    download: bool = True,
    log: Callable = print,
) -> DatasetSplits:
    """Train/val/test splits of `dataset`: an image-folder path, "mnist"/"fashion_mnist", or a tfds name."""
    kind = dataset_kind(dataset)
    loader = SOURCES[kind][1] if kind in SOURCES else _load_tfds
    return loader(dataset, data_dir, val_split, seed, skip_bad_images, download, log)


def dataset_kind(dataset: str) -> str:
    """"folder", "idx" or "tfds"; raises DataError when the string cannot name any of them."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise DataError(f"dataset must be a folder path or a dataset name, got {dataset!r}")
    claims = [kind for kind, (claims_it, _) in SOURCES.items() if claims_it(dataset)]
    if claims == ["folder", "idx"]:
        # A folder in the working directory shares the name. Only an image-folder layout makes it a rival.
        if not os.path.isdir(os.path.join(dataset, "train")):
            return "idx"
        raise DataError(
            f"{dataset!r} is both the built-in {dataset} dataset and an image folder in {os.getcwd()}; "
            f"write ./{dataset} to use the folder, or run from another directory to use the built-in dataset"
        )
    if claims:
        return claims[0]
    if os.path.exists(os.path.expanduser(dataset)):
        raise DataError(
            f"dataset {dataset!r} is a file; pass a folder laid out as ROOT/train/<class>/*.jpg, or a dataset name"
        )
    if not _TFDS_NAME.fullmatch(dataset):
        if os.sep in dataset or dataset.startswith((".", "~")):
            raise DataError(
                f"dataset folder {os.path.abspath(os.path.expanduser(dataset))} does not exist; "
                "expected ROOT/train/<class>/*.jpg (optional ROOT/val, ROOT/test)"
            )
        raise DataError(_unknown_message(dataset, []))
    return "tfds"


def _unknown_message(dataset: str, close_matches: list[str]) -> str:
    suggestion = f" Did you mean {' or '.join(close_matches)}?" if close_matches else ""
    return (
        f"unknown dataset {dataset!r}: it is not an existing folder, not one of {', '.join(sorted(IDX_DATASETS))}, "
        f"and TensorFlow Datasets has no dataset of that name.{suggestion} Pass one of: a folder laid out as "
        f"ROOT/train/<class>/*.jpg (optional ROOT/val, ROOT/test); {' or '.join(sorted(IDX_DATASETS))}; "
        "or a tfds image-classification name such as cifar10 (see `tfds.list_builders()`)."
    )
