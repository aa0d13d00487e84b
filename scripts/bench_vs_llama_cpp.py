#!/usr/bin/env python3
"""mor against llama.cpp on the same SmolLM2 GGUF files, the same thread count, interleaved in one run.

Needs scripts/fetch_assets.sh, scripts/build_llama_cpp.sh (llama.cpp tools and the requantized files) and a release
build of mor (cargo build --release). For each round and each format, in alternating order: llama-bench
(pp PROMPT, tg GEN, one repetition) and `mor bench model` (batch 1), then llama-batched-bench and
`mor bench model --decode-from-prompt` at the batch size given (prefill of B prompts, then B sequences decoding).
Each run's peak RSS comes from wait4; the load average is recorded before each run. Prints a markdown table of
medians and ratios (mor / llama.cpp) and writes every measurement as JSON lines to --out.

    scripts/bench_vs_llama_cpp.py --rounds 3 --threads 2 --out runs/bench_vs_llama_cpp.jsonl
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "assets/peers/llama.cpp/build/bin")
MOR = os.path.join(ROOT, "target/release/mor")
FILES = {f: os.path.join(ROOT, f"assets/SmolLM2-135M-Instruct.{f}.gguf") for f in ["F32", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K"]}


def load():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def run_rss(cmd):
    """Run cmd and return (stdout, peak RSS MiB of that child, load before)."""
    before = load()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(r)
        os.execv(cmd[0], cmd)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, ru = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed ({status})")
    return b"".join(chunks).decode(), ru.ru_maxrss / 1024.0, before


def llama_bench(path, threads, pp, tg):
    out, rss, ld = run_rss([os.path.join(BIN, "llama-bench"), "-m", path, "-p", str(pp), "-n", str(tg),
                            "-t", str(threads), "-r", "1", "-o", "json"])
    res = json.loads(out)
    get = lambda kind: next(x["avg_ts"] for x in res if (x["n_prompt"] > 0) == (kind == "pp"))
    return {"pp": get("pp"), "tg": get("tg"), "rss": rss, "load": ld}


def llama_batched(path, threads, pp, tg, b):
    ctx = b * (pp + tg) + 256
    out, rss, ld = run_rss([os.path.join(BIN, "llama-batched-bench"), "-m", path, "-c", str(ctx), "-b", "2048",
                            "-ub", "512", "-npp", str(pp), "-ntg", str(tg), "-npl", str(b), "-t", str(threads)])
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] == str(pp) and cells[2] == str(b):
            return {"pp": float(cells[5]), "tg": float(cells[7]), "rss": rss, "load": ld}
    sys.exit(f"no result row in llama-batched-bench output:\n{out[-2000:]}")


def mor_bench(path, fmt, threads, pp, tg, b, from_prompt):
    cmd = [MOR, "bench", "model", "--model", path, "--threads", str(threads), "--prompt-len", str(pp),
           "--gen-len", str(tg), "--batch", str(b), "--reps", "1", "--json"]
    if fmt == "BF16":
        cmd += ["--dtype", "bf16"]  # mor reads the file's bf16 values and keeps them bf16 for the engine
    elif fmt != "F32":
        cmd.append("--quantized")
    if from_prompt:
        cmd.append("--decode-from-prompt")
    out, rss, ld = run_rss(cmd)
    j = json.loads(out.strip().splitlines()[-1])
    return {"pp": j["pp_tokens_per_s"], "tg": j["tg_tokens_per_s"], "rss": rss, "load": ld,
            "precision": j["precision"], "cpu": j["cpu"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched comparison (0: skip)")
    ap.add_argument("--batched-prompt-len", type=int, default=128)
    ap.add_argument("--formats", default="F32,BF16,Q8_0,Q4_0,Q4_1,Q4_K")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs/bench_vs_llama_cpp.jsonl"))
    a = ap.parse_args()
    fmts = [f for f in a.formats.split(",") if os.path.exists(FILES[f])]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    version = open(os.path.join(ROOT, "assets/peers/llama.cpp/VERSION")).read().strip()
    print(f"cpu: {cpu}; threads {a.threads}; llama.cpp from {version}; start load {load()}", flush=True)
    rows = []
    with open(a.out + ".tmp", "w") as log:
        for rnd in range(a.rounds):
            for i, fmt in enumerate(fmts):
                path = FILES[fmt]
                jobs = [("llama.cpp", 1, lambda: llama_bench(path, a.threads, a.prompt_len, a.gen_len)),
                        ("mor", 1, lambda: mor_bench(path, fmt, a.threads, a.prompt_len, a.gen_len, 1, False))]
                if a.batch > 1:
                    jobs += [("llama.cpp", a.batch, lambda: llama_batched(path, a.threads, a.batched_prompt_len,
                                                                         a.gen_len, a.batch)),
                             ("mor", a.batch, lambda: mor_bench(path, fmt, a.threads, a.batched_prompt_len,
                                                                a.gen_len, a.batch, True))]
                if (rnd + i) % 2 == 1:
                    jobs = [jobs[k ^ 1] for k in range(len(jobs))]
                for engine, b, job in jobs:
                    r = job()
                    r.update(engine=engine, format=fmt, batch=b, round=rnd, threads=a.threads, time=time.time())
                    rows.append(r)
                    log.write(json.dumps(r) + "\n")
                    log.flush()
                    print(f"round {rnd} {fmt} {engine} B={b}: pp {r['pp']:.1f} tg {r['tg']:.1f} t/s, "
                          f"rss {r['rss']:.0f} MiB, load {r['load'][0]:.2f}", flush=True)
    os.replace(a.out + ".tmp", a.out)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print(f"\nend load {load()}; medians over {a.rounds} rounds")
    print("| format | batch | llama.cpp pp | mor pp | ratio | llama.cpp tg | mor tg | ratio | llama.cpp RSS MiB | mor RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt in fmts:
        for b in sorted({r["batch"] for r in rows}):
            sel = lambda e, k: [r[k] for r in rows if r["format"] == fmt and r["batch"] == b and r["engine"] == e]
            lp, mp = med(sel("llama.cpp", "pp")), med(sel("mor", "pp"))
            lt, mt = med(sel("llama.cpp", "tg")), med(sel("mor", "tg"))
            lr, mr = med(sel("llama.cpp", "rss")), med(sel("mor", "rss"))
            print(f"| {fmt} | {b} | {lp:.1f} | {mp:.1f} | {mp / lp:.2f}x | {lt:.1f} | {mt:.1f} | {mt / lt:.2f}x "
                  f"| {lr:.0f} | {mr:.0f} |")


if __name__ == "__main__":
    main()
