"""Any TensorFlow Datasets image-classification dataset, prepared under --data-dir or downloaded once."""

from __future__ import annotations

from typing import Callable

import numpy as np

from tfl.data.errors import DataError
from tfl.data.fingerprint import fingerprint
from tfl.data.network import unreachable
from tfl.data.splits import DatasetSplits
from tfl.data.stratify import check_val_split

VAL_SPLIT_NAMES = ("validation", "valid", "val")  # the first one a dataset has is used as val


class UnknownTfdsDataset(DataError):
    """tfds has no dataset of this name; the caller knows the other kinds of names and words the message."""

    def __init__(self, name: str, close_matches: list[str]):
        super().__init__(f"tfds has no dataset named {name!r}")
        self.name = name
        self.close_matches = close_matches


def load_tfds_dataset(
    name: str,
    data_dir: str | None = None,
    val_split: float = 0.1,
    seed: int = 0,
    download: bool = True,
    log: Callable = print,
) -> DatasetSplits:
    import tensorflow_datasets as tfds  # slow to import; only paid by runs that use tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise UnknownTfdsDataset(name, _close_matches(tfds, name)) from None
    except ValueError as error:  # e.g. an unknown config or version
        raise DataError(f"tfds cannot open {name!r}: {error}") from None

    if not builder.is_prepared():
        _prepare(builder, name, download, log)

    info = builder.info
    image_key, label_key = _feature_keys(name, info, tfds)
    split_specs, counts = _split_specs(name, info, val_split, seed)
    rgb = _to_rgb(name, info.features[image_key])

    def dataset(spec: str):
        import tensorflow as tf

        ds = builder.as_dataset(split=spec, shuffle_files=False)
        return ds.map(
            lambda ex: (rgb(ex[image_key]), tf.cast(ex[label_key], tf.int64)), num_parallel_calls=tf.data.AUTOTUNE
        )

    shape = info.features[image_key].shape
    return DatasetSplits(
        name=name,
        train=dataset(split_specs["train"]),
        val=dataset(split_specs["val"]),
        test=dataset(split_specs["test"]) if split_specs["test"] else None,
        class_names=list(info.features[label_key].names),
        num_examples=counts,
        native_size=(shape[0], shape[1]) if shape[0] and shape[1] else None,
        fingerprint=fingerprint("tfds", info.full_name, split_specs),
    )


def _prepare(builder, name: str, download: bool, log: Callable) -> None:
    where = builder.data_dir
    elsewhere = (
        f"prepare it on a machine with internet (`tfds build {name} --data_dir DIR`), copy DIR here "
        "and pass --data-dir DIR"
    )
    if not download:
        raise DataError(
            f"tfds dataset {name!r} is not prepared in {where} and download=False; pass --data-dir pointing at a "
            f"tfds data folder that holds {name}/, or allow downloading, or {elsewhere}"
        )
    try:
        urls = list(builder.url_infos or {})
    except Exception:  # noqa: BLE001 - tfds could not read its own URL list; download_and_prepare will say why
        urls = []
    dead = unreachable(urls)
    if dead:
        raise DataError(
            f"tfds dataset {name!r} is not prepared in {where}, and downloading it needs {', '.join(dead)}, which "
            f"cannot be reached (offline?). Pass --data-dir pointing at a tfds data folder that holds {name}/, "
            f"or {elsewhere}"
        )
    log(f"tfds dataset {name!r} is not prepared in {where}; downloading and preparing it ...")
    try:
        builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - network, disk and tfds failures all end the same way for the user
        raise DataError(
            f"could not download and prepare tfds dataset {name!r} into {where}: {type(error).__name__}: {error}. "
            f"Pass --data-dir pointing at a tfds data folder that holds {name}/, or {elsewhere}"
        ) from None


def _feature_keys(name: str, info, tfds) -> tuple[str, str]:
    keys = info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        keys = ("image", "label")
    image_key, label_key = keys
    features = info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        raise DataError(
            f"tfds dataset {name!r} has no image feature {image_key!r} (features: {', '.join(features.keys())}); "
            "tfl trains image classifiers, so pick a dataset with an Image feature and a ClassLabel"
        )
    if label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel):
        raise DataError(
            f"tfds dataset {name!r} has no class-label feature {label_key!r} (features: {', '.join(features.keys())}); "
            "tfl trains image classifiers, so pick a dataset with an Image feature and a ClassLabel"
        )
    return image_key, label_key


def _split_specs(name: str, info, val_split: float, seed: int) -> tuple[dict, dict]:
    splits = info.splits
    if "train" not in splits:
        raise DataError(f"tfds dataset {name!r} has no 'train' split (it has: {', '.join(splits.keys())})")
    test = "test" if "test" in splits else None
    val = next((s for s in VAL_SPLIT_NAMES if s in splits), None)
    if val:
        specs = {"train": "train", "val": val, "test": test}
        counts = {"train": splits["train"].num_examples, "val": splits[val].num_examples}
    else:
        check_val_split(val_split)
        n = splits["train"].num_examples
        if n < 2:
            raise DataError(f"tfds dataset {name!r} has {n} training example(s); at least 2 are needed to hold out val")
        n_val = min(n - 1, max(1, round(val_split * n)))
        # tfds shuffles examples when it prepares a dataset, so a contiguous block is a random sample;
        # the seed picks where the block starts, so different seeds give different validation sets.
        start = int(np.random.default_rng(seed).integers(0, n - n_val + 1))
        pieces = ((f"train[:{start}]", start), (f"train[{start + n_val}:]", n - start - n_val))
        rest = [piece for piece, size in pieces if size]
        specs = {"train": "+".join(rest), "val": f"train[{start}:{start + n_val}]", "test": test}
        counts = {"train": n - n_val, "val": n_val}
    counts["test"] = splits[test].num_examples if test else 0
    return specs, counts


def _to_rgb(name: str, image_feature) -> Callable:
    import tensorflow as tf

    channels = image_feature.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise DataError(f"tfds dataset {name!r} has {channels}-channel images; tfl needs 1 (grey), 3 (RGB) or 4 (RGBA)")
    to_uint8 = tf.as_dtype(image_feature.dtype) != tf.uint8

    def rgb(image):
        if to_uint8:  # 16-bit images: scale to 0..255 as for 16-bit PNGs in image folders
            image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
        if channels in (1, 2):  # grey, grey+alpha
            return tf.repeat(image[..., :1], 3, axis=-1)
        return image[..., :3]  # RGB, or RGBA with alpha dropped (the image-folder policy)

    return rgb


def _close_matches(tfds, name: str) -> list[str]:
    import difflib

    try:
        return difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
    except Exception:  # noqa: BLE001 - suggestions are a nicety; never mask the real error
        return []
