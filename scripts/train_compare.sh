#!/usr/bin/env bash
# Training comparison at the SmolLM-135M shape (docs/benchmarks.md, "Training at the 135M shape"): mor's vanilla
# and MoR-3 presets against PyTorch (HF LlamaForCausalLM, scripts/pytorch_train_step.py) at the same batch,
# interleaved round by round, one process per run so each peak RSS is its own; `uptime` before every run.
# Usage: scripts/train_compare.sh [ROUNDS] [STEPS] [BATCH] [SEQ_LEN] [MOR_FLAGS...]
#   e.g. scripts/train_compare.sh 2 2 8 512            (needs `cargo build --release` first)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${1:-2}"
STEPS="${2:-2}"
BATCH="${3:-8}"
SEQ="${4:-512}"
shift $(( $# < 4 ? $# : 4 ))
MOR="${MOR:-$ROOT/target/release/mor}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
grep -m1 'model name' /proc/cpuinfo
for r in $(seq 1 "$ROUNDS"); do
    for run in smollm-135m-vanilla pytorch smollm-135m-mor-expert-3; do
        echo "== round $r: $run; $(uptime)"
        if [[ $run == pytorch ]]; then
            "$ROOT/scripts/pytorch_train_step.sh" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --threads 2
        else
            "$MOR" bench train --preset "$run" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --rounds 1 "$@"
        fi
    done
done
echo "== done; $(uptime)"
