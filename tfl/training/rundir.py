"""The run directory: everything a run leaves behind, written atomically (temp file, fsync, rename).

runs/<timestamp>-<backbone>-<dataset>/
  config.json       every resolved option, versions, seed
  classes.json      class names, index order
  freeze_plan.json  the plan tfl inspect would print
  history.csv       one row per epoch
  model.keras       the best model (raw 0-255 RGB pixels in, logits out)
  metrics.json      test_accuracy, test_loss, val_accuracy, epochs_run, train_seconds
  checkpoints/      the last two finished epochs and a `latest` pointer, to resume from (see checkpoint.py)

A crash leaves at most `.tmp-*` files behind, never a partial file under a real name; a resumed run removes them.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import re
import tempfile

CONFIG, CLASSES, PLAN, HISTORY, MODEL, METRICS, CHECKPOINTS = (
    "config.json", "classes.json", "freeze_plan.json", "history.csv", "model.keras", "metrics.json", "checkpoints")
TMP_PREFIX = ".tmp-"


def default_path(backbone: str, dataset: str, root: str = "runs") -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(dataset))).strip("_") or "data"
    return os.path.join(root, f"{stamp}-{backbone}-{slug}")


def atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable: without this a power cut can undo it even after the file's fsync."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_keras(model, path: str) -> None:
    """model.save to `path` (.keras) atomically: a half-written model never stands under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Keras picks the format from the suffix, so the temp name must end in .keras too.
    tmp = os.path.join(folder, TMP_PREFIX + os.path.basename(path))
    model.save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


class RunDir:
    def __init__(self, path: str, create: bool = True):
        self.path = path
        if create:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(path):
            raise ValueError(f"--run {path!r}: no such run directory (expected one written by `tfl finetune`)")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def remove_leftovers(self) -> list[str]:
        """Delete the `.tmp-*` files a killed writer left here or in checkpoints/; returns their paths."""
        removed = []
        for folder in (self.path, self.file(CHECKPOINTS)):
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name.startswith(TMP_PREFIX) and os.path.isfile(path):
                    os.unlink(path)
                    removed.append(path)
        return removed

    def write_json(self, name: str, obj) -> None:
        atomic_write(self.file(name), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def read_json(self, name: str):
        path = self.file(name)
        if not os.path.isfile(path):
            raise ValueError(f"{self.path}: missing {name}; is this a finished tfl run directory?")
        with open(path) as f:
            return json.load(f)

    def write_history(self, rows: list[dict]) -> None:
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.file(HISTORY), buf.getvalue().encode())

    def save_model(self, model) -> None:
        save_keras(model, self.file(MODEL))

    def load_model(self):
        import keras

        import tfl.freezing  # noqa: F401  (registers tfl's custom layers for deserialisation)
        import tfl.models  # noqa: F401

        path = self.file(MODEL)
        if not os.path.isfile(path):
            raise ValueError(f"{self.path}: missing {MODEL}; the run did not finish")
        return keras.models.load_model(path, compile=False)
