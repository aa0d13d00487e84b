#!/usr/bin/env python3
"""Compare per-example dumps of `mor eval tasks --dump-examples` and `reference.py tasks --dump`.

Prints a markdown table per task: both implementations' acc / acc_norm (± standard error), their difference in
points, how often the two pick the same candidate (raw and length-normalised argmax; LAMBADA: the same greedy
verdict), how often the scored tokens are identical, and the largest log-likelihood difference."""

import json
import math
import sys
from collections import defaultdict

import numpy as np

PAPER = {"lambada": "acc", "winogrande": "acc", "mmlu": "acc"}


def load(path, routing=None):
    out = defaultdict(dict)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if routing and r.get("routing", routing) != routing:
                continue
            out[r["task"]][r["index"]] = r
    return out


def ms(xs):
    xs = np.asarray(xs, float)
    se = xs.std(ddof=1) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return 100 * xs.mean(), 100 * se


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: compare.py MOR.jsonl REFERENCE.jsonl")
    mor, ref = load(sys.argv[1]), load(sys.argv[2])
    rows, worst = [], 0.0
    print(
        "| task | n | metric | mor | reference | diff (points) | same prediction (acc / acc_norm) "
        "| same tokens | max \\|Δ loglik\\| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for task in ref:
        common = sorted(set(mor.get(task, {})) & set(ref[task]))
        if not common:
            print(f"| {task} | 0 | (no mor examples) | | | | | | |")
            continue
        m = [mor[task][i] for i in common]
        r = [ref[task][i] for i in common]
        lam = task == "lambada"
        same_tok = np.mean(
            [
                a["continuation_tokens"] == b["continuation_tokens"] and a["context_tokens"] == b["context_tokens"]
                for a, b in zip(m, r)
            ]
        )
        dll = max(max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) for a, b in zip(m, r))
        if lam:
            same = np.mean([a["correct"] == b["correct"] for a, b in zip(m, r)])
            same_n = float("nan")
        else:
            same = np.mean([np.argmax(a["logprobs"]) == np.argmax(b["logprobs"]) for a, b in zip(m, r)])

            def pn(e, norm):
                return int(np.argmax([x / max(n, 1) for x, n in zip(e["logprobs"], norm)]))

            same_n = np.mean([pn(a, b["norm"]) == pn(b, b["norm"]) for a, b in zip(m, r)])
            # mor's own acc_norm verdicts must follow from its log-likelihoods and these lengths.
            bad = sum((pn(a, b["norm"]) == b["gold"]) != a["correct_norm"] for a, b in zip(m, r))
            if bad:
                print(f"note: {task}: {bad} mor acc_norm verdicts disagree with its own log-likelihoods", file=sys.stderr)
        metrics = ["acc"] if lam else ["acc", "acc_norm"]
        for k in metrics:
            key = "correct" if k == "acc" else "correct_norm"
            mm, mse = ms([a[key] for a in m])
            rm, rse = ms([b[key] for b in r])
            star = " (paper)" if PAPER.get(task, "acc_norm") == k else ""
            agree = f"{100 * same:.1f}%" if k == "acc" else f"{100 * same_n:.1f}%"
            if PAPER.get(task, "acc_norm") == k:
                worst = max(worst, abs(mm - rm))
            print(
                f"| {task} | {len(common)} | {k}{star} | {mm:.2f} ± {mse:.2f} | {rm:.2f} ± {rse:.2f} | "
                f"{mm - rm:+.2f} | {agree} | {100 * same_tok:.1f}% | {dll:.2e} |"
            )
    print(f"\nlargest difference in a paper metric: {worst:.2f} points")


if __name__ == "__main__":
    main()
