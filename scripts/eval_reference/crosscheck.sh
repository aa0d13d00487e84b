#!/usr/bin/env bash
# Cross-check mor's evaluation against the independent numpy reference on SmolLM2-135M-Instruct (Q4_1 GGUF).
#
#   scripts/eval_reference/crosscheck.sh tasks [LIMIT]   # mor eval tasks vs reference.py tasks, table per task
#   scripts/eval_reference/crosscheck.sh logits          # mor's logits and mor's GGUF export vs the reference
#
# Needs: cargo build --release, scripts/fetch_assets.sh, scripts/fetch_eval_data.sh, scripts/eval_reference/setup.sh.
# Outputs go to runs/evalref/ (git-ignored). Long runs use one thread each, as the machine may be shared.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-tasks}"
limit="${2:-300}"
mor="${MOR:-target/release/mor}"
py="scripts/eval_reference/.venv/bin/python"
gguf="assets/SmolLM2-135M-Instruct.Q4_1.gguf"
out="runs/evalref"
ckpt="$out/smollm2"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
for f in "$mor" "$py" "$gguf"; do
  [ -e "$f" ] || { echo "missing $f (see the header of $0)" >&2; exit 1; }
done
mkdir -p "$out"
[ -f "$ckpt/config.json" ] || "$mor" import --gguf "$gguf" --out "$ckpt"

stamp() { echo "[$(date -u +%H:%M:%S)] $*; $(uptime | sed 's/.*load average/load average/')"; }

case "$mode" in
  tasks)
    stamp "mor eval tasks --limit $limit"
    t0=$(date +%s)
    "$mor" eval tasks --checkpoint "$ckpt" --tasks all --shots 0 --limit "$limit" --quiet \
      --out "$out/mor" --dump-examples "$out/mor-$limit.jsonl"
    t1=$(date +%s)
    stamp "mor took $((t1 - t0)) s; reference.py tasks --limit $limit"
    "$py" scripts/eval_reference/reference.py tasks --gguf "$gguf" --limit "$limit" \
      --dump "$out/ref-$limit.jsonl" --out "$out/ref-$limit.json" --progress
    t2=$(date +%s)
    stamp "reference took $((t2 - t1)) s"
    "$py" scripts/eval_reference/compare.py "$out/mor-$limit.jsonl" "$out/ref-$limit.jsonl" | tee "$out/compare-$limit.md"
    ;;
  logits)
    prompts=("The capital of France is"
      "Once upon a time, there was a little girl who"
      $'def fibonacci(n):\n    if n < 2:\n        return n\n    return'
      "In 1905, Albert Einstein published four papers that")
    args=()
    for p in "${prompts[@]}"; do args+=(--prompt "$p"); done
    "$mor" eval logits --checkpoint "$ckpt" --out "$out/mor" "${args[@]}"
    "$mor" export --checkpoint "$ckpt" --format gguf --out "$out/smollm2-export.gguf"
    "$py" scripts/eval_reference/reference.py logits --gguf "$gguf" "${args[@]}" \
      --compare-gguf "$out/smollm2-export.gguf" --compare-mor "$out/mor/logits" --sensitivity --tolerance 1e-3
    ;;
  *)
    echo "usage: $0 tasks [LIMIT] | logits" >&2
    exit 2
    ;;
esac
