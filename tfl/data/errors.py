"""The one exception tfl.data raises for problems the user can fix, and how it lists many bad items."""

from __future__ import annotations

from tfl.errors import UsageError
from typing import Sequence


class DataError(UsageError):
    """A dataset cannot be used as given. The message names the path or value and says how to fix it."""


def list_some(items: Sequence[str], limit: int = 20) -> str:
    """One item per indented line; past `limit`, a count of the rest (so a 10k-file problem stays readable)."""
    lines = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)
