"""Write reduced timm checkpoints and timm's logits for them: the references tfl's native backbones must equal.

    /work/timmvenv/bin/python scripts/make_timm_fixtures.py            # tests/fixtures/timm/<fixture>/
    /work/timmvenv/bin/python scripts/make_timm_fixtures.py --full DIR          # full-size checkpoints + timm logits
    PYTHONPATH=. .venv/bin/python scripts/make_timm_fixtures.py --compare DIR    # tfl's logits on them (no torch)

Runs in a throwaway venv with torch + timm (`python3 -m venv V && V/bin/pip install torch timm safetensors`), never
with tfl's dependencies; --compare runs in tfl's venv and imports no torch.

One function per family (`vit_fixtures`, ...), each returning Fixture rows; a family added later (ConvNeXt V2,
EfficientNetV2) adds its function to FAMILIES. Every fixture folder holds what a user would download from the Hub:
`model.safetensors` (random weights of a reduced width, drawn large enough that every parameter moves the logits)
and timm's own `config.json` (timm.models.save_config_for_hf), plus `reference.npz`: fixed inputs (already
normalised, NHWC) at the native size and at other sizes, a non-square one among them, and timm's logits for each
(`x_<h>x<w>`, `logits_<h>x<w>`). The ViTs run with dynamic_img_size=True, so other sizes resample the position
embeddings as timm does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures", "timm")
SEED = 0


@dataclasses.dataclass
class Fixture:
    folder: str  # under tests/fixtures/timm/
    architecture: str  # timm (and tfl) model name
    model_args: dict  # timm.create_model keyword arguments that shrink it
    sizes: list  # (height, width) inputs; the first is the native size


def vit_fixtures() -> list[Fixture]:
    """ViT (class token), ViT with mean pooling + fc_norm, DINOv2 (LayerScale, patch 14), DINOv2 with registers."""
    small = dict(embed_dim=16, num_heads=2, num_classes=10)
    return [
        Fixture("vit_small", "vit_small_patch16_224", dict(small, img_size=32), [(32, 32), (48, 32), (16, 32)]),
        Fixture("vit_tiny_avg", "vit_tiny_patch16_224", dict(small, img_size=32, global_pool="avg"),
                [(32, 32), (32, 48)]),
        # Native grid 4x4 (as DINOv2's 518 px), run smaller: the resampling shrinks, with torch's antialiasing.
        Fixture("vit_dinov2", "vit_small_patch14_dinov2", dict(small, img_size=56), [(56, 56), (42, 28), (28, 28)]),
        Fixture("vit_dinov2_reg4", "vit_small_patch14_reg4_dinov2", dict(small, img_size=56),
                [(56, 56), (28, 42), (28, 28)]),
    ]


FAMILIES = {"vit": vit_fixtures}


def randomise(model, torch) -> None:
    """Every parameter drawn so that it matters: norms' scales near 1, the rest O(1/sqrt(fan_in)) or O(0.5)."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim >= 2 and "embed" not in name and "token" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * noise)


def write_fixture(fixture: Fixture, out: str) -> None:
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    torch.manual_seed(SEED)
    model = timm.create_model(fixture.architecture, pretrained=False, dynamic_img_size=True, **fixture.model_args)
    model.eval()
    randomise(model, torch)
    folder = os.path.join(out, fixture.folder)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    save_config_for_hf(model, os.path.join(folder, "config.json"), model_args=fixture.model_args)
    arrays = {}
    generator = torch.Generator().manual_seed(SEED + 1)
    for h, w in fixture.sizes:
        x = torch.randn((1, 3, h, w), generator=generator)
        with torch.no_grad():
            logits = model(x)
        arrays[f"x_{h}x{w}"] = x.permute(0, 2, 3, 1).numpy()
        arrays[f"logits_{h}x{w}"] = logits.numpy()
    np.savez_compressed(os.path.join(folder, "reference.npz"), **arrays)
    print(f"{folder}: {sum(p.numel() for p in model.parameters())} parameters, sizes {fixture.sizes}")


def full_size_check(out: str) -> None:
    """Random full-size vit_small_patch16_224 (224 px) and vit_small_patch14_reg4_dinov2 (518 native, run at 224):
    state dicts, config.json and timm's logits at 224 px in `out/<name>/`, the same layout as the fixtures; tfl's
    side is --compare (docs/concepts/backbones.md gives the numbers)."""
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    for name, args in (("vit_small_patch16_224", {}), ("vit_small_patch14_reg4_dinov2", {"num_classes": 1000})):
        torch.manual_seed(SEED)
        model = timm.create_model(name, pretrained=False, dynamic_img_size=True, **args).eval()
        randomise(model, torch)  # timm's own init (LayerScale 1e-5) would leave DINOv2's blocks nearly silent
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
        save_config_for_hf(model, os.path.join(folder, "config.json"), model_args=args)
        x = torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(SEED + 1))
        with torch.no_grad():
            logits = model(x)
        np.savez(os.path.join(folder, "reference.npz"), x_224x224=x.permute(0, 2, 3, 1).numpy(),
                 logits_224x224=logits.numpy())
        print(f"{folder}: written")


def compare(out: str) -> None:
    """In tfl's venv: tfl's logits on every `out/<name>/` that full_size_check wrote, against timm's."""
    import keras

    from tfl.backbones import vit

    for name in sorted(os.listdir(out)):
        folder = os.path.join(out, name)
        reference = np.load(os.path.join(folder, "reference.npz"))
        for key in sorted(k for k in reference.files if k.startswith("x_")):
            x, expected = reference[key], reference["logits_" + key[2:]]
            model = vit.build_vit(name, x.shape[1:], os.path.join(folder, "model.safetensors"), include_top=True)
            logits = keras.ops.convert_to_numpy(model(x, training=False))
            print(f"{name} {key[2:]}: {model.count_params():,} parameters, max relative logit difference "
                  f"{np.abs(logits - expected).max() / np.abs(expected).max():.2g}")
            keras.backend.clear_session()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--full", metavar="DIR", help="write full-size random checkpoints and logits to DIR instead")
    parser.add_argument("--compare", metavar="DIR", help="in tfl's venv: compare tfl's logits with --full's")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare)
        return 0
    if args.full:
        full_size_check(args.full)
        return 0
    for family in args.family or sorted(FAMILIES):
        for fixture in FAMILIES[family]():
            write_fixture(fixture, os.path.normpath(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
