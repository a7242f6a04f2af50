"""Write tests/fixtures/timm/: small random-weight timm ConvNeXt V2 and tf_EfficientNetV2 checkpoints and timm's logits.

Needs torch + timm + safetensors, which are never tfl dependencies: run it in a throwaway venv,

    python3 -m venv /tmp/timmvenv && /tmp/timmvenv/bin/pip install torch timm safetensors
    /tmp/timmvenv/bin/python scripts/make_timm_fixtures_cnn.py

Each fixture is a reduced-width/depth model of the family's real topology, saved with timm's own `save_for_hf`
(model.safetensors or pytorch_model.bin, and config.json with the `model_args` that rebuild it), every weight and
BatchNorm statistic random (GRN's zero-initialised gamma/beta too, so the test sees GRN act). The logits are
timm's, in eval mode, on fixed NHWC inputs of a square and an odd non-square size (TF "same" padding and the
ConvNeXt stem's floor both show at odd sizes), in cnn_reference.npz.

    /tmp/timmvenv/bin/python scripts/make_timm_fixtures_cnn.py --full convnextv2_tiny --out /tmp/full

writes a full-size random-init model the same way (not committed), with timm's logits at 224x224 and 229x203, for
the by-hand full-size check (docs/checkpoints.md shows the commands and the max difference).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import timm
import torch
from timm.models._hub import save_for_hf

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "timm")
# name -> (timm model, model_args, file format)
FIXTURES = {
    # atto..nano use 1x1 convs in the MLP (conv_mlp=True), tiny/base Linear layers: one of each layout.
    "convnextv2_atto": ("convnextv2_atto", dict(depths=(1, 1, 2, 1), dims=(8, 16, 16, 24)), "safetensors"),
    "convnextv2_tiny": ("convnextv2_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16)), "bin"),
    # depth 0.3 / 0.1 keep 2-3 blocks in the last groups, so the residuals of er/ir blocks are used; width 0.1
    # leaves 8-16 channels (128 head features).
    "tf_efficientnetv2_b0": ("tf_efficientnetv2_b0", dict(channel_multiplier=0.1, depth_multiplier=0.3),
                             "safetensors"),
    "tf_efficientnetv2_s": ("tf_efficientnetv2_s", dict(channel_multiplier=0.1, depth_multiplier=0.1),
                            "safetensors"),
}
NUM_CLASSES = 10
SIZES = {"square": (48, 48), "odd": (45, 37)}  # (height, width); the same inputs for every model


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter and BN statistic random, on a scale that keeps activations O(1)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("running_mean", ".bias")) or tensor.ndim == 1:
                base = 1.0 if name.endswith("weight") and "grn" not in name else 0.0
                tensor.copy_(base + 0.2 * torch.randn(tensor.shape, generator=generator))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5)


def make(name: str, timm_name: str, model_args: dict, fmt: str, out: str, generator, num_classes: int,
         inputs: dict) -> dict:
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **model_args).eval()
    randomise(model, generator)
    directory = os.path.join(out, name)
    save_for_hf(model, directory, model_args=model_args, safe_serialization=fmt == "safetensors")
    logits = {}
    for key, x in inputs.items():
        with torch.no_grad():
            logits[f"{name}_logits_{key}"] = model(x).numpy()
    return logits


def make_inputs(generator, sizes: dict) -> dict:
    return {key: torch.randn((2, 3, h, w), generator=generator) for key, (h, w) in sizes.items()}


def nhwc(inputs: dict) -> dict:
    return {f"inputs_{key}": x.permute(0, 2, 3, 1).numpy() for key, x in inputs.items()}  # NHWC for Keras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", help="a timm model name: write it at full size, random init, into --out")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if args.full:
        inputs = make_inputs(generator, {"square": (224, 224), "odd": (229, 203)})
        arrays = make(args.full, args.full, {}, "safetensors", args.out, generator, 1000, inputs)
        np.savez(os.path.join(args.out, f"{args.full}_reference.npz"), **arrays, **nhwc(inputs))
        return
    inputs = make_inputs(generator, SIZES)
    arrays = nhwc(inputs)
    for name, (timm_name, model_args, fmt) in FIXTURES.items():
        arrays.update(make(name, timm_name, model_args, fmt, args.out, generator, NUM_CLASSES, inputs))
    np.savez_compressed(os.path.join(args.out, "cnn_reference.npz"), **arrays)
    print("timm", timm.__version__, "torch", torch.__version__, "->", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
