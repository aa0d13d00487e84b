#!/usr/bin/env bash
# PyTorch side of the training comparison (docs/benchmarks.md, "Training at the 135M shape"): installs a pinned
# torch and transformers from PyPI into a venv under assets/ (once), then runs scripts/pytorch_train_step.py.
# torch from PyPI is the CUDA build on Linux and will not import without its CUDA runtime wheels (several GB, one
# time); the measurement itself runs on the CPU only.
# Usage: scripts/pytorch_train_step.sh [args of pytorch_train_step.py]   e.g. --batch 8 --seq-len 512 --steps 3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/assets/torch-venv"
TORCH=2.15.0
TRANSFORMERS=5.24.0
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import torch, transformers" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "torch==$TORCH" "transformers==$TRANSFORMERS" numpy psutil
fi
exec "$VENV/bin/python" "$ROOT/scripts/pytorch_train_step.py" "$@"
