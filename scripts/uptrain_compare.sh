#!/usr/bin/env bash
# Up-training comparison of the weights issue (docs/uptraining.md): SmolLM2-135M -> MoR (Middle-Cycle, N_r = 3,
# expert-choice, stepwise init) vs the same MoR from scratch vs the original vanilla model trained on, all for the
# same steps on the bundled Shakespeare corpus, then one plot and table of held-out loss.
# Usage: scripts/uptrain_compare.sh [OUT_DIR] [STEPS]   (needs scripts/fetch_assets.sh first)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/runs/uptrain}"
STEPS="${2:-60}"
MOR="${MOR:-$ROOT/target/release/mor}"
GGUF="$ROOT/assets/SmolLM2-135M-Instruct.Q4_1.gguf"
# One thread per run: candle's spin-barrier pool collapses when another process holds a core.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"
COMMON=(--steps "$STEPS" --seq-len 128 --batch-size 4 --eval-every 10 --eval-sequences 16 --save-every 0
        --keep-last 1 --log-every 5 --seed 0 --quiet)

mkdir -p "$OUT"
[[ -d "$OUT/smollm2" ]] || "$MOR" import --gguf "$GGUF" --out "$OUT/smollm2"
[[ -d "$OUT/data" ]] || "$MOR" prepare --tokenizer "$OUT/smollm2/tokenizer.json" --out "$OUT/data" \
    --val-fraction 0.02 "$ROOT/corpus/shakespeare.jsonl.gz"
# The MoR config the up-trained model gets, reused for the scratch run.
[[ -d "$OUT/mor-config/init" ]] || "$MOR" uptrain --from "$OUT/smollm2" --num-recursion 3 --init stepwise \
    --routing expert --init-only --data "$OUT/data" --out "$OUT/mor-config"

"$MOR" uptrain --from "$OUT/smollm2" --num-recursion 3 --init stepwise --routing expert --lr 1e-3 \
    --data "$OUT/data" --out "$OUT/mor-uptrained" "${COMMON[@]}"
"$MOR" train --config "$OUT/mor-config/init/config.json" --lr 3e-3 \
    --data "$OUT/data" --out "$OUT/mor-scratch" "${COMMON[@]}"
"$MOR" train --init-from "$OUT/smollm2" --lr 3e-4 \
    --data "$OUT/data" --out "$OUT/vanilla" "${COMMON[@]}"

"$MOR" plot --title "SmolLM2-135M up-training on Shakespeare: held-out loss" --out "$OUT/uptrain_compare.png" \
    "$OUT/vanilla=vanilla SmolLM2-135M (continued)" \
    "$OUT/mor-uptrained=MoR-3 up-trained (stepwise)" \
    "$OUT/mor-scratch=MoR-3 from scratch" | tee "$OUT/uptrain_compare.md"
