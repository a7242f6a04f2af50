"""Where exports go on disk: BASE/<integer version>/ as TF Serving reads it, each version written whole or not at all.

TF Serving watches BASE and loads the highest integer-named subdirectory, so a half-written version directory
would be loaded half-written. Exports are therefore built in a hidden sibling (`.tmp-*`, a name TF Serving
ignores) and renamed into place, and an existing version is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable

from tfl.errors import UsageError

DEFAULT_ROOT = "saved_models"
LABELS_FILE = "labels.txt"
SAVED_MODEL_FILE = "saved_model.pb"


def default_base(run_path: str, suffix: str = "", root: str = DEFAULT_ROOT) -> str:
    """saved_models/<run directory's name><suffix>."""
    name = os.path.basename(os.path.normpath(os.path.abspath(run_path)))
    return os.path.join(root, name + suffix)


def existing_versions(base: str) -> list[int]:
    if not os.path.isdir(base):
        return []
    return sorted(int(name) for name in os.listdir(base) if name.isdigit() and os.path.isdir(os.path.join(base, name)))


def version_dir(base: str, version: int | None) -> str:
    """BASE/<version>, or BASE/<highest existing + 1> when version is None; refuses one that exists."""
    if os.path.exists(base) and not os.path.isdir(base):
        raise UsageError(f"--output {base!r} is a file; give a directory (the model's base directory)")
    if version is None:
        version = max(existing_versions(base), default=0) + 1
    elif isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"--version {version!r}: versions are integers >= 1 (TF Serving loads the highest)")
    path = os.path.join(base, str(version))
    if os.path.exists(path):
        raise UsageError(f"{path} already exists; pick another --version (next free: "
                         f"{max(existing_versions(base), default=0) + 1}) or remove it")
    return path


def write_version(path: str, build: Callable[[str], None]) -> None:
    """Run build(tmp) on an empty directory beside `path`, then rename it to `path` in one step."""
    base = os.path.dirname(path) or "."
    os.makedirs(base, exist_ok=True)
    # os.mkdir honours the umask (mkdtemp would make it 0700, unreadable for a server running as another user).
    tmp = os.path.join(base, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        build(tmp)
        if os.path.exists(path):  # another export took this version while we were building
            raise UsageError(f"{path} appeared while exporting; pick another --version")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def labels_text(class_names) -> str:
    """One class name per line, line i = class index i; names must survive that round trip."""
    for name in class_names:
        if not isinstance(name, str) or "\n" in name or "\r" in name:
            raise UsageError(f"class name {name!r} cannot be written one per line to {LABELS_FILE}; "
                             "rename the class (folder) and train again")
    return "".join(name + "\n" for name in class_names)


def resolve_saved_model(path: str) -> str:
    """A SavedModel directory, or a base directory whose highest version is used (as TF Serving does)."""
    if os.path.isfile(os.path.join(path, SAVED_MODEL_FILE)):
        return path
    versions = existing_versions(path)
    if versions and os.path.isfile(os.path.join(path, str(versions[-1]), SAVED_MODEL_FILE)):
        return os.path.join(path, str(versions[-1]))
    where = f" or in its highest version {versions[-1]}/" if versions else ""
    raise UsageError(f"--saved-model {path!r}: no {SAVED_MODEL_FILE} there{where}; give a directory written by "
                     "`tfl export --format saved_model`")
