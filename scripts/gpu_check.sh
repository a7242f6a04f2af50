#!/bin/sh
# The GPU check: GPU-only tests (float16 with loss scaling, bfloat16 from compute capability 8.0, MirroredStrategy
# over every visible GPU), `tfl bench` cases on the GPU and the seeds' experiment at reduced size (ResNet18 with
# ImageNet weights -> CIFAR-10 at 224 px: the head for 3 epochs, then the last two stages), printed as one table.
#
#   scripts/gpu_check.sh [--limit-train N] [--work DIR] [--json FILE]   on a machine with an NVIDIA GPU
#   scripts/gpu_check.sh --cpu                                          the same path on the CPU at tiny size
#
# Exit 0: all passed; 1: a test, the bench or the experiment failed; 2: no GPU visible to TensorFlow.
# Python: $PYTHON, else the checkout's .venv, else python3. What it runs: scripts/gpu_check.py; docs/developing.md.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
case " $* " in
  *" --cpu "*) ;;
  *) if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L >&2 || true
     else echo "gpu_check: no nvidia-smi on PATH; TensorFlow decides whether it sees a GPU" >&2; fi ;;
esac
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
