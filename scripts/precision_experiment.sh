#!/bin/bash
# float32 vs bfloat16 (--mixed-precision off / on): accuracy and time, as reported in docs/benchmarks.md.
# 1. A ResNet run (random init: no ResNet ImageNet weights are available offline).
# 2. The embedded default, head only (frozen EfficientNet-Lite0 features + a new head).
# Usage: bash scripts/precision_experiment.sh [OUT_ROOT]   (default runs/precision); about 25 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/precision}
py=${PYTHON:-.venv/bin/python}
for p in off on; do
  $py cli.py finetune --backbone resnet18 --weights none --image-size 64 --limit-train 10000 --freeze-up-to none \
    --head-epochs 1 --epochs 4 --backbone-lr 1e-3 --mixed-precision $p --seed 0 --no-tensorboard \
    --output-dir "$out/resnet18-$p"
done
for p in off on; do
  $py cli.py finetune --epochs 0 --mixed-precision $p --seed 0 --no-tensorboard --output-dir "$out/lite0-head-$p"
done
for run in "$out"/*; do
  printf '%-28s %s\n' "$(basename "$run")" "$($py -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['test_accuracy'], m['train_seconds'], 's')" "$run/metrics.json")"
done
