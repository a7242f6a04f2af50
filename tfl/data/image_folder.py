"""An image-folder dataset: ROOT/train/<class>/*.jpg, optional ROOT/val (or valid, validation) and ROOT/test.

Every file is decoded once with Pillow before any training starts, so a bad file fails the run in
seconds with a full list rather than crashing epoch 3.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable

import numpy as np

from tfl.data import pixel_limit
from tfl.data.decode import decode_files
from tfl.data.errors import DataError, list_some, shown, unprintable
from tfl.data.fingerprint import fingerprint
from tfl.data.image_check import IMAGE_EXTENSIONS, BadImage, ImageInfo, file_problem, inspect_image
from tfl.data.splits import DatasetSplits
from tfl.data.stratify import check_val_split, stratified_split

# Folder names accepted for each split, in the order they are looked for.
SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
LAYOUT_HINT = (f"expected ROOT/train/<class>/*.jpg (also {' '.join(e for e in IMAGE_EXTENSIONS if e != '.jpg')}), "
               "optionally ROOT/val/... and ROOT/test/...")
# Files operating systems drop into folders; never data, so not reported as bad images.
_OS_JUNK = frozenset({"thumbs.db", "desktop.ini"})


@dataclasses.dataclass
class _File:
    path: str
    label: int
    size_bytes: int
    mtime_ns: int
    problem: str | None = None  # why it cannot be an image, known without opening it
    info: ImageInfo | None = None
    digest: str | None = None  # of the file's bytes (tfl.data.fingerprint.file_digest), set with info


def load_image_folder(
    root: str, val_split: float = 0.1, seed: int = 0, skip_bad_images: bool = False, log: Callable = print
) -> DatasetSplits:
    root = os.path.abspath(os.path.expanduser(root))
    split_dirs = _find_split_dirs(root)
    if split_dirs["val"] is None:
        check_val_split(val_split)
    max_pixels = pixel_limit.max_pixels()  # before anything is read: a bad $TFL_MAX_PIXELS is refused first

    class_names = _class_names(split_dirs["train"])
    _check_class_sets(split_dirs, class_names)
    for folder in split_dirs.values():
        if folder:
            _check_class_links(folder, class_names)
    files = {split: _list_files(folder, class_names) for split, folder in split_dirs.items() if folder}
    _check_no_empty_classes(files, split_dirs, class_names, "has no files")

    everything = [f for split_files in files.values() for f in split_files]
    log(f"checking {len(everything)} image files under {shown(root)} ...")
    bad = _inspect_all(everything, max_pixels)
    if bad:
        listing = list_some([f"{path}  ({reason})" for path, reason in bad])
        if not skip_bad_images:
            raise DataError(
                f"{len(bad)} file(s) under {shown(root)} are not readable images:\n{listing}\n"
                "Delete or fix them, or pass --skip-bad-images to train without them."
            )
        log(f"warning: skipping {len(bad)} unreadable file(s) under {shown(root)}:\n{listing}")
        files = {split: [f for f in split_files if f.info is not None] for split, split_files in files.items()}
        _check_no_empty_classes(files, split_dirs, class_names, "has no readable images")

    if split_dirs["val"] is None:
        labels = np.array([f.label for f in files["train"]], dtype=np.int64)
        train_idx, val_idx = stratified_split(labels, val_split, seed)
        lonely = sorted({class_names[i] for i in labels} - {class_names[labels[i]] for i in val_idx})
        if len(val_idx) == 0:
            raise DataError(
                f"cannot hold out validation images: every class in {split_dirs['train']} has a single image; "
                "add images, or add a val/ folder with the same class folders"
            )
        if lonely:
            log(f"warning: class(es) with a single image get no validation example: {', '.join(lonely)}")
        _log_held_out(labels, val_idx, class_names, val_split, log)
        files["val"] = [files["train"][i] for i in val_idx]
        files["train"] = [files["train"][i] for i in train_idx]
        split_spec: object = {"val_split": val_split, "seed": seed}
    else:
        split_spec = "folders"
    # A class-sorted train list would defeat a bounded shuffle buffer; a fixed seeded order mixes classes
    # so any buffer size gives class-balanced batches, and the order is still the same on every run.
    files["train"] = [files["train"][i] for i in np.random.default_rng([seed, 1]).permutation(len(files["train"]))]

    sizes = {(f.info.height, f.info.width) for split_files in files.values() for f in split_files}
    # What each split is: its files by content (file_digest, not size and mtime: a copy can keep both and change
    # the pixels) and how it was split. The resume check compares train and val (what training read).
    per_split = {split: fingerprint("image_folder", split_spec, split,
                                    sorted((os.path.relpath(f.path, root), f.size_bytes, f.digest) for f in chosen))
                 for split, chosen in files.items()}
    return DatasetSplits(
        name=root,
        train=_dataset(files["train"]),
        val=_dataset(files["val"]),
        test=_dataset(files["test"]) if "test" in files else None,
        class_names=class_names,
        num_examples={split: len(files.get(split, [])) for split in ("train", "val", "test")},
        native_size=sizes.pop() if len(sizes) == 1 else None,
        fingerprint=fingerprint("image_folder", per_split),
        train_labels=np.array([f.label for f in files["train"]], dtype=np.int64),
        split_fingerprints=per_split,
        files={split: [f.path for f in split_files] for split, split_files in files.items()},
    )


def _find_split_dirs(root: str) -> dict[str, str | None]:
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root} does not exist or is not a directory; {LAYOUT_HINT}")
    found: dict[str, str | None] = {}
    for split, names in SPLIT_DIR_NAMES.items():
        present = [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
        if len(present) > 1:
            raise DataError(
                f"{root} has more than one {split} folder ({', '.join(present)}); keep one and rename the others"
            )
        found[split] = present[0] if present else None
    if found["train"] is None:
        hint = ""
        if any(_has_images(os.path.join(root, d)) for d in _subdirs(root)):
            hint = " It looks like ROOT holds class folders directly: move them into ROOT/train/."
        raise DataError(f"{root} has no train/ folder; {LAYOUT_HINT}.{hint}")
    return found


def _class_names(train_dir: str) -> list[str]:
    names = sorted(_subdirs(train_dir))
    if not names:
        raise DataError(f"{shown(train_dir)} has no class folders; {LAYOUT_HINT}")
    # A class name goes into classes.json, log lines and an export's labels.txt (one name a line): refuse a name
    # that cannot be one line of text now, not after training.
    bad = [name for name in names if unprintable(name)]
    if bad:
        raise DataError(f"class folder name(s) in {shown(train_dir)} with a control character (a newline, a tab, "
                        "...) or bytes that are not UTF-8 cannot be class names:\n" + list_some(bad)
                        + "\nRename the folder(s) to plain text.")
    return names


def _check_class_sets(split_dirs: dict[str, str | None], class_names: list[str]) -> None:
    problems = []
    for split in ("val", "test"):
        folder = split_dirs[split]
        if folder is None:
            continue
        present = set(_subdirs(folder))
        missing = sorted(set(class_names) - present)
        extra = sorted(present - set(class_names))
        if missing:
            problems.append(f"{folder} lacks class folder(s) that train has: {', '.join(missing)}")
        if extra:
            problems.append(f"{folder} has class folder(s) that train lacks: {', '.join(extra)}")
    if problems:
        raise DataError(
            "class folders differ between splits:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nEvery split must have the same class folders as train/ (an empty folder is not allowed either)."
        )


def _check_no_empty_classes(files, split_dirs, class_names, what: str) -> None:
    empty = []
    for split, split_files in files.items():
        counts = np.bincount(np.array([f.label for f in split_files], np.int64), minlength=len(class_names))
        empty += [os.path.join(split_dirs[split], class_names[i]) for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"class folder(s) {what}:\n{list_some(empty)}\nAdd images or remove the folder(s).")


def _check_class_links(split_dir: str, class_names: list[str]) -> None:
    """A class folder may be a link, but not to the split folder, an ancestor of it, or into another class: each
    image must belong to one class folder only."""
    real = {name: os.path.realpath(os.path.join(split_dir, name)) for name in class_names}
    split_real = os.path.realpath(split_dir)
    problems = []
    for name, target in real.items():
        own = os.path.join(split_dir, name)
        for other_name, other in [("", split_real), *real.items()]:
            if other_name == name:
                continue
            contains = other == target or other.startswith(target + os.sep)  # this class holds the other
            if contains or (other_name and target.startswith(other + os.sep)):
                what = f"class folder {os.path.join(split_dir, other_name)}" if other_name else "its split folder"
                problems.append(f"{own} -> {target} overlaps {what}")
                break
    if problems:
        raise DataError("class folders must not share images (through symbolic links):\n" + list_some(problems)
                        + "\nPoint each class folder link at a folder of its own.")


def _list_files(split_dir: str, class_names: list[str]) -> list[_File]:
    """Every non-hidden file under each class folder (recursively), in a fixed sorted order.

    Symbolic links to directories below a class folder are never followed (a link to `..` would put other
    classes' images under this label, a link to `.` would loop): each is listed as a bad file under its own path.
    A link to a file counts as that file if it is a regular file. Nothing here opens a file (see file_problem).
    """
    files = []
    for label, name in enumerate(class_names):
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, name)):
            links = sorted(d for d in dirnames if not d.startswith(".") and os.path.islink(os.path.join(dirpath, d)))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in links)
            for link in links:
                path = os.path.join(dirpath, link)
                files.append(_File(path, label, -1, 0, problem=(
                    f"a symbolic link to the directory {os.readlink(path)}; links to directories inside a class "
                    "folder are not followed (link or copy the image files themselves)")))
            for filename in sorted(filenames):
                if filename.startswith(".") or filename.lower() in _OS_JUNK:
                    continue
                path = os.path.join(dirpath, filename)
                problem = file_problem(path)
                try:
                    stat = os.stat(path)
                except OSError:  # a broken symlink: file_problem says so
                    files.append(_File(path, label, -1, 0, problem=problem))
                    continue
                files.append(_File(path, label, stat.st_size, stat.st_mtime_ns, problem=problem))
    return files


def _inspect_all(files: list[_File], max_pixels: int | None = None) -> list[tuple[str, str]]:
    """Fill in each file's ImageInfo and digest; return (path, reason) for the bad ones. Parallel: Pillow and
    hashlib drop the GIL."""

    def inspect(file: _File) -> str | None:
        if file.problem:  # decided from stat alone: a FIFO, a device or a link is never opened
            return file.problem
        try:
            file.info = inspect_image(file.path, max_pixels, digest=True)  # the digest from the same read
        except BadImage as error:
            return str(error)
        file.digest = file.info.digest
        return None

    workers = min(32, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(inspect, files))
    return [(f.path, reason) for f, reason in zip(files, reasons) if reason is not None]


def _log_held_out(labels: np.ndarray, val_idx: np.ndarray, class_names: list[str], val_split: float, log) -> None:
    """Say what --val-split held out, per class where it is more than asked (every class with two or more images
    gives at least one, so small classes give a larger share)."""
    counts = np.bincount(labels, minlength=len(class_names))
    held = np.bincount(labels[val_idx], minlength=len(class_names))
    log(f"validation: held out {len(val_idx)} of {len(labels)} train images (--val-split {val_split:g}, stratified "
        "by class; no val/ folder)")
    over = [f"{class_names[i]}: {held[i]} of {counts[i]}" for i in range(len(class_names))
            if counts[i] and held[i] / counts[i] > 1.5 * val_split and held[i] / counts[i] >= val_split + 0.05]
    if over:
        log(f"warning: --val-split {val_split:g} holds out more of these small classes (each gives at least one "
            f"image to validation, the rest train):\n{list_some(over)}\nAdd images, or give a val/ folder.")


def recheck(paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) for each of `paths` that is not a readable image now: after TensorFlow failed to read a
    split, the files that changed since the check before training (a sync job rewriting the folder)."""
    files = [_File(p, 0, -1, 0, problem=file_problem(p)) for p in paths]
    return _inspect_all(files)


def changed_files_error(paths: list[str], changed: str, stopped: str, advice: str) -> DataError | None:
    """After TensorFlow failed to read `paths` (its error names no file): a DataError listing those that are no
    longer readable images ("N image file(s) {changed} and cannot be read any more, so {stopped} stopped: ...
    {advice}"), or None when every one still reads (the failure was something else)."""
    bad = recheck(paths) if paths else []
    if not bad:
        return None
    listing = list_some([f"{path}  ({reason})" for path, reason in bad])
    return DataError(f"{len(bad)} image file(s) {changed} and cannot be read any more, so {stopped} stopped:\n"
                     f"{listing}\n{advice}")


def _dataset(files: list[_File]):
    return decode_files([f.path for f in files], [f.label for f in files], [f.info.needs_pillow for f in files])


def _subdirs(folder: str) -> list[str]:
    return [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]


def _has_images(folder: str) -> bool:
    return any(e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in os.scandir(folder))
