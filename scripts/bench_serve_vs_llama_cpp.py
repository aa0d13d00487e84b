#!/usr/bin/env python3
"""`mor serve` against llama.cpp's `llama-server` on the same SmolLM2 GGUF files, interleaved in one run.

Needs scripts/fetch_assets.sh, scripts/build_llama_cpp.sh (llama-server and the requantized files) and a release
build of mor (cargo build --release). For each round and format, in alternating order: llama-server started with
`-np SLOTS -t THREADS` and loaded by `mor bench serve --url ... --server-pid PID` (then stopped), and `mor bench serve
--model FILE [--quantized] --max-batch SLOTS` (mor serve in process, same load generator, same engine thread count).
Both see the same workload: random prompts, streamed completions with `ignore_eos`, lengths uniform in mean × [0.5,
1.5]. Prints a markdown table of medians over rounds and ratios (mor / llama-server) and writes every report as JSON
lines to --out.

    scripts/bench_serve_vs_llama_cpp.py --rounds 3 --formats Q8_0,F32 --clients 1,8 --slots 8
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "assets/peers/llama.cpp/build/bin/llama-server")
MOR = os.path.join(ROOT, "target/release/mor")


def gguf(fmt):
    return os.path.join(ROOT, f"assets/SmolLM2-135M-Instruct.{fmt}.gguf")


def load():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(args, extra):
    cmd = [MOR, "bench", "serve", "--clients", args.clients, "--requests", str(args.requests), "--prompt-tokens",
           str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--json"] + extra
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)))
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:] or ["(no output)"]
        sys.exit(f"mor bench serve failed (exit {r.returncode}): {tail[0]}")
    out = r.stdout
    return [run for line in out.splitlines() if line.startswith("{") for run in json.loads(line)["runs"]]


def llama_server(args, fmt):
    port = free_port()
    ctx = args.slots * (2 * (args.prompt_tokens + args.new_tokens) + 64)
    proc = subprocess.Popen([SERVER, "-m", gguf(fmt), "-np", str(args.slots), "-t", str(args.threads), "-c",
                             str(ctx), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"llama-server did not come up (exit {proc.poll()})")
            time.sleep(0.2)
        return bench_serve(args, ["--url", f"http://127.0.0.1:{port}", "--server-pid", str(proc.pid)])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def mor_serve(args, fmt):
    extra = ["--model", gguf(fmt), "--max-batch", str(args.slots)]
    return bench_serve(args, extra + ([] if fmt in ("F32", "BF16") else ["--quantized"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--formats", default="Q8_0,F32")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=os.path.join(ROOT, "runs/bench_serve_vs_llama_cpp.jsonl"))
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    formats = args.formats.split(",")
    for tool, hint in [(SERVER, "scripts/build_llama_cpp.sh"), (MOR, "cargo build --release")]:
        if not os.access(tool, os.X_OK):
            sys.exit(f"{tool} missing: run {hint}")
    if args.rounds < 1 or args.slots < 1 or args.threads < 1 or args.requests < 1:
        sys.exit("--rounds, --slots, --threads and --requests must be at least 1")
    for fmt in formats:
        if not os.path.exists(gguf(fmt)):
            sys.exit(f"{gguf(fmt)} missing: run scripts/fetch_assets.sh and scripts/build_llama_cpp.sh")
    results = {}  # (fmt, server, clients) -> list of run reports
    with open(args.out, "a") as out:
        for rnd in range(args.rounds):
            for i, fmt in enumerate(formats):
                order = [("llama-server", llama_server), ("mor serve", mor_serve)]
                if (rnd + i) % 2:
                    order.reverse()
                for name, run in order:
                    before = load()
                    for r in run(args, fmt):
                        r.update(round=rnd, format=fmt, server=name, load_before=before)
                        out.write(json.dumps(r) + "\n")
                        results.setdefault((fmt, name, r["clients"]), []).append(r)
                        print(f"round {rnd + 1} {fmt} {name} clients {r['clients']}: "
                              f"{r['tokens_per_sec']:.1f} tok/s, ok {r['ok']}, failed {r['failed']}, "
                              f"load {before:.2f}", file=sys.stderr)

    med = lambda runs, f: statistics.median(f(r) for r in runs)
    print("| format | server | clients | tokens/s (rounds) | ratio | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
          "| latency p99 (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    servers = ["llama-server", "mor serve"]
    for (fmt, name, clients), runs in sorted(results.items(), key=lambda kv: (formats.index(kv[0][0]), kv[0][2],
                                                                              servers.index(kv[0][1]))):
        base = results[(fmt, "llama-server", clients)]
        tps = med(runs, lambda r: r["tokens_per_sec"])
        each = ", ".join(f"{r['tokens_per_sec']:.1f}" for r in runs)
        ratio = tps / med(base, lambda r: r["tokens_per_sec"])
        print(f"| {fmt} | {name} | {clients} | {tps:.1f} ({each}) | {ratio:.2f}× "
              f"| {med(runs, lambda r: r['ttft'][0]):.3f} / {med(runs, lambda r: r['ttft'][1]):.3f} "
              f"| {1e3 * med(runs, lambda r: r['tpot'][0]):.1f} / {1e3 * med(runs, lambda r: r['tpot'][1]):.1f} "
              f"| {med(runs, lambda r: r['latency'][1]):.2f} "
              f"| {med(runs, lambda r: r['peak_rss_bytes']) / 2**20:.0f} |")
    failed = sum(r["failed"] for runs in results.values() for r in runs)
    print(f"\nfailed requests: {failed}; load average before runs "
          f"{min(r['load_before'] for v in results.values() for r in v):.2f}–"
          f"{max(r['load_before'] for v in results.values() for r in v):.2f}")


if __name__ == "__main__":
    main()
