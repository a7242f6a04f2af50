"""Make the torchvision-ResNet reference fixtures with real torch (run once, in a throwaway venv).

torchvision itself is not needed: `ResNet` below is torchvision's ResNet with BasicBlock
(torchvision/models/resnet.py) in plain torch, with the same module names, so its state_dict keys are
torchvision's (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0, fc, ...). Only the widths of
layer1..layer4 are parameters, so the fixtures can be narrow networks with the exact topology:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python scripts/make_resnet_fixtures.py [--full-width DIR]

It writes to tests/fixtures/:
- resnet18_narrow.pth (torch.save's zip layout) and resnet18_narrow_legacy.pth (the same state dict,
  `_use_new_zipfile_serialization=False`): ResNet18 topology, widths 4-8-16-32, 10 classes.
- resnet34_narrow.pth: ResNet34 topology, widths 2-4-8-16, 10 classes.
- resnet_narrow_reference.npz: `inputs_a` [1,33,47,3] and `inputs_b` [2,65,31,3] (NHWC, float32; odd sizes
  so every stride-2 layer sees odd and even extents), and `<resnet18|resnet34>_logits_<a|b>`, the eval-mode
  logits torch computes for them.
The weights are a seeded random init with the BatchNorm affine parameters randomized and running
statistics measured on random batches, then perturbed, so every BN changes the output.

--full-width DIR also writes DIR/resnet18_random.pth: a full-size (1000-class) ResNet18 state dict, randomly
initialised the same way, to try `tfl finetune --backbone resnet18 --weights DIR/resnet18_random.pth` offline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, depths, widths=(64, 128, 256, 512), num_classes=1000):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], depths[0], 1)
        self.layer2 = self._make_layer(widths[1], depths[1], 2)
        self.layer3 = self._make_layer(widths[2], depths[2], 2)
        self.layer4 = self._make_layer(widths[3], depths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomized(depths, widths, num_classes: int, seed: int) -> ResNet:
    torch.manual_seed(seed)
    model = ResNet(depths, widths, num_classes)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # cumulative average: the running stats become the batches' statistics
        model.train()
        for _ in range(4):
            model(torch.randn(8, 3, 48, 48))
        for bn in norms:
            bn.running_mean.add_(0.1 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4))
            bn.momentum = 0.1
    return model.eval()


def logits(model: ResNet, nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def check_round_trip(path: Path, state: dict) -> None:
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items()), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-width", type=Path, help="also write DIR/resnet18_random.pth (full size, 1000 classes)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    inputs = {"a": rng.standard_normal((1, 33, 47, 3)).astype(np.float32),
              "b": rng.standard_normal((2, 65, 31, 3)).astype(np.float32)}
    reference = {f"inputs_{k}": v for k, v in inputs.items()}
    nets = {
        "resnet18": randomized(DEPTHS["resnet18"], (4, 8, 16, 32), 10, seed=18),
        "resnet34": randomized(DEPTHS["resnet34"], (2, 4, 8, 16), 10, seed=34),
    }
    for name, model in nets.items():
        state = model.state_dict()
        path = FIXTURES / f"{name}_narrow.pth"
        torch.save(state, path)
        check_round_trip(path, state)
        for k, x in inputs.items():
            reference[f"{name}_logits_{k}"] = logits(model, x)
            print(f"{name} logits_{k}: shape {reference[f'{name}_logits_{k}'].shape}, "
                  f"max |logit| {np.abs(reference[f'{name}_logits_{k}']).max():.3f}")
    legacy = FIXTURES / "resnet18_narrow_legacy.pth"
    torch.save(nets["resnet18"].state_dict(), legacy, _use_new_zipfile_serialization=False)
    check_round_trip(legacy, nets["resnet18"].state_dict())
    np.savez_compressed(FIXTURES / "resnet_narrow_reference.npz", **reference)
    for name in ("resnet18_narrow.pth", "resnet18_narrow_legacy.pth", "resnet34_narrow.pth",
                 "resnet_narrow_reference.npz"):
        print(f"{name}: {(FIXTURES / name).stat().st_size} bytes")

    if args.full_width:
        args.full_width.mkdir(parents=True, exist_ok=True)
        full = args.full_width / "resnet18_random.pth"
        torch.save(randomized(DEPTHS["resnet18"], (64, 128, 256, 512), 1000, seed=0).state_dict(), full)
        print(f"{full}: {full.stat().st_size} bytes")


if __name__ == "__main__":
    main()
