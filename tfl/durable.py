"""Files written so a crash never leaves a partial one under its real name: temp file in the same folder, fsync,
rename, fsync of the folder. Every file tfl writes goes through here (run directories, checkpoints, the
precision memory, reports, figures, a recipe's tables).

A killed writer leaves at most a `.tmp-*` file behind (TMP_PREFIX); tfl.training.rundir removes those on resume.
Depends on nothing else of tfl, so any layer may use it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile

TMP_PREFIX = ".tmp-"


def atomic_write(path: str, data: bytes) -> None:
    """`data` to `path`, all or nothing; an OSError names `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not err.filename:  # say which file could not be written
            raise OSError(err.errno, err.strerror, path) from None
        raise
    fsync_dir(folder)


def write_text(path: str, text: str) -> None:
    atomic_write(path, text.encode())


def write_json(path: str, obj, indent: int = 2, sort_keys: bool = False) -> None:
    """`obj` as JSON with a final newline; NaN and infinities become null (see finite)."""
    atomic_write(path, (json.dumps(finite(obj), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n").encode())


def write_csv(path: str, fieldnames, rows, extrasaction: str = "raise") -> None:
    """rows (dicts) as CSV with a header; extrasaction as csv.DictWriter's."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), extrasaction=extrasaction)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue().encode())


def save_keras(model, path: str) -> None:
    """model.save to `path` (.keras): a half-written model never stands under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Keras picks the format from the suffix, so the temp name must end in .keras too.
    tmp = os.path.join(folder, TMP_PREFIX + os.path.basename(path))
    try:
        model.save(tmp)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(err.errno, err.strerror, path) from None
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable: without this a power cut can undo it even after the file's fsync."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finite(obj):
    """NaN and infinities become null: json.dumps would write NaN, which most JSON parsers refuse."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
