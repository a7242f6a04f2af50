#!/bin/sh
# The distillation experiment of docs/results/distill.md (Fashion-MNIST, offline). TEACHER: a `tfl finetune` run
# directory with the defaults (EfficientNet-Lite0, ImageNet weights, 112px, all 54,000 training images, 10 head +
# 2 fine-tune epochs).
set -e
TEACHER=${TEACHER:-runs/teacher-lite0}
OUT=${OUT:-runs/distill}
PY=${PY:-python}
run() { echo "+ tfl distill $*" >&2; uptime >&2; nice -n 10 $PY cli.py distill --teacher "$TEACHER" --label-fraction 0.1 "$@"; }
run --student compact_cnn --head-epochs 0 --epochs 15 --output-dir "$OUT/compact_cnn"
run --student efficientnet_lite0 --image-size 56 --output-dir "$OUT/lite0_56px"
run --born-again 1 --output-dir "$OUT/born_again"
# the same compact_cnn student with the teacher run on every batch, 3 epochs: the per-epoch cost of not caching
run --student compact_cnn --head-epochs 0 --epochs 3 --no-baseline --teacher-logits online --output-dir "$OUT/compact_cnn_online"
uptime >&2
