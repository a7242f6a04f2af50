"""Open an HDF5 file only after checking that reading it touches nothing outside it.

HDF5 can make a dataset's bytes come from elsewhere: soft and external links (another path, another file),
user-defined links (a plugin), external storage (raw bytes in other files), virtual datasets (slices of other
files), and filters that load plugins. A weights file needs none of these, so the whole tree is walked with
h5py's low-level link API — which reads link records, never their targets — and any of them is refused with
the object's path before a single dataset is read. The walk also refuses hard-link aliases (an object reachable
twice, which is how a cycle would look), non-numeric datasets, and files whose datasets declare far more bytes
than the file holds (a compressed or unallocated "shape bomb" that would only fail after a huge allocation).
"""

from __future__ import annotations

import math

import h5py

from tfl.checkpoints.errors import CheckpointError

SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Filters built into libhdf5 and h5py: none of them loads code from a plugin path.
_BUILTIN_FILTERS = {
    h5py.h5z.FILTER_DEFLATE: "gzip",
    h5py.h5z.FILTER_SHUFFLE: "shuffle",
    h5py.h5z.FILTER_FLETCHER32: "fletcher32",
    h5py.h5z.FILTER_SZIP: "szip",
    h5py.h5z.FILTER_NBIT: "nbit",
    h5py.h5z.FILTER_SCALEOFFSET: "scaleoffset",
    h5py.h5z.FILTER_LZF: "lzf",
}
_LINK_KINDS = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}
# Uncompressed weights declare exactly what they store; gzip'd ones rarely shrink below half. 100x is a bomb.
_MAX_EXPANSION = 100
_SMALL_FILE_ALLOWANCE = 64 * 1024 * 1024


def text(name) -> str:
    """An HDF5 link or attribute name as text. h5py gives the bytes of a name that is not UTF-8 (legal in HDF5);
    those bytes are shown escaped (`dense\\xff`), so such a file is read like any other and its names stay printable."""
    return name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else str(name)


def has_signature(head: bytes) -> bool:
    return head.startswith(SIGNATURE)


def _link_target(group: h5py.Group, name: str) -> str:
    try:
        link = group.get(name, getlink=True)
    except TypeError:  # h5py has no class for user-defined links
        return "a user-defined target"
    if isinstance(link, h5py.ExternalLink):
        return f"{link.path} in file {link.filename}"
    return getattr(link, "path", "?")


def _check_dataset(dataset: h5py.Dataset, path: str) -> None:
    if dataset.is_virtual:
        sources = sorted({source.file_name for source in dataset.virtual_sources()})
        raise _Hostile(f"dataset {path} is a virtual dataset mapping data from {', '.join(sources)}")
    if dataset.external:
        files = sorted({str(entry[0]) for entry in dataset.external})
        raise _Hostile(f"dataset {path} keeps its bytes in external file(s) {', '.join(files)}")
    plist = dataset.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(i)
        if code not in _BUILTIN_FILTERS:
            label = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
            label = f" ({label})" if label else ""
            raise _Hostile(f"dataset {path} needs HDF5 filter {code}{label}, which only a plugin provides")
    if dataset.dtype.kind not in "biufcV":
        raise _Hostile(f"dataset {path} holds {dataset.dtype} values, not numbers")


class _Hostile(Exception):
    pass


def check_tree(f: h5py.File) -> None:
    """Raise _Hostile naming the first object whose data would come from outside `f` (see module doc)."""
    seen: dict[tuple[int, int], str] = {}
    declared = 0
    pending: list[tuple[str, h5py.Group]] = [("", f)]
    while pending:
        prefix, group = pending.pop()
        for name in group.keys():  # link names only: listing a group resolves nothing
            path = f"{prefix}/{text(name)}"
            kind = group.id.links.get_info(name if isinstance(name, bytes) else name.encode("utf-8")).type
            if kind != h5py.h5l.TYPE_HARD:
                what = _LINK_KINDS.get(kind, f"a user-defined link (type {kind})")
                raise _Hostile(f"{path} is {what} to {_link_target(group, name)}")
            obj = group[name]
            info = h5py.h5o.get_info(obj.id)
            key = (info.fileno, info.addr)
            if key in seen:
                raise _Hostile(f"{path} is a second name for {seen[key]} (hard-link alias)")
            seen[key] = path
            if isinstance(obj, h5py.Group):
                pending.append((path, obj))
            elif isinstance(obj, h5py.Dataset):
                _check_dataset(obj, path)
                declared += (math.prod(obj.shape) if obj.shape is not None else 0) * obj.dtype.itemsize
    file_size = f.id.get_filesize()
    if declared > max(_SMALL_FILE_ALLOWANCE, _MAX_EXPANSION * file_size):
        raise _Hostile(
            f"its datasets declare {declared} bytes but the file holds {file_size}; refusing a likely "
            "compression or shape bomb"
        )


def open_checked(source, label: str) -> h5py.File:
    """h5py.File on a path or binary file object, already checked with check_tree; `label` names it in errors."""
    try:
        f = h5py.File(source, "r")
    except OSError as exc:
        raise CheckpointError(f"cannot read {label}: it is not a readable HDF5 file ({exc})") from None
    try:
        check_tree(f)
    except _Hostile as exc:
        f.close()
        raise CheckpointError(f"refusing to read {label}: {exc}; no tensor was read") from None
    return f
