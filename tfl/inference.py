"""Evaluate a run on a dataset; predict labels for image files with a run's model, an ImageNet head or an export."""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from tfl import data
from tfl.data import pixel_limit
from tfl.data.image_check import file_problem
from tfl.data.pipeline import resize_uint8
from tfl.errors import UsageError
from tfl.serving.audit import check_saved_model
from tfl.serving.layout import resolve_saved_model
from tfl.serving.saved_model import BYTES_INPUT, SERVING_SIGNATURE
from tfl.models import build_imagenet_classifier
from tfl.options import SPLITS  # the choices of --split
from tfl.training import rundir
from tfl.training.trainer import TrainConfig, Trainer

IMAGENET_LABELS = os.path.join(os.path.dirname(__file__), "assets", "imagenet_labels.txt")
CENTER_CROP_FRACTION = 0.875  # the standard ImageNet evaluation crop: resize to S/0.875, crop S


def imagenet_labels() -> list[str]:
    with open(IMAGENET_LABELS, encoding="utf-8") as f:
        labels = [line.rstrip("\n") for line in f]
    if len(labels) != 1000:
        raise RuntimeError(f"{IMAGENET_LABELS} has {len(labels)} labels, expected 1000; reinstall tfl")
    return labels


@dataclasses.dataclass
class LoadedRun:
    """A finished run's model and classes, with the splits of the dataset to evaluate it on."""

    path: str
    config: dict
    classes: list[str]
    model: "keras.Model"
    dataset: str
    splits: "data.DatasetSplits"

    @property
    def image_size(self) -> int:
        return int(self.model.inputs[0].shape[1])

    def split(self, name: str | None = None) -> tuple[str, "tf.data.Dataset", int]:
        """(split name, unbatched source, example count); the default is test, or val when there is no test."""
        if name is None:
            name = "test" if self.splits.test is not None else "val"
        check_split(name)
        source = getattr(self.splits, name)
        if source is None:
            have = [s for s in SPLITS if getattr(self.splits, s) is not None]
            raise UsageError(f"split {name!r}: {self.dataset} has no {name} split; choose one of {', '.join(have)}")
        return name, source, self.splits.num_examples.get(name, 0)


def check_split(name) -> None:
    if name not in SPLITS:
        raise UsageError(f"split {name!r} is not a split; choose one of {', '.join(SPLITS)}")


def load_run(run_path: str, dataset: str | None = None, data_dir: str | None = None, log=print) -> LoadedRun:
    """The run's model and classes, and `dataset` (default: the run's own, split as the run split it)."""
    run = rundir.RunDir(run_path, create=False)
    config = run.read_json(rundir.CONFIG)
    classes = run.read_json(rundir.CLASSES)
    model = run.load_model()
    name = dataset or config["dataset"]
    own = not dataset
    # The run's own data_dir and bad-image skipping only apply to the run's own dataset.
    splits = data.load_dataset(name, data_dir=data_dir or (config.get("data_dir") if own else None),
                               val_split=config.get("val_split", 0.1), seed=config.get("seed", 0),
                               skip_bad_images=bool(config.get("skip_bad_images", False)) if own else False, log=log)
    if list(splits.class_names) != list(classes):
        missing = sorted(set(classes) - set(splits.class_names))
        extra = sorted(set(splits.class_names) - set(classes))
        raise UsageError(
            f"--dataset {name!r} has classes that differ from the run's ({len(classes)} classes): "
            f"missing {missing or 'none'}, extra {extra or 'none'}"
            + ("" if missing or extra else " (same names, different order)")
        )
    return LoadedRun(run_path, config, list(classes), model, name, splits)


def evaluate_run(run_path: str, dataset: str | None = None, data_dir: str | None = None,
                 batch_size: int = 64, log=print) -> dict:
    loaded = load_run(run_path, dataset, data_dir, log)
    split, source, examples = loaded.split()
    ds = data.make_pipeline(source, loaded.image_size, batch_size, training=False, seed=0)
    trainer = Trainer(tf.distribute.get_strategy(), loaded.model, len(loaded.classes), TrainConfig(), log)
    loss, acc = trainer.evaluate(ds, split, -(-examples // batch_size))
    return {"run": run_path, "dataset": loaded.dataset, "split": split, "examples": examples,
            "accuracy": round(acc, 6), "loss": round(loss, 6)}


def load_images(paths, size: int, center_crop: bool) -> np.ndarray:
    """Files -> float32 [N, size, size, 3] in 0..255 RGB; any mode Pillow reads becomes RGB."""
    batch = []
    for path in paths:
        image = tf.convert_to_tensor(data.read_image(path))
        if center_crop:
            h, w = int(image.shape[0]), int(image.shape[1])
            scale = size / CENTER_CROP_FRACTION / min(h, w)
            resized = tf.image.resize(image, (max(size, round(h * scale)), max(size, round(w * scale))), antialias=True)
            image = tf.image.resize_with_crop_or_pad(resized, size, size)
            image = tf.clip_by_value(image, 0.0, 255.0)
        else:  # exactly as training and evaluation stored the image (and as the SavedModel export decodes it)
            image = tf.cast(resize_uint8(image, size), tf.float32)
        batch.append(image)
    return tf.stack(batch).numpy()


def check_image_files(paths) -> None:
    """Refuse what cannot be an image before opening anything: the training set's rules (regular files only, the
    same extensions), so predict reads exactly the files training would."""
    for path in paths:
        problem = file_problem(str(path)) or pixel_limit.problem(str(path))  # the size from the header, undecoded
        if problem:
            raise UsageError(f"{path}: {problem}")


def predict(paths, run_path: str | None = None, backbone: str | None = None, weights: str | None = "default",
            top_k: int = 5) -> list[dict]:
    check_image_files(paths)
    if run_path:
        run = rundir.RunDir(run_path, create=False)
        labels = run.read_json(rundir.CLASSES)
        model = run.load_model()
        probabilities = lambda x: keras.ops.softmax(model(x, training=False))  # noqa: E731
        center_crop = False  # the run's model was trained on whole images resized to its input size
    else:
        labels = imagenet_labels()
        model = build_imagenet_classifier(backbone, weights)
        probabilities = lambda x: model(x, training=False)  # noqa: E731
        center_crop = True
    size = int(model.inputs[0].shape[1])
    images = load_images(paths, size, center_crop)
    probs = keras.ops.convert_to_numpy(probabilities(images))
    k = min(top_k, probs.shape[1])
    results = []
    for path, p in zip(paths, probs):
        top = np.argsort(-p, kind="stable")[:k]
        results.append({"image": str(path),
                        "top": [{"index": int(i), "label": labels[i], "prob": round(float(p[i]), 6)} for i in top]})
    return results


def predict_saved_model(paths, export_dir: str, top_k: int = 5, trust: bool = False) -> list[dict]:
    """Top-k for image files through an export's serving_default, fed the files' bytes as a server would be.

    `top_k` is capped by the k the export was made with. One request per file, so a file the export cannot
    decode is named. Unless `trust`, a SavedModel whose graph has side-effecting ops (files, processes, Python,
    network; tfl.serving.audit) is refused before TensorFlow loads it.
    """
    check_image_files(paths)  # before loading anything; a FIFO would block the open below
    export_dir = resolve_saved_model(export_dir)
    if not trust:
        check_saved_model(export_dir)
    serve = tf.saved_model.load(export_dir).signatures[SERVING_SIGNATURE]
    results = []
    for path in paths:
        with open(path, "rb") as f:
            payload = f.read()
        try:
            out = serve(**{BYTES_INPUT: tf.constant([payload])})
        except tf.errors.InvalidArgumentError as error:
            # The decoder's own sentence sits among graph-error lines ("Detected at node ...", node lists).
            noise = ("Graph execution error", "Detected at", "<stack", "\t", " ", "[")
            reason = next((line for line in error.message.splitlines() if line and not line.startswith(noise)),
                          error.message)
            raise UsageError(f"{path}: the export cannot decode it: {reason}") from None
        probs, classes, labels = (out[key].numpy()[0] for key in ("probabilities", "classes", "labels"))
        results.append({"image": str(path), "top": [
            {"index": int(i), "label": label.decode("utf-8"), "prob": round(float(probs[i]), 6)}
            for i, label in zip(classes[:top_k], labels[:top_k])]})
    return results
