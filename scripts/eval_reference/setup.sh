#!/usr/bin/env bash
# Install the Python reference's dependencies into a git-ignored venv beside this script.
# Usage: scripts/eval_reference/setup.sh   (then run crosscheck.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
# Versions the recorded comparison ran with (docs/evaluation.md); gguf is llama.cpp's gguf-py.
"$here/.venv/bin/pip" install --quiet "numpy==2.4.6" "gguf==0.19.0" "tokenizers==0.23.3" "pyarrow==26.0.1"
echo "reference venv ready: $here/.venv"
