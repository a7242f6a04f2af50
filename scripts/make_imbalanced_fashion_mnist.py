"""Write a long-tailed Fashion-MNIST image folder for `tfl finetune --balance` (seeded, reproducible).

Train: class c (0..9, in Fashion-MNIST's order) keeps round(MAX * RATIO ** (-c / 9)) of its training images, an
exponential profile (Cui et al. 2019): with the defaults 1,000 T-shirts down to 10 ankle boots (2,482 images).
Val: 100 other training images of every class (balanced, so the best epoch is the one with the best mean recall).
Test: the whole t10k split (1,000 per class). Folders are named <index>_<class> so the class order is the
dataset's. PNG, RGB (the grey value repeated), 28x28.

    python scripts/make_imbalanced_fashion_mnist.py --out /tmp/fmnist_lt [--max 1000 --ratio 100 --seed 0]
    tfl finetune --dataset /tmp/fmnist_lt --image-size 64 --epochs 0 --balance loss
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

NAMES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
VAL_PER_CLASS = 100


def counts(max_per_class: int, ratio: float, classes: int = 10) -> list[int]:
    return [max(1, int(np.floor(max_per_class * ratio ** (-c / (classes - 1)) + 0.5))) for c in range(classes)]


def read(idx_dir: str):
    from tfl.data.idx import read_idx

    def one(name):
        path = os.path.join(idx_dir, name)
        return read_idx(path if os.path.exists(path) else path + ".gz")

    return (one("train-images-idx3-ubyte"), one("train-labels-idx1-ubyte"), one("t10k-images-idx3-ubyte"),
            one("t10k-labels-idx1-ubyte"))


def write(out: str, split: str, images, labels) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(out, split, f"{int(label)}_{NAMES[int(label)]}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.repeat(image[..., None], 3, axis=2)).save(os.path.join(folder, f"{i:05d}.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--max", type=int, default=1000, help="training images of class 0")
    parser.add_argument("--ratio", type=float, default=100.0, help="class 0's count / class 9's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"--out {args.out} is not empty")
    x, y, xt, yt = read(args.idx_dir)
    rng = np.random.default_rng(args.seed)
    train, val = [], []
    for c, n in enumerate(counts(args.max, args.ratio)):
        members = rng.permutation(np.flatnonzero(y == c))
        val.append(members[:VAL_PER_CLASS])
        train.append(members[VAL_PER_CLASS: VAL_PER_CLASS + n])
    train, val = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    write(args.out, "train", x[train], y[train])
    write(args.out, "val", x[val], y[val])
    write(args.out, "test", xt, yt)
    manifest = {"max": args.max, "ratio": args.ratio, "seed": args.seed,
                "train_per_class": dict(zip(NAMES, counts(args.max, args.ratio))), "val_per_class": VAL_PER_CLASS,
                "test": "t10k, all 10,000"}
    with open(os.path.join(args.out, "imbalance.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
