"""The by-hand full-size check: tfl's native backbone against timm's logits for a full-size random-init model.

    /tmp/timmvenv/bin/python scripts/make_timm_fixtures_cnn.py --full convnextv2_tiny --out /tmp/full
    PYTHONPATH=. .venv/bin/python scripts/check_timm_full_size.py convnextv2_tiny /tmp/full

prints the parameter count and the max relative logit difference at 224x224 and 229x203.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from tfl.backbones import registry


def main(name: str, folder: str) -> None:
    reference = np.load(os.path.join(folder, f"{name}_reference.npz"))
    model = registry.get(name).build((None, None, 3), os.path.join(folder, name, "model.safetensors"), True)
    print(f"{name}: {model.count_params():,} parameters")
    for key in ("square", "odd"):
        x, ref = reference[f"inputs_{key}"], reference[f"{name}_logits_{key}"]
        out = model.predict(x, batch_size=1, verbose=0)
        print(f"  {key} {x.shape[1]}x{x.shape[2]}: max relative difference "
              f"{np.abs(out - ref).max() / np.abs(ref).max():.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
