"""The run directory: everything a run leaves behind, written atomically (temp file, fsync, rename).

runs/<timestamp>-<backbone>-<dataset>/
  config.json       every resolved option, versions, seed
  classes.json      class names, index order
  freeze_plan.json  the plan tfl inspect would print
  history.csv       one row per epoch
  model.keras       the best model (raw 0-255 RGB pixels in, logits out)
  metrics.json      test_accuracy, test_loss (with a test split; else val_loss), val_accuracy, eval_split, ...
  calibration.json  after `tfl calibrate` (or finetune --calibrate): the temperature T every reader of the run
                    divides model.keras's logits by (tfl.calibration); without it T = 1. With a kept "tta" entry
                    (--tta), those logits are the mean over the test-time views first (tfl.tta)
  checkpoints/      the last two finished epochs and a `latest` pointer, to resume from (see checkpoint.py)

A crash leaves at most `.tmp-*` files behind, never a partial file under a real name; a resumed run removes them.

While a run trains it holds an exclusive lock on `<run>/.tfl.lock` (flock; the file names the holder), so a second
process started into the same directory is refused instead of writing over the first. A directory that holds
anything but a resumable run (files of an earlier run whose checkpoints are gone, someone else's files) is refused
too, unless --overwrite says to replace the earlier run's files.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import sys
import time

from tfl.errors import Unavailable, UsageError
from tfl.options import TTA_MODES, TTA_NONE
from tfl.checkpoints.json_limits import loads_bounded
from tfl.durable import TMP_PREFIX, atomic_write, fsync_dir, save_keras, write_csv, write_json  # noqa: F401 (re-exported)

CONFIG, CLASSES, PLAN, HISTORY, MODEL, METRICS, CHECKPOINTS = (
    "config.json", "classes.json", "freeze_plan.json", "history.csv", "model.keras", "metrics.json", "checkpoints")
CALIBRATION = "calibration.json"
ADAPTERS, ADAPTERS_MANIFEST = "adapters.safetensors", "adapters.json"  # --save-adapters-only (tfl.adapters)
LOCK = ".tfl.lock"
MAX_JSON_BYTES, MAX_JSON_DEPTH = 64 * 2**20, 64  # a run's JSON files are small and shallow; anything else is refused
# What a tfl run writes into its directory besides the names above; --overwrite deletes exactly these.
RUN_EXTRAS = ("restore_report.json", "curves.png", "tensorboard", "report", "advice.json", CALIBRATION, ADAPTERS,
              ADAPTERS_MANIFEST,
              # tfl lr-find's files, and finetune --lr find's (one set per stage tested: tfl.recipes.lr_find)
              *(f"{stem}.{ext}" for stem in ("lr_find", "lr_find_head", "lr_find_finetune")
                for ext in ("json", "csv", "png")))


class RunDirInUse(Unavailable):
    """Another process holds the run directory's lock (an environment problem: exit 1)."""


def run_files(path: str) -> list[str]:
    """The names in `path` besides the lock and temporary files (none if it does not exist)."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n != LOCK and not n.startswith(TMP_PREFIX))


def check_reusable(path: str, overwrite: bool, has_checkpoint: bool) -> list[str]:
    """Refuse to start a run in a non-empty `path` that is not a resumable run; with `overwrite`, delete the
    earlier run's files there (and only those). Returns what was deleted."""
    contents = run_files(path)
    if not contents or (has_checkpoint and not overwrite):
        return []
    if not overwrite:
        shown = ", ".join(contents[:5]) + (f" and {len(contents) - 5} more" if len(contents) > 5 else "")
        what = ("an earlier run without its checkpoints/ (nothing to resume)" if CONFIG in contents
                else "files that are not a tfl run")
        raise UsageError(f"--output-dir {path} is not empty: it holds {what} ({shown}). Choose another --output-dir, "
                         "or pass --overwrite to replace the earlier run's files there")
    removed = []
    for name in contents:
        if name in (CONFIG, CLASSES, PLAN, HISTORY, MODEL, METRICS, CHECKPOINTS) + RUN_EXTRAS:
            target = os.path.join(path, name)
            shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.unlink(target)
            removed.append(target)
    return removed


class RunLock:
    """An exclusive, non-blocking lock on a run directory for the whole run (created if missing).

    with RunLock(path): ...   # raises RunDirInUse naming the holder (pid, host, command, since when)
    A directory the lock created and the run left empty (it failed before writing anything) is removed again.
    """

    def __init__(self, path: str):
        self.path = path
        self.file = os.path.join(path, LOCK)
        self._fd = None
        self._created = False

    def __enter__(self) -> "RunLock":
        import fcntl  # Unix only: importing this module stays possible without it

        self._created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirInUse(f"{self.path} is in use by another tfl run ({holder}); wait for it to finish, "
                                  "or choose another --output-dir") from None
            try:  # the holder before us may have unlinked the file between our open and our lock: retry then
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            os.unlink(self.file)  # while still holding the lock (see the inode check in __enter__)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                os.rmdir(self.path)  # only succeeds if the run wrote nothing
            except OSError:
                pass


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its holder did not say who it is"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: "
            f"{info.get('command', '')}").strip()


def default_path(backbone: str, dataset: str, root: str = "runs") -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(dataset))).strip("_") or "data"
    path = os.path.join(root, f"{stamp}-{backbone}-{slug}")
    suffix = 1
    while os.path.exists(path if suffix == 1 else f"{path}-{suffix}"):  # two runs started in the same second
        suffix += 1
    return path if suffix == 1 else f"{path}-{suffix}"


class RunDir:
    def __init__(self, path: str, create: bool = True):
        self.path = path
        if create:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(path):
            raise UsageError(f"--run {path!r}: no such run directory (expected one written by `tfl finetune`)")

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
        write_json(self.file(name), obj)

    def write_csv(self, name: str, fieldnames, rows, extrasaction: str = "raise") -> None:
        """rows (dicts) as CSV with a header, written atomically; extrasaction as csv.DictWriter's."""
        write_csv(self.file(name), fieldnames, rows, extrasaction)

    def read_json(self, name: str):
        path = self.file(name)
        if not os.path.isfile(path):
            raise UsageError(f"{self.path}: missing {name}; is this a finished tfl run directory?")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise UsageError(f"{path} is larger than {MAX_JSON_BYTES // 2**20} MB; not a file a tfl run writes")
        try:
            return loads_bounded(raw, MAX_JSON_DEPTH)
        except ValueError as err:
            raise UsageError(f"{path} is not a readable tfl run file: {err}") from None

    def write_history(self, rows: list[dict]) -> None:
        if rows:
            write_csv(self.file(HISTORY), rows[0], rows)

    def save_model(self, model) -> None:
        save_keras(model, self.file(MODEL))

    def read_classes(self) -> list[str]:
        """classes.json: a non-empty list of class names (strings), index order."""
        classes = self.read_json(CLASSES)
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise UsageError(f"{self.file(CLASSES)} is not a list of class names (a JSON list of strings, one per "
                             "class in index order); restore the run's own classes.json")
        return classes

    def load(self) -> tuple[object, list[str]]:
        """(model.keras, classes.json), checked against each other: one class name per output of the model.

        The one place a finished run is loaded (predict, evaluate, report, export, tfl.load_model), so a
        classes.json edited or copied from another run is refused by name everywhere instead of mislabelling."""
        classes = self.read_classes()
        model = self._load_keras()
        outputs = model.outputs if isinstance(model.outputs, list) else [model.outputs]
        if len(outputs) == 1 and outputs[0].shape[-1] is not None and int(outputs[0].shape[-1]) != len(classes):
            count = int(outputs[0].shape[-1])
            raise UsageError(f"{self.file(CLASSES)} names {len(classes)} class{'es' if len(classes) != 1 else ''} "
                             f"but {self.file(MODEL)} outputs {count}: the class names do not belong to this model "
                             f"(edited, or copied from another run); restore the run's own classes.json ({count} "
                             "names, in index order)")
        return model, classes

    def calibrated(self) -> bool:
        """Whether the run has a calibration.json (`tfl calibrate`)."""
        return os.path.isfile(self.file(CALIBRATION))

    def _calibration(self) -> dict | None:
        """calibration.json as a dict (anything else: {} so the readers below name the bad value), None without one."""
        if not self.calibrated():
            return None
        record = self.read_json(CALIBRATION)
        return record if isinstance(record, dict) else {}

    def temperature(self) -> float:
        """The temperature calibration.json holds (T > 0, finite), 1.0 when the run has none: the run's
        probabilities are softmax(logits / T) wherever they are computed (predict, evaluate, report, export)."""
        record = self._calibration()
        if record is None:
            return 1.0
        value = record.get("temperature")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise UsageError(f"{self.file(CALIBRATION)}: 'temperature' is {value!r}, not a positive number; run "
                             f"`tfl calibrate --run {self.path}` again to rewrite it, or delete the file")
        return float(value)

    def threshold(self) -> float | None:
        """The abstain threshold calibration.json holds (`tfl calibrate --abstain`): an answer is confident when its
        top probability, softmax(logits / T), is >= it. None when the run has none."""
        abstain = (self._calibration() or {}).get("abstain")
        if abstain is None:
            return None
        value = abstain.get("threshold") if isinstance(abstain, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UsageError(f"{self.file(CALIBRATION)}: the abstain 'threshold' is {value!r}, not a probability; "
                             f"run `tfl calibrate --run {self.path} --abstain ...` again, or delete the file")
        return float(value)

    def tta(self) -> str | None:
        """The test-time augmentation mode (tfl.tta) calibration.json keeps (`tfl calibrate --tta`, when val kept
        it): the run's logits are then the mean over its views. None when the run has none, or val did not keep it."""
        record = (self._calibration() or {}).get("tta")
        if record is None:
            return None
        mode = record.get("mode") if isinstance(record, dict) else None
        kept = record.get("kept") if isinstance(record, dict) else None
        if mode not in TTA_MODES or not isinstance(kept, bool):
            raise UsageError(f"{self.file(CALIBRATION)}: the 'tta' entry is {record!r}, not a mode of "
                             f"{', '.join(TTA_MODES)} with kept true or false; run `tfl calibrate --run {self.path} "
                             "--tta ...` again, or delete the file")
        return mode if kept and mode != TTA_NONE else None

    def forget_calibration(self) -> bool:
        """Remove calibration.json (its temperature was fitted to a model.keras that was just replaced)."""
        if self.calibrated():
            os.unlink(self.file(CALIBRATION))
            return True
        return False

    def load_model(self):
        """model.keras after the checks of load() (the classes.json beside it must fit the model)."""
        return self.load()[0]

    def _load_keras(self):
        """model.keras, rebuilt by Keras only after the checks every .keras file gets: known archive members,
        bounded sizes and nesting, only Keras built-ins and tfl's own classes (a run directory is a folder anyone
        can hand over, and a config naming `os.system` or a Lambda must be refused by name, not by Keras)."""
        # Keras, h5py and tfl's layers load here, not with this module: the CLI imports it (RunDirInUse) for --help.
        import keras

        from tfl.checkpoints.keras_files import check_keras_archive
        from tfl.trusted_layers import custom_objects  # also registers tfl's custom layers for deserialisation

        path = self.file(MODEL)
        if not os.path.isfile(path):
            raise UsageError(f"{self.path}: missing {MODEL}; the run did not finish")
        check_keras_archive(path, custom_objects())
        return keras.models.load_model(path, compile=False)
