"""Training checkpoints: what a run needs to continue after a crash, stored so a crash never leaves a partial
file where a reader would take it for a checkpoint.

<run>/checkpoints/
  ckpt-0003.npz   after every finished epoch (3 = epochs done): the model's variables (weights, BN statistics,
                  dropout RNG state), the optimizer variables of the stage in progress (one optimizer per
                  parameter group; `iterations` is the LR schedule's position), the best weights when they are
                  not the current ones, the weight averages (--ema, --swa-epochs: "avg.<name>.*", with their
                  counts in the state), and the trainer state as JSON (stage, epoch, history, best, patience)
  latest          the name of the newest complete checkpoint, written after it: a checkpoint counts only once
                  `latest` names it, and a reader falls back to older ones when it is damaged
Only the newest two are kept (the second is the fallback). Every file goes through tfl.durable.atomic_write (temp
file, fsync, rename).

Test hook (documented, used by tests/test_resume.py): the environment variable TFL_FAULT makes a run die by
SIGKILL at a chosen point, to test crash safety deterministically:
  TFL_FAULT=kill-during-save:N   while saving the checkpoint of epoch N, after half of it reached its temp file
  TFL_FAULT=kill-at-step:N:S     right after training step S of epoch N (epochs count across stages from 1)
  TFL_FAULT=interrupt-at-step:N:S  the same point, but SIGINT (what Ctrl-C sends) instead of SIGKILL
  TFL_FAULT=term-at-step:N:S     the same point, but SIGTERM (what a scheduler sends before preemption)
"""

from __future__ import annotations

from tfl.errors import UsageError
import dataclasses
import io
import json
import os
import re
import signal
import tempfile
import zipfile

import numpy as np

from tfl.durable import TMP_PREFIX, atomic_write

LATEST = "latest"
STATE_KEY = "state"
_NAME = re.compile(r"ckpt-(\d{4,})\.npz")


class ResumeError(UsageError):
    """A run cannot continue as asked: no readable checkpoint, or the configuration changed."""


@dataclasses.dataclass
class Snapshot:
    epoch: int  # epochs finished, across stages
    state: dict  # JSON-able trainer state
    arrays: dict  # name -> np.ndarray


def injected_fault(kind: str) -> tuple[int, ...] | None:
    """The numbers of TFL_FAULT when it names `kind` (the test hook above), else None."""
    name, _, args = os.environ.get("TFL_FAULT", "").partition(":")
    if name != kind:
        return None
    try:
        return tuple(int(a) for a in args.split(":"))
    except ValueError:
        raise UsageError(f"TFL_FAULT={os.environ['TFL_FAULT']!r}: expected {kind}:N[:S] with integers") from None


def checkpoint_name(epoch: int) -> str:
    return f"ckpt-{epoch:04d}.npz"


def encode(snapshot: Snapshot) -> bytes:
    buf = io.BytesIO()
    state = np.frombuffer(json.dumps({**snapshot.state, "epoch": snapshot.epoch}).encode(), np.uint8)
    np.savez(buf, **snapshot.arrays, **{STATE_KEY: state})
    return buf.getvalue()


def read(path: str) -> Snapshot:
    """Read and check a whole checkpoint; any damage raises (zip structure, CRC of every member, JSON)."""
    match = _NAME.fullmatch(os.path.basename(path))
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}  # reading a member checks its CRC
        state = json.loads(arrays.pop(STATE_KEY).tobytes())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ResumeError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}") from None
    if not match or state.get("epoch") != int(match.group(1)):
        raise ResumeError(f"it holds epoch {state.get('epoch')}, not the one its name says")
    return Snapshot(state.pop("epoch"), state, arrays)


class CheckpointManager:
    """Writes checkpoints into `folder` (created on first save)."""

    def __init__(self, folder: str):
        self.folder = folder

    def save(self, snapshot: Snapshot) -> str:
        os.makedirs(self.folder, exist_ok=True)
        name = checkpoint_name(snapshot.epoch)
        data = encode(snapshot)
        fault = injected_fault("kill-during-save")
        if fault and fault[0] == snapshot.epoch:
            self._die_half_written(name, data)
        path = os.path.join(self.folder, name)
        atomic_write(path, data)
        atomic_write(os.path.join(self.folder, LATEST), (name + "\n").encode())
        self._prune(snapshot.epoch)
        return path

    def _prune(self, epoch: int) -> None:
        """Keep this epoch's checkpoint and the newest older one; newer ones are stale (an abandoned future)."""
        previous = max((e for e in _epochs(self.folder) if e < epoch), default=None)
        for e in _epochs(self.folder):
            if e not in (epoch, previous):
                os.unlink(os.path.join(self.folder, checkpoint_name(e)))

    def _die_half_written(self, name: str, data: bytes) -> None:
        fd, _ = tempfile.mkstemp(dir=self.folder, prefix=TMP_PREFIX, suffix="-" + name)
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        kill_now()


def kill_now() -> None:
    """The TFL_FAULT hooks' death: SIGKILL, so nothing (no finally, no atexit) runs after it."""
    os.kill(os.getpid(), signal.SIGKILL)


def has_checkpoint(folder: str) -> bool:
    return bool(_epochs(folder)) or os.path.isfile(os.path.join(folder, LATEST))


def load_latest(folder: str, log=print) -> Snapshot | None:
    """The newest valid checkpoint in `folder`, falling back past damaged ones with a warning; None when there is
    none at all; ResumeError when there are checkpoints but none is readable (never a silent fresh start)."""
    if not has_checkpoint(folder):
        return None
    epochs = sorted(_epochs(folder), reverse=True)
    pointer = _read_pointer(folder)
    if pointer is None or pointer not in epochs:
        log(f"warning: {os.path.join(folder, LATEST)} is missing or names no checkpoint; "
            "trying the checkpoints present, newest first")
        candidates = epochs
    else:  # newer files than `latest` were never committed
        candidates = [e for e in epochs if e <= pointer]
    problems = []
    for i, epoch in enumerate(candidates):
        path = os.path.join(folder, checkpoint_name(epoch))
        try:
            return read(path)
        except ResumeError as err:
            problems.append(f"{checkpoint_name(epoch)}: {err}")
            after = (f"falling back to {checkpoint_name(candidates[i + 1])}" if i + 1 < len(candidates)
                     else "no older checkpoint left")
            log(f"warning: checkpoint {path} is unreadable ({err}); {after}")
    raise ResumeError(f"no readable checkpoint in {folder} ({'; '.join(problems) or 'none listed'}), so this run "
                      "cannot resume. Start a new run with another --output-dir, or delete that checkpoints "
                      "folder to train this one again from the start")


def config_differences(saved: dict, current: dict, ignore=()) -> list[str]:
    """'key: saved -> current' for every setting that differs, except the `ignore`d ones."""
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in ignore]
    missing = "(not set)"
    return [f"{k}: {_short(saved.get(k, missing))} -> {_short(current.get(k, missing))}"
            for k in keys if _normal(saved.get(k, missing)) != _normal(current.get(k, missing))]


def _normal(value):
    return json.loads(json.dumps(value, default=str))  # tuples and lists compare alike, as config.json stores them


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _epochs(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return [int(m.group(1)) for m in map(_NAME.fullmatch, os.listdir(folder)) if m]


def _read_pointer(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, LATEST)) as f:
            match = _NAME.fullmatch(f.read().strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(match.group(1)) if match else None
