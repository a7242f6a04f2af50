"""A short stable hash of what a dataset is, for cache keys and the resume check.

Image files are identified by their content (file_digest: a hash of every byte), not by size and modification
time: a copy that keeps both (`cp -p`, `rsync -a`, `tar -x`) can carry other pixels, and a cache or a resumed run
keyed by them would silently train on the old ones. Hashing is cheap next to the decode check every file gets
before training anyway (docs/concepts/caching.md has the measurement).
"""

from __future__ import annotations

import hashlib
import json

# Bump when decoding or splitting changes what the same files turn into, so old caches stop matching.
DATA_FORMAT_VERSION = 1
_CHUNK = 1 << 20


def fingerprint(*parts: object) -> str:
    """16 hex chars of sha256 over the JSON form of `parts` (lists, dicts, str, numbers)."""
    payload = json.dumps([DATA_FORMAT_VERSION, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def bytes_digest(data: bytes) -> str:
    """file_digest of a file whose bytes are `data`."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: str | bytes) -> str:
    """32 hex chars of BLAKE2b over the file's bytes (read in 1 MB pieces; the GIL is released while hashing)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
