"""Time the check every image folder gets before training, on 54,000 small files (Fashion-MNIST's train size).

Writes ROOT/train/class0..9/*.png (5,400 random 28x28 grey PNGs a class, seeded) unless ROOT already holds them,
then times, in this order: `load_image_folder` (the whole check: stat, header pixel limit, two Pillow passes and
the content digest of every file), a content digest of every file alone (open + read + BLAKE2b), the old key
alone (size and mtime from os.stat) and BLAKE2b of the bytes already in memory.

    PYTHONPATH=. python scripts/time_folder_check.py /tmp/fp54k
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

import numpy as np
from PIL import Image

CLASSES, PER_CLASS, SIZE = 10, 5400, 28


def make(root: str) -> None:
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = os.path.join(root, "train", f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(PER_CLASS):
            path = os.path.join(folder, f"{i:05d}.png")
            pixels = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
            if not os.path.exists(path):
                Image.fromarray(pixels).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    root = parser.parse_args().root
    make(root)
    paths = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "train")) for f in names]

    from tfl.data.fingerprint import bytes_digest, file_digest
    from tfl.data.image_folder import load_image_folder

    start = time.perf_counter()
    splits = load_image_folder(root, log=lambda *_: None)
    print(f"load_image_folder, {sum(splits.num_examples.values())} files: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(min(32, 2 * (os.cpu_count() or 1))) as pool:
        list(pool.map(file_digest, paths))
    print(f"content digest alone (open, read, BLAKE2b), {len(paths)} files: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    print(f"size and mtime alone (the old key), {len(paths)} files: {time.perf_counter() - start:.2f} s")
    blobs = [open(p, "rb").read() for p in paths]
    start = time.perf_counter()
    for blob in blobs:
        bytes_digest(blob)
    seconds = time.perf_counter() - start
    print(f"BLAKE2b of the bytes in memory ({sum(map(len, blobs)) / 2**20:.0f} MB): {seconds:.2f} s")


if __name__ == "__main__":
    main()
