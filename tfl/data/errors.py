"""The one exception tfl.data raises for problems the user can fix, and how it lists many bad items."""

from __future__ import annotations

import unicodedata

from tfl.errors import UsageError
from typing import Sequence

# Characters a name cannot carry into a one-line message, labels.txt or a terminal: controls (newline, tab, escape,
# ...), line and paragraph separators, and the stand-ins Python uses for file-name bytes that are not UTF-8.
_UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})


class DataError(UsageError):
    """A dataset cannot be used as given. The message names the path or value and says how to fix it."""


def list_some(items: Sequence[str], limit: int = 20) -> str:
    """One item per indented line; past `limit`, a count of the rest (so a 10k-file problem stays readable)."""
    lines = [f"  {shown(item)}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def unprintable(text: str) -> bool:
    """True when `text` holds a control character, a line separator or a byte that is not UTF-8 (a file name's)."""
    return not text.isprintable() and any(unicodedata.category(c) in _UNPRINTABLE for c in text)


def shown(text: str) -> str:
    """`text` (a path, a file or class name) as it can be printed on one line: a byte that is not UTF-8 as \\xNN,
    a control character or line separator escaped as Python writes it (\\n, \\t, \\x1b); everything else as is."""
    if not unprintable(text):
        return text
    out = []
    for c in text:
        if unicodedata.category(c) not in _UNPRINTABLE:
            out.append(c)
        elif 0xDC80 <= ord(c) <= 0xDCFF:  # os.fsdecode's stand-in for the byte ord(c) - 0xDC00
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        else:
            out.append(repr(c)[1:-1])
    return "".join(out)
