#!/usr/bin/env bash
# The official openai Python client (from PyPI) against `mor serve` with SmolLM2-135M-Instruct: models list, a
# completion, a streamed chat completion (== the non-streamed one), error cases. Skips (exit 0, with a message) when
# pip cannot install the client or the GGUF is absent (scripts/fetch_assets.sh fetches it).
# Usage: scripts/openai_client_check.sh [extra mor serve flags, e.g. --quantized]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GGUF="$ROOT/assets/SmolLM2-135M-Instruct.Q4_1.gguf"
MOR="${MOR:-$ROOT/target/release/mor}"
PORT="${PORT:-18431}"
VENV="$ROOT/target/openai-venv"

if [[ ! -f "$GGUF" ]]; then
    echo "SKIP: $GGUF is absent (run scripts/fetch_assets.sh)"
    exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    if ! python3 -m venv "$VENV" || ! "$VENV/bin/pip" install --quiet "openai>=1.40,<3"; then
        echo "SKIP: cannot install the openai client with pip"
        rm -rf "$VENV"
        exit 0
    fi
fi
[[ -x "$MOR" ]] || (cd "$ROOT" && cargo build --release --bin mor)

"$MOR" serve --model "$GGUF" --port "$PORT" --served-model-name smollm2 "$@" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.5
done
"$VENV/bin/python" "$ROOT/scripts/openai_client_check.py" "http://127.0.0.1:$PORT/v1" smollm2
kill -INT $PID
wait $PID
echo "mor serve exited $?"
