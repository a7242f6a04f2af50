"""Results printed for people: rows under titled columns, each command declaring its columns as data.

    TABLE = (Column("arm", "arm"), Column("test accuracy", "test_accuracy", ".4f"), Column("wall s", "seconds", ".1f"))
    print(format_table(TABLE, rows))

The first column is left-aligned, the others right-aligned, each as wide as its widest cell; a missing value prints
as "-". `--json` prints the result itself instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    value: str | Callable[[dict], object]  # the row's key, or a function of the row
    fmt: str = ""  # the value's format spec (".4f", ",", "g"); "": str()

    def cell(self, row: dict) -> str:
        value = row.get(self.value) if isinstance(self.value, str) else self.value(row)
        if value is None:
            return "-"
        return format(value, self.fmt) if self.fmt else str(value)


def format_table(columns: Iterable[Column], rows: Iterable[dict], notes: Iterable[str] = ()) -> str:
    """The table of `rows`, then the `notes` lines."""
    columns = list(columns)
    cells = [[column.cell(row) for column in columns] for row in rows]
    widths = [max([len(column.title), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line([column.title for column in columns]), *map(line, cells), *notes])
