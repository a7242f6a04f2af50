"""A short stable hash of what a dataset is, for cache keys. Cheap: built from metadata, never pixels."""

from __future__ import annotations

import hashlib
import json

# Bump when decoding or splitting changes what the same files turn into, so old caches stop matching.
DATA_FORMAT_VERSION = 1


def fingerprint(*parts: object) -> str:
    """16 hex chars of sha256 over the JSON form of `parts` (lists, dicts, str, numbers)."""
    payload = json.dumps([DATA_FORMAT_VERSION, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
