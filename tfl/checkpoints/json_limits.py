"""json.loads with a bound on nesting, for JSON that comes from a file: `[[[[...]]]]` a million deep is a few MB
and would otherwise surface as a RecursionError traceback from the parser or from the code that walks the result."""

from __future__ import annotations

from tfl.errors import UsageError
import json


class JSONTooDeep(UsageError):
    """The JSON nests deeper than allowed; str() says how deep and the limit."""


def loads_bounded(raw: str | bytes, max_depth: int, **kwargs):
    """json.loads(raw, **kwargs), refusing arrays/objects nested more than `max_depth` levels (JSONTooDeep)."""
    try:
        value = json.loads(raw, **kwargs)
    except RecursionError:
        raise JSONTooDeep(f"it nests arrays/objects deeper than the parser can follow (the limit is {max_depth} "
                          "levels)") from None
    depth = nesting_depth(value, max_depth)
    if depth > max_depth:
        raise JSONTooDeep(f"it nests arrays/objects more than {max_depth} levels deep") from None
    return value


def nesting_depth(value, stop_after: int) -> int:
    """Levels of list/dict nesting in a parsed JSON value (0 for a scalar), counted without recursion; counting
    ends once past `stop_after`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth)
            if deepest > stop_after:
                return deepest
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest
