"""Regenerate tfl/assets/imagenet_labels.txt: the 1000 ImageNet-1k class names in class-index order.

Source: torchvision's `_IMAGENET_CATEGORIES` list (torchvision/models/_meta.py, BSD-3-Clause), read
as text out of the wheel and parsed with `ast`, so neither torch nor torchvision is imported:

    pip download --no-deps torchvision==0.29.1 -d /tmp/tv
    python scripts/make_imagenet_labels.py /tmp/tv/torchvision-0.29.1-*.whl
"""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

MEMBER = "torchvision/models/_meta.py"
OUT = Path(__file__).resolve().parent.parent / "tfl" / "assets" / "imagenet_labels.txt"


def read_categories(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(MEMBER).decode("utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_IMAGENET_CATEGORIES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{wheel}: {MEMBER} has no _IMAGENET_CATEGORIES list; pass a torchvision wheel >= 0.13")


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].endswith(".whl"):
        raise SystemExit("usage: make_imagenet_labels.py TORCHVISION_WHEEL (from: pip download --no-deps torchvision)")
    labels = read_categories(Path(argv[0]))
    # Index order matters: class i of every ImageNet-1k classifier head is line i.
    if len(labels) != 1000 or labels[0] != "tench" or labels[999] != "toilet tissue":
        raise SystemExit(f"unexpected category list: {len(labels)} names, first {labels[:1]}, last {labels[-1:]}")
    if any("\n" in name for name in labels):
        raise SystemExit("a category name contains a newline; the one-per-line format cannot hold it")
    OUT.write_text("\n".join(labels) + "\n", encoding="utf-8")
    print(f"wrote {len(labels)} labels to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
