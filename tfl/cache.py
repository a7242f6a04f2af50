"""Arrays computed once and reused: held in memory within a budget, persisted under a cache directory.

An entry is `data [N, ...]` plus `labels [N]`, keyed by a dict of everything its values depend on. On disk:

    <cache dir>/<sha256 of the key>/data.npy, labels.npy, manifest.json

An entry is written into a temporary sibling directory (files fsynced, manifest last) and renamed into place,
so a crash never leaves a directory that looks complete. A lookup uses an entry only if its manifest holds
exactly the requested key and every file has the size and checksum the manifest records; anything else is
deleted and recomputed. The directory is trimmed to its cap (--cache-disk-limit, default DISK_LIMIT bytes), least
recently used entries first; an entry bigger than the cap is never written (can_store() says so).

A full or read-only cache directory never aborts a run: an entry that does not fit the free space is kept in
memory if it fits the budget (with a warning), and otherwise can_store() says why, so the caller recomputes.
Files bigger than memory are allocated on disk up front (posix_fallocate), so a disk that fills up fails at once
with an error rather than with SIGBUS in the middle of writing a memory map.
"""

from __future__ import annotations

from tfl.errors import Unavailable, UsageError
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Callable

import numpy as np

FORMAT_VERSION = 1  # bump when what an entry holds changes meaning; old entries then stop matching
MANIFEST = "manifest.json"
FILES = ("data.npy", "labels.npy")
DISK_LIMIT = 20 * 2**30  # the cache directory never grows past this; older entries make room
DISK_MARGIN = 64 * 2**20  # free space an entry on disk leaves for everything else
DEFAULT_BUDGET_FRACTION = 0.25  # of physical memory ...
DEFAULT_BUDGET_CAP = 4 * 2**30  # ... but never more than this by default
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def default_cache_dir() -> str:
    return os.path.expanduser(os.environ.get("TFL_CACHE_DIR") or os.path.join("~", ".cache", "tfl"))


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not exposed on this platform
        return None


def default_budget() -> int:
    total = physical_memory()
    return DEFAULT_BUDGET_CAP if total is None else min(DEFAULT_BUDGET_CAP, int(total * DEFAULT_BUDGET_FRACTION))


def parse_size(text: str | int | None, flag: str = "--cache-budget", default: int | None = None) -> int:
    """"4G", "512M", "1.5g", "800K", "0" or a byte count -> bytes (binary units); None -> `default` (None: the
    default memory budget). `flag` names the option in the error."""
    if text is None:
        return default_budget() if default is None else default
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UsageError(f"{flag} {text!r} is not a size; write e.g. 4G, 512M or 0 (bytes without a unit)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_disk_limit(text: str | int | None) -> int:
    """--cache-disk-limit: the cache directory's cap in bytes (None: DISK_LIMIT)."""
    return parse_size(text, "--cache-disk-limit", DISK_LIMIT)


def format_size(nbytes: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def key_id(key: dict) -> str:
    payload = json.dumps([FORMAT_VERSION, key], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _canonical(key: dict):
    return json.loads(json.dumps(key, sort_keys=True, default=str))


@dataclasses.dataclass
class Entry:
    data: np.ndarray  # in memory, or a read-only np.memmap of the file on disk
    labels: np.ndarray
    info: dict  # what the producer recorded, e.g. {"seconds": time it took to compute}
    reused: bool  # found from an earlier run, nothing computed now
    path: str | None  # the persisted entry, if any

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.labels.nbytes)

    @property
    def in_memory(self) -> bool:
        return not isinstance(self.data, np.memmap)

    def where(self) -> str:
        if self.in_memory:
            return "memory" + (f" (also on disk at {self.path})" if self.path else "")
        return f"disk at {self.path}"


class NoRoom(Unavailable):
    """An entry bigger than the memory budget could not be written to the cache directory after all (it filled
    up or turned read-only after the plan was made); the caller recomputes instead."""


class ArrayCache:
    """Memory for entries that fit `budget` (bytes, shared by all entries), disk for the rest.

    directory=None keeps everything in memory only: nothing outlives the process, and an entry that does not
    fit the budget cannot be cached at all. `disk_limit`: the directory's cap in bytes; an entry bigger than it
    never goes to disk.
    """

    def __init__(self, directory: str | None, budget: int, log: Callable = print, disk_limit: int = DISK_LIMIT):
        self.directory = os.path.expanduser(directory) if directory else None
        self.budget = budget
        self.disk_limit = disk_limit
        self.used = 0
        self.log = log
        self._disk_problem: str | None = None
        if self.directory:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as err:
                self._disk_problem = f"cannot create cache directory {self.directory}: {err.strerror}"
                self.log(f"cache: warning: {self._disk_problem}; caching in memory only")
                self.directory = None

    def fits_memory(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.budget

    def free_disk(self) -> int | None:
        try:
            return shutil.disk_usage(self.directory).free if self.directory else None
        except OSError:
            return None

    def fits_disk(self, nbytes: int) -> bool:
        free = self.free_disk()
        return free is not None and free >= nbytes + DISK_MARGIN and nbytes <= self.disk_limit

    def can_store(self, nbytes: int) -> str | None:
        """None if an entry of `nbytes` can be cached now, else why not."""
        if self.fits_memory(nbytes) or (self.directory and self.fits_disk(nbytes)):
            return None
        advice = "raise --cache-budget or set --cache-dir"
        if self.directory:
            free = self.free_disk()
            if nbytes > self.disk_limit and free is not None and free >= nbytes + DISK_MARGIN:
                reason = f"is over the cache directory's cap (--cache-disk-limit {format_size(self.disk_limit)})"
                advice = "raise --cache-budget or --cache-disk-limit"
            else:
                reason = (f"the cache directory {self.directory} has only {format_size(free or 0)} free"
                          if free is not None else f"the cache directory {self.directory} cannot be used")
        else:
            reason = self._disk_problem or "no cache directory"
        return (f"{format_size(nbytes)} does not fit the memory budget ({format_size(self.budget - self.used)} left "
                f"of {format_size(self.budget)}) and {reason}; {advice}")

    # -- lookup -----------------------------------------------------------------------------------------------------
    def lookup(self, key: dict) -> Entry | None:
        if not self.directory:
            return None
        path = os.path.join(self.directory, key_id(key))
        if not os.path.isdir(path):
            return None
        problem = _verify(path, key)
        if problem:
            self.log(f"cache: discarding {path}: {problem}")
            shutil.rmtree(path, ignore_errors=True)
            return None
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        try:
            os.utime(os.path.join(path, MANIFEST))  # last use, for trimming
        except OSError:  # a read-only cache directory is still readable
            pass
        data = np.load(os.path.join(path, FILES[0]), mmap_mode="r")
        labels = np.load(os.path.join(path, FILES[1]))
        if self.fits_memory(data.nbytes + labels.nbytes):
            data = np.array(data)
            self.used += data.nbytes + labels.nbytes
        return Entry(data, labels, manifest.get("info", {}), True, path)

    # -- build ------------------------------------------------------------------------------------------------------
    def build(self, key: dict, rows: int, row_shape: tuple, dtype, fill: Callable[[np.ndarray, np.ndarray], dict],
              persist: bool = True) -> Entry:
        """Allocate data [rows, *row_shape] and labels [rows] int32, let `fill(data, labels)` write every row (it
        returns the info to record), then keep the entry in memory if it fits the budget, and on disk if
        `persist` or if it does not fit. Call can_store() first: with neither memory nor disk this raises."""
        dtype = np.dtype(dtype)
        nbytes = int(rows * int(np.prod(row_shape)) * dtype.itemsize + rows * 4)
        problem = self.can_store(nbytes)
        if problem:
            raise UsageError(f"cannot cache {key.get('kind', 'arrays')}: {problem}")
        in_memory = self.fits_memory(nbytes)
        kind = key.get("kind", "arrays")
        tmp = None
        if self.directory and (persist or not in_memory):
            if self.fits_disk(nbytes):
                tmp = self._tmp_dir()
            else:
                short = (f"is capped at {format_size(self.disk_limit)} (--cache-disk-limit)"
                         if nbytes > self.disk_limit else f"has only {format_size(self.free_disk() or 0)} free")
                self.log(f"cache: warning: the cache directory {self.directory} {short}, not enough for the "
                         f"{format_size(nbytes)} {kind}" + ("; keeping it in memory for this run only" if in_memory
                                                             else ""))
            if tmp is None and not in_memory:
                raise NoRoom(f"cannot cache {kind}: {self.can_store(nbytes)}")
        if in_memory:
            data = np.empty((rows, *row_shape), dtype)
        else:
            try:
                data = _allocated_memmap(os.path.join(tmp, FILES[0]), dtype, (rows, *row_shape), tmp)
            except OSError as err:
                raise NoRoom(f"cannot cache {kind}: {format_size(nbytes)} could not be allocated in {self.directory} "
                             f"({err.strerror})") from None
        labels = np.empty(rows, np.int32)
        try:
            info = fill(data, labels)
        except BaseException:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if in_memory:
            self.used += nbytes
        path = None
        if tmp:
            try:
                path = self._persist(tmp, key, data, labels, info)
            except OSError as err:  # the disk filled up meanwhile, or turned read-only
                shutil.rmtree(tmp, ignore_errors=True)
                if not in_memory:
                    raise NoRoom(f"cannot cache {kind}: saving it to {self.directory} failed "
                                 f"({err.strerror})") from None
                self.log(f"cache: warning: could not save the {kind} entry to {self.directory} "
                         f"({err.strerror}); keeping it in memory for this run only")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if not in_memory:
            del data
            data = np.load(os.path.join(path, FILES[0]), mmap_mode="r")
        return Entry(data, labels, info, False, path)

    def _tmp_dir(self) -> str | None:
        try:
            return tempfile.mkdtemp(prefix=".tmp-", dir=self.directory)
        except OSError as err:  # read-only or full: the entry stays in memory if it can
            self._disk_problem = f"cannot write in cache directory {self.directory}: {err.strerror}"
            self.log(f"cache: warning: {self._disk_problem}")
            self.directory = None
            return None

    def _persist(self, tmp: str, key: dict, data: np.ndarray, labels: np.ndarray, info: dict) -> str:
        data_path = os.path.join(tmp, FILES[0])
        if isinstance(data, np.memmap):
            data.flush()
        else:
            _save(data_path, data)
        _save(os.path.join(tmp, FILES[1]), labels)
        files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": _sha256(os.path.join(tmp, name))}
                 for name in FILES}
        manifest = {"format": FORMAT_VERSION, "key": _canonical(key), "files": files, "info": info,
                    "created": time.time(), "shape": list(data.shape), "dtype": str(data.dtype)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = os.path.join(self.directory, key_id(key))
        try:
            os.rename(tmp, final)
        except OSError:  # another run finished the same entry first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
            if _verify(final, key):
                raise
        self.trim(keep=final)
        return final

    def trim(self, keep: str | None = None, limit: int | None = None) -> None:
        """Delete least recently used entries (and abandoned temporary directories) beyond `limit` bytes (default:
        the cache's cap)."""
        if not self.directory:
            return
        limit = self.disk_limit if limit is None else limit
        entries = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if not os.path.isdir(path):
                continue
            if name.startswith(".tmp-"):
                if time.time() - os.path.getmtime(path) > 24 * 3600:  # a crashed run's; live ones are younger
                    shutil.rmtree(path, ignore_errors=True)
                continue
            manifest = os.path.join(path, MANIFEST)
            used = os.path.getmtime(manifest) if os.path.exists(manifest) else 0.0
            size = sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
            entries.append((used, size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= limit:
                break
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
                total -= size


def _allocated_memmap(path: str, dtype, shape: tuple, tmp: str) -> np.memmap:
    """A .npy memory map whose blocks are allocated now: without this a sparse file on a disk that fills up
    kills the process with SIGBUS when a page is written."""
    try:
        data = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, os.path.getsize(path))
        finally:
            os.close(fd)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data


def _save(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: str, key: dict) -> str | None:
    """None if the entry at `path` is complete, uncorrupted and for exactly `key`; else what is wrong."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return "no readable manifest (an interrupted write)"
    if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != _canonical(key):
        return "its manifest is for a different key"
    for name in FILES:
        expected = manifest.get("files", {}).get(name, {})
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) != expected.get("bytes"):
            return f"{name} is missing or has the wrong size"
        if _sha256(file) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None
