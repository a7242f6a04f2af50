"""Evaluate a run on a dataset; predict labels for image files with a run's model, an ImageNet head or an export."""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from tfl import calibration, data
from tfl.calibration import abstain_record, calibrate_logits, describe, parse_abstain, tta_decision
from tfl.data import pixel_limit
from tfl.data.image_check import file_problem
from tfl.data.image_folder import changed_files_error
from tfl.data.pipeline import resize_uint8
from tfl.errors import UsageError, check_batch_size
from tfl.serving.audit import check_saved_model
from tfl.serving.layout import resolve_saved_model
from tfl.serving.saved_model import BYTES_INPUT, SERVING_SIGNATURE
from tfl.models import build_imagenet_classifier
from tfl.options import SPLITS  # the choices of --split
from tfl.training import rundir
from tfl.training.trainer import CrossEntropy, TrainConfig, Trainer, accuracy
from tfl.tta import WithTTA, check_mode, tta_logits, view_logits

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
    temperature: float = 1.0  # calibration.json's T (tfl.calibration); the run's probabilities: softmax(logits / T)
    tta: str | None = None  # calibration.json's kept TTA mode (tfl.tta); the run's logits are then tta_logits'

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
    model, classes = run.load()
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
    return LoadedRun(run_path, config, list(classes), model, name, splits, run.temperature(), run.tta())


def evaluate_run(run_path: str, dataset: str | None = None, data_dir: str | None = None,
                 batch_size: int = 64, log=print) -> dict:
    loaded = load_run(run_path, dataset, data_dir, log)
    split, source, examples = loaded.split()
    ds = data.make_pipeline(source, loaded.image_size, batch_size, training=False, seed=0)
    trainer = Trainer(tf.distribute.get_strategy(), loaded.model, len(loaded.classes), TrainConfig(), log)
    t = loaded.temperature
    cross_entropy = CrossEntropy(len(loaded.classes))
    loss = cross_entropy if t == 1.0 else lambda batch, logits: cross_entropy(batch, logits / t)  # the calibrated NLL
    model = WithTTA(loaded.model, loaded.tta) if loaded.tta else None  # None: the trainer's, loaded.model
    try:
        scores = trainer.evaluate_all(ds, split, -(-examples // batch_size), model=model, loss=loss,
                                      metrics=accuracy)
    except tf.errors.OpError as error:  # TensorFlow names no file: say which ones changed since the check above
        changed = changed_files_error((loaded.splits.files or {}).get(split, []),
                                      f"of the {split} split changed after the check at the start", "the evaluation",
                                      "Fix or restore the file(s) and run the same command again.")
        if changed is None:
            raise
        raise changed from error
    result = {"run": run_path, "dataset": loaded.dataset, "split": split, "examples": examples,
              "accuracy": round(scores["accuracy"], 6), "loss": round(scores["loss"], 6),
              **({"temperature": t} if rundir.RunDir(run_path, create=False).calibrated() else {}),
              **({"tta": loaded.tta} if loaded.tta else {})}
    threshold = rundir.RunDir(run_path, create=False).threshold()
    if threshold is not None:  # a second pass, for the logits: coverage and selective accuracy at the threshold
        labels, logits = logits_of(loaded.model, ds, tta=loaded.tta)
        probs = calibration.softmax(logits, t)
        result["abstain"] = {"threshold": threshold, **calibration.selective(
            probs.max(axis=1), probs.argmax(axis=1) == labels, threshold)}
    return result


def logits_of(model, pipeline, each=None, tta: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64, logits [N, C] float32) of `model` over an evaluation pipeline's batches, in order; with a
    `tta` mode, the mean of the views' logits (tfl.tta). each(images, labels, logits), if given, sees every batch
    as it goes (tfl report keeps its mistakes' images)."""
    forward = tf.function(lambda images: tta_logits(model, images, tta), reduce_retracing=True)
    all_labels, all_logits = [], []
    for batch in pipeline:
        # tfl.data.pipeline's batches are becoming dicts; (images, labels) tuples are the older form.
        images, labels = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        logits = tf.cast(forward(images), tf.float32).numpy()
        labels = labels.numpy().astype(np.int64)
        all_labels.append(labels)
        all_logits.append(logits)
        if each is not None:
            each(images, labels, logits)
    if not all_labels:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(all_labels), np.concatenate(all_logits)


def load_image(path, size: int, center_crop: bool) -> tf.Tensor:
    """A file -> float32 [size, size, 3] in 0..255 RGB; any mode Pillow reads becomes RGB."""
    image = tf.convert_to_tensor(data.read_image(path))
    if center_crop:
        h, w = int(image.shape[0]), int(image.shape[1])
        scale = size / CENTER_CROP_FRACTION / min(h, w)
        resized = tf.image.resize(image, (max(size, round(h * scale)), max(size, round(w * scale))), antialias=True)
        image = tf.image.resize_with_crop_or_pad(resized, size, size)
        return tf.clip_by_value(image, 0.0, 255.0)
    # exactly as training and evaluation stored the image (and as the SavedModel export decodes it)
    return tf.cast(resize_uint8(image, size), tf.float32)


def load_images(paths, size: int, center_crop: bool) -> np.ndarray:
    """Files -> float32 [N, size, size, 3] in 0..255 RGB; any mode Pillow reads becomes RGB."""
    return tf.stack([load_image(path, size, center_crop) for path in paths]).numpy()


def check_image_files(paths) -> None:
    """Refuse what cannot be an image before opening anything: the training set's rules (regular files only, the
    same extensions), so predict reads exactly the files training would."""
    for path in paths:
        problem = file_problem(str(path)) or pixel_limit.problem(str(path))  # the size from the header, undecoded
        if problem:
            raise UsageError(f"{path}: {problem}")


def _file_problems(paths) -> dict[int, str]:
    """{index: why} for the files that cannot be images by check_image_files' rules, found before opening any."""
    problems = {}
    for i, path in enumerate(paths):
        try:
            check_image_files([path])
        except UsageError as error:
            problems[i] = _reason(error, path)
    return problems


def _reason(error: Exception, path) -> str:
    """A per-file error's message without the file name it starts with (as is, or with non-UTF-8 bytes escaped)."""
    message = str(error)
    for name in (str(path), os.fsencode(path).decode("utf-8", "backslashreplace")):
        if message.startswith(f"{name}: "):
            return message[len(name) + 2:]
    return message


def _in_order(paths, results: dict[int, dict], failed: dict[int, str]) -> list[dict]:
    return [results[i] if i in results else {"image": str(path), "error": failed[i]} for i, path in enumerate(paths)]


def predict(paths, run_path: str | None = None, backbone: str | None = None, weights: str | None = "default",
            top_k: int = 5) -> list[dict]:
    """One entry per file, in order: {"image", "top"}, or {"image", "error"} for a file that cannot be read as an
    image (one bad file in a list costs only its own result)."""
    paths = list(paths)
    failed = _file_problems(paths)
    if len(failed) == len(paths):
        return _in_order(paths, {}, failed)  # nothing to load a model for
    if run_path:
        run = rundir.RunDir(run_path, create=False)
        model, labels = run.load()
        t = run.temperature()  # calibration.json's T, 1 without one
        threshold = run.threshold()  # tfl calibrate --abstain's; None without one
        tta = run.tta()  # tfl calibrate --tta's mode when val kept it; None without
        probabilities = lambda x: keras.ops.softmax(tta_logits(model, x, tta) / t)  # noqa: E731
        center_crop = False  # the run's model was trained on whole images resized to its input size
    else:
        labels = imagenet_labels()
        threshold = None
        model = build_imagenet_classifier(backbone, weights)
        probabilities = lambda x: model(x, training=False)  # noqa: E731
        center_crop = True
    size = int(model.inputs[0].shape[1])
    images = {}
    for i, path in enumerate(paths):
        if i in failed:
            continue
        try:
            images[i] = load_image(path, size, center_crop)
        except UsageError as error:  # data.DataError: "<path>: not a readable image (why)"
            failed[i] = _reason(error, path)
        except tf.errors.OpError as error:  # what Pillow read and TensorFlow's decoder did not
            failed[i] = f"not a readable image ({error.message.splitlines()[0]})"
    results = {}
    if images:
        probs = keras.ops.convert_to_numpy(probabilities(tf.stack(list(images.values())).numpy()))
        k = min(top_k, probs.shape[1])
        for i, p in zip(images, probs):
            top = np.argsort(-p, kind="stable")[:k]
            results[i] = {"image": str(paths[i]), "top": [{"index": int(j), "label": labels[j],
                                                           "prob": round(float(p[j]), 6)} for j in top]}
            if threshold is not None:  # compared in float32, as the exports' graphs compare it
                results[i]["confident"] = bool(np.float32(p.max()) >= np.float32(threshold))
    return _in_order(paths, results, failed)


def predict_saved_model(paths, export_dir: str, top_k: int = 5, trust: bool = False) -> list[dict]:
    """Top-k for image files through an export's serving_default, fed the files' bytes as a server would be.

    `top_k` is capped by the k the export was made with. One request per file, so a file the export cannot
    decode is named: its entry is {"image", "error"}, and the other files are still predicted. Unless `trust`, a
    SavedModel whose graph has side-effecting ops (files, processes, Python, network; tfl.serving.audit) is
    refused before TensorFlow loads it; one missing its weights (variables/, a data shard) is refused by name.
    """
    from tfl.checkpoints.tf_checkpoint import saved_model_problem

    paths = list(paths)
    failed = _file_problems(paths)  # before loading anything; a FIFO would block the open below
    export_dir = resolve_saved_model(export_dir)
    problem = saved_model_problem(export_dir)
    if problem:
        raise UsageError(f"--saved-model {export_dir}: {problem}; copy the whole version directory again, or "
                         "export it again with `tfl export`")
    if not trust:
        check_saved_model(export_dir)
    if len(failed) == len(paths):
        return _in_order(paths, {}, failed)
    try:
        serve = tf.saved_model.load(export_dir).signatures[SERVING_SIGNATURE]
    except tf.errors.OpError as error:  # what the check above cannot see (a damaged shard); first line, no advice
        raise UsageError(f"--saved-model {export_dir}: TensorFlow cannot load it: "
                         f"{error.message.strip().splitlines()[0]}") from None
    results = {}
    for i, path in enumerate(paths):
        if i in failed:
            continue
        try:
            with open(path, "rb") as f:
                payload = f.read()
        except OSError as error:
            failed[i] = f"cannot be read ({error.strerror or error})"
            continue
        try:
            out = serve(**{BYTES_INPUT: tf.constant([payload])})
        except tf.errors.InvalidArgumentError as error:
            # The decoder's own sentence sits among graph-error lines ("Detected at node ...", node lists).
            noise = ("Graph execution error", "Detected at", "<stack", "\t", " ", "[")
            reason = next((line for line in error.message.splitlines() if line and not line.startswith(noise)),
                          error.message)
            failed[i] = f"the export cannot decode it: {reason}"
            continue
        probs, classes, labels = (out[key].numpy()[0] for key in ("probabilities", "classes", "labels"))
        results[i] = {"image": str(path), "top": [
            {"index": int(j), "label": label.decode("utf-8"), "prob": round(float(probs[j]), 6)}
            for j, label in zip(classes[:top_k], labels[:top_k])]}
        if "confident" in out:  # an export of a run with an abstain threshold
            results[i]["confident"] = bool(out["confident"].numpy()[0])
    return _in_order(paths, results, failed)


# -- calibrating a run (tfl.calibration has the arithmetic) -------------------------------------------------------
def plain_and_tta_logits(model, pipeline, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [N], plain logits [N, C], TTA logits [N, C]) in one pass of every view through the model: view 0
    is the image itself, and the TTA logits are the views' mean exactly as tfl.tta.tta_logits takes it (for mode
    `none`, the one view: both are the model's own logits)."""
    forward = tf.function(lambda images: view_logits(model, images, mode), reduce_retracing=True)
    all_labels, plain, tta = [], [], []
    for batch in pipeline:
        each = forward(batch["image"])
        all_labels.append(batch["label"].numpy().astype(np.int64))
        plain.append(each[0].numpy())
        tta.append(tf.reduce_mean(each, axis=0).numpy())
    if not all_labels:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(all_labels), np.concatenate(plain), np.concatenate(tta)


def calibrate(model, splits, image_size: int, batch_size: int, run_path: str, log=print,
              abstain: str | None = None, tta: str | None = None) -> dict:
    """Fit and score a run's model on its splits (one pass over val and test each), write calibration.json.

    With a `tta` mode, TTA is decided first, on val (tfl.calibration.tta_decision); T (and the abstain threshold)
    are then fitted on the logits of the model that was chosen, plain or TTA."""
    mode = check_mode(tta)
    both = {}  # split -> (plain logits, TTA logits, labels); for `none` both are the model's own
    for split in ("val", "test"):
        source = getattr(splits, split)
        if source is not None:
            log(f"calibration: predicting the {split} split" + (f" (and its {mode} views)" if mode != "none" else "")
                + " ...")
            pipeline = data.make_pipeline(source, image_size, batch_size, training=False, seed=0)
            labels, plain, averaged = plain_and_tta_logits(model, pipeline, mode)
            if len(labels):
                both[split] = (plain, averaged, labels)
    if "val" not in both:
        raise UsageError(f"--run {run_path}: its val split is empty, so there is nothing to fit a temperature on; "
                         "give the dataset a val/ folder (or train the run again with a larger --val-split)")
    decision = None
    if mode != "none":
        decision = tta_decision(mode, *both["val"], *both.get("test", (None, None, None)))
        log(f"calibration: TTA {mode} {'kept' if decision['kept'] else 'not kept'}: {decision['reason']}")
    chosen = 1 if decision and decision["kept"] else 0
    passes = {split: (values[chosen], values[2]) for split, values in both.items()}
    record = calibrate_logits(*passes["val"], *passes.get("test", (None, None)))
    if decision is not None:
        record["tta"] = decision
    if abstain is not None:
        record["abstain"] = abstain_record(abstain, *passes["val"], *passes.get("test", (None, None)),
                                           record["temperature"])
    rundir.RunDir(run_path, create=False).write_json(rundir.CALIBRATION, record)
    log(f"calibration: temperature {record['temperature']:.4g}" + (" (kept)" if record["kept"] else "")
        + f"; wrote {os.path.join(run_path, rundir.CALIBRATION)}")
    return record


def calibrate_run(run_path: str, batch_size: int = 64, data_dir: str | None = None, log=print,
                  abstain: str | None = None, tta: str | None = None) -> dict:
    """`tfl calibrate --run DIR`: fit T on the run's own val split, score its test split, write calibration.json.
    The fit starts from model.keras's logits, so calibrating again replaces an earlier temperature (and an earlier
    TTA decision). data_dir: where the run's dataset is read from (default: the run's own). tta: a mode of
    tfl.tta to decide on val first (kept only if val accuracy or NLL improves)."""
    check_batch_size(batch_size)
    parse_abstain(abstain)  # before any work
    check_mode(tta)
    loaded = load_run(run_path, data_dir=data_dir, log=log)
    return calibrate(loaded.model, loaded.splits, loaded.image_size, batch_size, run_path, log, abstain, tta)


def calibrate_job(job, abstain: str | None = None, tta: str | None = None) -> dict:
    """`tfl finetune --calibrate` (or --tta): calibrate the model a job just saved (its splits, in memory) before
    --export."""
    record = calibrate(job.model, job.splits, job.image_size, job.batch, job.run_dir.path, job.log, abstain, tta)
    for line in describe(record).splitlines():  # finetune's log is its result
        job.log(line)
    return {"temperature": record["temperature"],
            **({"tta": record["tta"]["mode"], "tta_kept": record["tta"]["kept"]} if "tta" in record else {}),
            **({"abstain_threshold": record["abstain"]["threshold"]} if "abstain" in record else {})}
