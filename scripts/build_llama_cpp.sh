#!/usr/bin/env bash
# Build llama.cpp's benchmark and serving tools from source at a pinned version, into assets/peers/llama.cpp/
# (git-ignored), and requantize the shipped SmolLM2 GGUF to the formats the benchmark compares.
#
# The llama.cpp source comes from the PyPI sdist of llama-cpp-python (a package registry), which vendors llama.cpp
# under vendor/llama.cpp; the pinned sdist pins the llama.cpp commit. Idempotent: finished steps are skipped.
#
#   scripts/build_llama_cpp.sh            # build + requantize
#   JOBS=2 scripts/build_llama_cpp.sh     # parallel compile jobs (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PEER="$ROOT/assets/peers/llama.cpp"
SRC="$PEER/src"
BUILD="$PEER/build"
BIN="$BUILD/bin"
JOBS="${JOBS:-2}"
PIP="${PIP:-pip}"
Q41="$ROOT/assets/SmolLM2-135M-Instruct.Q4_1.gguf"

mkdir -p "$PEER"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    "$PIP" download --no-binary llama-cpp-python --no-deps --quiet "llama-cpp-python==$VERSION" -d "$TMP"
    tar -xzf "$TMP"/llama_cpp_python-"$VERSION".tar.gz -C "$TMP"
    rm -rf "$SRC"
    mv "$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    echo "llama-cpp-python==$VERSION" > "$PEER/VERSION"
fi

# cmake from PyPI (pinned) into the peer folder when the machine has none.
CMAKE="$(command -v cmake || true)"
if [[ -z "$CMAKE" ]]; then
    if [[ ! -x "$PEER/venv/bin/cmake" ]]; then
        python3 -m venv "$PEER/venv"
        "$PEER/venv/bin/pip" install --quiet "cmake==3.31.6"
    fi
    CMAKE="$PEER/venv/bin/cmake"
fi

TOOLS=(llama-bench llama-batched-bench llama-server llama-quantize llama-simple llama-perplexity)
missing=0
for t in "${TOOLS[@]}"; do [[ -x "$BIN/$t" ]] || missing=1; done
if [[ $missing == 1 ]]; then
    "$CMAKE" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF > "$PEER/cmake.log"
    "$CMAKE" --build "$BUILD" -j "$JOBS" --target "${TOOLS[@]}" > "$PEER/build.log"
fi
echo "llama.cpp ($(cat "$PEER/VERSION")) tools in ${BIN#"$ROOT"/}"

if [[ ! -f "$Q41" ]]; then
    echo "assets/$(basename "$Q41") missing: run scripts/fetch_assets.sh first" >&2
    exit 1
fi
for fmt in F32 BF16 Q8_0 Q4_0 Q4_K; do
    out="$ROOT/assets/SmolLM2-135M-Instruct.$fmt.gguf"
    [[ -f "$out" ]] && continue
    # --allow-requantize: the source is already quantized (Q4_1); the F32 file is its exact dequantization.
    "$BIN/llama-quantize" --allow-requantize "$Q41" "$out.tmp" "$fmt" > "$PEER/quantize-$fmt.log" 2>&1
    mv "$out.tmp" "$out"
    echo "assets/$(basename "$out") written"
done
