"""Peak memory, disk written and epoch time of `tfl finetune` on folders of 224 px JPEGs, streamed vs kept
(--decoded-images stream | keep): the table in docs/concepts/caching.md.

    nice -n 19 .venv/bin/python scripts/stream_measure.py --sizes 2000,8000 --work /tmp/stream-measure

For each size it writes ROOT/train/<class>/*.jpg once (seeded: 224 px crops of scikit-image's sample photos, one
class per photo, random position, scale and mirror; `pip install scikit-image`), then runs

    /usr/bin/time -v tfl finetune --dataset ROOT --decoded-images MODE --backbone compact_cnn --weights none
        --image-size 224 --head-epochs 2 (--epochs) --epochs 0 --cache off --cache-dir CACHE --output-dir RUN ...

for each mode: the head trains on the frozen backbone, which runs on the images every epoch (--cache off), so
every epoch reads the images. Peak RSS is /usr/bin/time's "Maximum resident set size"; disk written is `du` of the
cache directory and of the run directory afterwards (nothing else is written); epoch time is history.csv's
seconds of epoch 1 (kept: includes decoding every image once) and epoch 2.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 224
RUN_ARGS = ["--backbone", "compact_cnn", "--weights", "none", "--image-size", str(SIZE),
            "--epochs", "0", "--cache", "off", "--batch-size", "64", "--no-tensorboard", "--seed", "0"]


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}


def make_folder(root: str, count: int, seed: int = 0) -> str:
    """`count` 224 px JPEGs under root/train/<photo>/, made once (a finished folder has root/.done)."""
    if os.path.exists(os.path.join(root, ".done")):
        return root
    shutil.rmtree(root, ignore_errors=True)
    sources = photos()
    rng = np.random.default_rng(seed)
    names = sorted(sources)
    for name in names:
        os.makedirs(os.path.join(root, "train", name))
    for i in range(count):
        name = names[i % len(names)]
        photo = sources[name]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top: top + side, left: left + side]).resize((SIZE, SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(os.path.join(root, "train", name, f"{i:06d}.jpg"), quality=90)
    open(os.path.join(root, ".done"), "w").close()
    return root


def du(path: str) -> int:
    if not os.path.exists(path):
        return 0
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(folder: str, mode: str, work: str, epochs: int = 2) -> dict:
    out, cache = os.path.join(work, f"run-{mode}"), os.path.join(work, f"cache-{mode}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    command = ["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "cli.py"), "finetune", "--dataset", folder,
               *RUN_ARGS, "--head-epochs", str(epochs), "--decoded-images", mode, "--cache-dir", cache,
               "--output-dir", out]
    env = {**os.environ, "TFL_MIXED_PRECISION": "off", "TFL_CACHE_DIR": cache}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    with open(os.path.join(out, "history.csv")) as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    images = [line for line in done.stdout.splitlines() if line.startswith("images: train")]
    return {"mode": mode, "peak_rss_mb": peak_kb / 1024, "cache_mb": du(cache) / 2**20, "run_mb": du(out) / 2**20,
            "epoch_s": seconds, "wall_s": wall, "images": images[0] if images else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,8000", help="comma-separated image counts")
    parser.add_argument("--work", default="/tmp/stream-measure", help="folders, runs and caches go here")
    parser.add_argument("--modes", default="stream,keep")
    parser.add_argument("--epochs", type=int, default=2, help="--head-epochs of each run")
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    rows = []
    for count in (int(n) for n in args.sizes.split(",")):
        folder = make_folder(os.path.join(args.work, f"jpegs-{count}"), count)
        jpeg_mb = du(os.path.join(folder, "train")) / 2**20
        for mode in args.modes.split(","):
            result = run(folder, mode, os.path.join(args.work, f"n{count}"), args.epochs)
            rows.append({"count": count, "jpeg_mb": jpeg_mb, **result})
            print(f"{count} {mode}: {result}", flush=True)
    lines = ["| JPEGs (MB) | --decoded-images | peak RSS | disk written: cache dir | run dir | epoch 1 | epoch 2 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        epochs = [f"{s:.0f} s" for s in r["epoch_s"]] + ["-", "-"]
        lines.append(f"| {r['count']:,} ({r['jpeg_mb']:.0f} MB) | {r['mode']} | {r['peak_rss_mb']:,.0f} MB | "
                     f"{r['cache_mb']:,.0f} MB | {r['run_mb']:.1f} MB | {epochs[0]} | {epochs[1]} |")
    table = "\n".join(lines)
    print(table)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
