#!/usr/bin/env python3
"""Record llama.cpp's greedy completions on the SmolLM2 F32 GGUF (llama-simple: greedy sampling, stops at the end
token) as the reference that tests/quant.rs compares mor's greedy generation against, word for word.

    scripts/build_llama_cpp.sh && scripts/llama_cpp_greedy_fixture.py
"""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMPLE = os.path.join(ROOT, "assets/peers/llama.cpp/build/bin/llama-simple")
MODEL = os.path.join(ROOT, "assets/SmolLM2-135M-Instruct.F32.gguf")
OUT = os.path.join(ROOT, "tests/data/llama_cpp/greedy_f32.json")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
N = 32

cases = []
for p in PROMPTS:
    out = subprocess.run([SIMPLE, "-m", MODEL, "-n", str(N), p], capture_output=True, text=True, check=True).stdout
    # llama-simple echoes the prompt and ends its output with one newline of its own.
    assert out.startswith(p) and out.endswith("\n"), (p, out)
    cases.append({"prompt": p, "max_tokens": N, "completion": out[len(p):-1]})
version = open(os.path.join(ROOT, "assets/peers/llama.cpp/VERSION")).read().strip()
doc = {"source": f"llama-simple from {version}, SmolLM2-135M-Instruct.F32.gguf (requantized from the shipped Q4_1)",
       "cases": cases}
with open(OUT + ".tmp", "w") as f:
    json.dump(doc, f, indent=1, ensure_ascii=False)
    f.write("\n")
os.replace(OUT + ".tmp", OUT)
print(f"wrote {os.path.relpath(OUT, ROOT)}")
