#!/usr/bin/env python3
"""Independent reference for `mor eval tasks` and for mor's GGUF import / export.

Nothing here is derived from mor's Rust code. The pieces are:

* weights: read with llama.cpp's own Python package (`gguf.GGUFReader`) and dequantized with its
  `gguf.quants.dequantize`;
* model: a plain numpy Llama forward written from the architecture (RMSNorm, rotary embeddings, grouped-query
  attention, SwiGLU MLP, tied output head). The attention weights are used in the layout llama.cpp stores them
  in (Q/K rows permuted by the converter so that rotary pairs are adjacent), so rotary embeddings here are applied
  to adjacent pairs (2i, 2i+1) as llama.cpp's "normal" RoPE does. mor undoes the permutation and rotates halves;
  the two are equal only if the permutation is handled right, which is part of what this checks;
* tokenizer: built with the `tokenizers` package from the GGUF vocabulary and merges, with the pre-tokenizer that
  llama.cpp uses for `tokenizer.ggml.pre = smollm` (single digits, then the GPT-2 byte-level regex);
* tasks: prompt formats and scoring written from lm-evaluation-harness's task definitions (v0.4 YAMLs and their
  utils): `_encode_pair`, summed continuation log-likelihood, acc = argmax, acc_norm = argmax of log-likelihood
  divided by the choice's length (UTF-8 bytes here, as mor's spec asks), LAMBADA acc = greedy match.

Modes:
  tasks   score tasks, write per-example JSONL and a summary JSON
  logits  next-token logits of prompts; compare two GGUF files and/or logits dumped by `mor eval logits`
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

TASKS = ["lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu", "openbookqa"]
ARROW = "data-00000-of-00001.arrow"


# ----------------------------------------------------------------------------------------------------------------
# GGUF model


def _field_value(reader, key):
    """A GGUF metadata value as a Python scalar, string, or list."""
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return None
    vt = f.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        et = f.types[1]
        if et == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if vt == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


class Llama:
    """A Llama model held as float32 numpy arrays, read from a GGUF file."""

    def __init__(self, path: str | Path):
        import gguf
        from gguf.quants import dequantize

        reader = gguf.GGUFReader(str(path))
        self.path = str(path)
        arch = _field_value(reader, "general.architecture")
        if arch != "llama":
            raise SystemExit(f"{path}: architecture {arch!r}, expected llama")

        def meta(key, default=None):
            v = _field_value(reader, f"llama.{key}")
            if v is None:
                if default is None:
                    raise SystemExit(f"{path}: metadata llama.{key} missing")
                return default
            return v

        self.n_layer = int(meta("block_count"))
        self.d = int(meta("embedding_length"))
        self.n_head = int(meta("attention.head_count"))
        self.n_kv = int(meta("attention.head_count_kv"))
        self.eps = float(meta("attention.layer_norm_rms_epsilon"))
        self.theta = float(meta("rope.freq_base", 10000.0))
        self.ctx_len = int(meta("context_length"))
        self.hd = self.d // self.n_head
        self.group = self.n_head // self.n_kv
        self.reader = reader

        tensors = {t.name: t for t in reader.tensors}

        def w(name):
            t = tensors.get(name)
            if t is None:
                raise SystemExit(f"{path}: tensor {name} missing")
            a = dequantize(t.data, t.tensor_type)
            # GGML shapes list the fastest dimension first; numpy's are the reverse.
            shape = tuple(int(x) for x in reversed(t.shape))
            return np.ascontiguousarray(a.reshape(shape), dtype=np.float32)

        self.embed = w("token_embd.weight")  # [vocab, d]
        self.vocab = self.embed.shape[0]
        self.head = w("output.weight") if "output.weight" in tensors else self.embed  # tied
        self.head_t = np.ascontiguousarray(self.head.T)
        self.out_norm = w("output_norm.weight")
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            q, k, v = w(p + "attn_q.weight"), w(p + "attn_k.weight"), w(p + "attn_v.weight")
            gate, up = w(p + "ffn_gate.weight"), w(p + "ffn_up.weight")
            self.layers.append(
                dict(
                    attn_norm=w(p + "attn_norm.weight"),
                    ffn_norm=w(p + "ffn_norm.weight"),
                    # x @ wqkv gives [q | k | v]; weights are [out, in] so transpose once here.
                    wqkv=np.ascontiguousarray(np.concatenate([q, k, v], 0).T),
                    wo=np.ascontiguousarray(w(p + "attn_output.weight").T),
                    wgu=np.ascontiguousarray(np.concatenate([gate, up], 0).T),
                    wdown=np.ascontiguousarray(w(p + "ffn_down.weight").T),
                )
            )
        half = self.hd // 2
        self.inv_freq = self.theta ** (-np.arange(half, dtype=np.float64) * 2.0 / self.hd)

    # -- pieces ---------------------------------------------------------------------------------------------------

    def _rms(self, x, weight):
        var = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)) * weight

    def _rope(self, x, pos):
        """Rotate adjacent pairs (2i, 2i+1) of every head by pos * theta^(-2i/hd). x: [B, S, H, hd]."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]  # [S, hd/2]
        cos = np.cos(ang).astype(np.float32)[None, :, None, :]
        sin = np.sin(ang).astype(np.float32)[None, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, ids, cache=None, keep_cache=False):
        """Run tokens `ids` [B, S] after an optional shared prefix `cache` (per layer (K, V) of shape
        [1, n_kv, P, hd], the same prefix for every row). Returns the final-normed hidden states [B, S, d] and,
        with keep_cache, the new per-layer (K, V) of this call (rows must then be 1 to serve as a prefix)."""
        B, S = ids.shape
        P = 0 if cache is None else cache[0][0].shape[2]
        pos = np.arange(P, P + S)
        x = self.embed[ids]  # [B, S, d]
        # Causal mask over [prefix | this call]: row i may see every prefix position and positions <= i here.
        allowed = np.concatenate([np.ones((S, P), bool), np.tril(np.ones((S, S), bool))], axis=1)
        neg = np.where(allowed, 0.0, -np.inf).astype(np.float32)
        new_cache = []
        H, KV, hd, g = self.n_head, self.n_kv, self.hd, self.group
        scale = 1.0 / math.sqrt(hd)
        for li, L in enumerate(self.layers):
            h = self._rms(x, L["attn_norm"])
            qkv = h @ L["wqkv"]
            q = qkv[..., : H * hd].reshape(B, S, H, hd)
            k = qkv[..., H * hd : (H + KV) * hd].reshape(B, S, KV, hd)
            v = qkv[..., (H + KV) * hd :].reshape(B, S, KV, hd)
            q = self._rope(q, pos)
            k = self._rope(k, pos)
            k = k.transpose(0, 2, 1, 3)  # [B, KV, S, hd]
            v = v.transpose(0, 2, 1, 3)
            if keep_cache:
                new_cache.append((k, v))
            if cache is not None:
                pk, pv = cache[li]
                k = np.concatenate([np.broadcast_to(pk, (B,) + pk.shape[1:]), k], axis=2)
                v = np.concatenate([np.broadcast_to(pv, (B,) + pv.shape[1:]), v], axis=2)
            # Query head h uses key/value head h // g: group the g query heads of each kv head together.
            qg = q.transpose(0, 2, 1, 3).reshape(B, KV, g * S, hd)
            scores = (qg @ k.transpose(0, 1, 3, 2)) * scale  # [B, KV, g*S, P+S]
            scores = scores.reshape(B, KV, g, S, P + S) + neg
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            att = probs.reshape(B, KV, g * S, P + S) @ v  # [B, KV, g*S, hd]
            att = att.reshape(B, KV, g, S, hd).transpose(0, 3, 1, 2, 4).reshape(B, S, H * hd)
            x = x + att @ L["wo"]
            h = self._rms(x, L["ffn_norm"])
            gu = h @ L["wgu"]
            gate, up = gu[..., : gu.shape[-1] // 2], gu[..., gu.shape[-1] // 2 :]
            act = gate / (1.0 + np.exp(-gate)) * up  # SiLU(gate) * up
            x = x + act @ L["wdown"]
        return self._rms(x, self.out_norm), (new_cache if keep_cache else None)

    def logits(self, hidden):
        return hidden @ self.head_t

    def tokenizer(self):
        return build_tokenizer(self.reader)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(reader):
    """Byte-level BPE from the GGUF vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind = _field_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise SystemExit(f"tokenizer model {kind!r}: only byte-level BPE (gpt2) is supported here")
    pre = _field_value(reader, "tokenizer.ggml.pre")
    tokens = _field_value(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field_value(reader, "tokenizer.ggml.merges")]
    types = _field_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp splits every digit on its own before the GPT-2 regex for these.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are matched whole, never split by BPE.
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    eos = _field_value(reader, "tokenizer.ggml.eos_token_id")
    return tok, int(eos)


# ----------------------------------------------------------------------------------------------------------------
# Tasks (lm-evaluation-harness definitions)


def read_arrow(path: Path):
    import pyarrow as pa

    if not path.exists():
        raise SystemExit(f"{path}: missing (run scripts/fetch_eval_data.sh)")
    with pa.memory_map(str(path)) as src:
        try:
            table = pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(src).read_all()
    return table.to_pylist()


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def load_docs(task: str, root: Path, limit: int | None):
    """Documents as dicts: contexts (one per choice), continuations (one per choice), norm lengths, gold, greedy.

    Every multiple-choice task becomes, as lm-eval's `construct_requests`: context = doc_to_text (with the
    description for MMLU), continuation = target_delimiter " " + choice."""
    hf = root / "hf_datasets"
    docs = []

    def mc(ctx, choices, gold):
        return dict(
            contexts=[ctx] * len(choices),
            continuations=[" " + c for c in choices],
            norm=[len(c.encode("utf-8")) for c in choices],
            gold=gold,
            greedy=False,
        )

    if task == "lambada":
        path = root / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
        if not path.exists():
            raise SystemExit(f"{path}: missing (run scripts/fetch_eval_data.sh)")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                req = json.loads(line)["request"]
                # lambada_openai: context = text without its last word, target = " " + last word.
                docs.append(
                    dict(
                        contexts=[req["context"]],
                        continuations=[req["continuation"]],
                        norm=[len(req["continuation"].encode("utf-8"))],
                        gold=0,
                        greedy=True,
                    )
                )
                if limit and len(docs) >= limit:
                    break
        return docs
    if task == "mmlu":
        base = hf / "hails/mmlu_no_train"
        subjects = sorted(p.name for p in base.iterdir() if (p / "test").is_dir())
        for s in subjects:
            for row in read_arrow(base / s / "test" / ARROW):
                desc = f"The following are questions (with answers) about {s.replace('_', ' ')}.\n\n"
                docs.append(mc(desc + f"Question: {row['question'].strip()}\nAnswer:", row["choices"], int(row["answer"])))
                if limit and len(docs) >= limit:
                    return docs
        return docs
    paths = {
        "hellaswag": "hellaswag/none/validation",
        "piqa": "piqa/plain_text/validation",
        "winogrande": "winogrande/winogrande_xl/validation",
        "arc_easy": "ai2_arc/ARC-Easy/validation",
        "arc_challenge": "ai2_arc/ARC-Challenge/validation",
        "openbookqa": "openbookqa/main/validation",
    }
    rows = read_arrow(hf / paths[task] / ARROW)
    if limit:
        rows = rows[:limit]
    for row in rows:
        if task == "hellaswag":
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            docs.append(
                mc(
                    hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                    [hellaswag_preprocess(e) for e in row["endings"]],
                    int(row["label"]),
                )
            )
        elif task == "piqa":
            docs.append(mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"])))
        elif task == "winogrande":
            # Partial evaluation: one context per option (sentence up to the blank, option filled in), the rest of
            # the sentence is the shared continuation.
            sent = row["sentence"]
            cut = sent.index("_")
            opts = [sent[:cut] + row["option1"], sent[:cut] + row["option2"]]
            target = sent[cut + 1 :].strip()
            docs.append(
                dict(
                    contexts=opts,
                    continuations=[" " + target] * 2,
                    norm=[len(o.encode("utf-8")) for o in opts],
                    gold={"1": 0, "2": 1}[str(row["answer"])],
                    greedy=False,
                )
            )
        elif task in ("arc_easy", "arc_challenge"):
            ch = row["choices"]
            docs.append(mc(f"Question: {row['question']}\nAnswer:", ch["text"], ch["label"].index(row["answerKey"])))
        elif task == "openbookqa":
            ch = row["choices"]
            docs.append(mc(row["question_stem"], ch["text"], ch["label"].index(row["answerKey"].lstrip())))
    return docs


def encode_pair(tok, context: str, continuation: str, eos: int):
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation; the continuation's tokens
    are the whole encoding after the context's own token count."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids if context else []
    cont = whole[len(ctx) :]
    # lm-eval conditions on the context's own encoding (an empty context becomes [eot]).
    return (ctx or [eos]), cont


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score_doc(model: Llama, tok, eos, doc):
    """Log-likelihood (and greedy flag) of every candidate; the common token prefix runs once."""
    pairs = [encode_pair(tok, c, k, eos) for c, k in zip(doc["contexts"], doc["continuations"])]
    inputs = []
    for ctx, cont in pairs:
        full = ctx + cont
        if len(full) > model.ctx_len + 1:  # lm-eval truncates from the left
            full = full[-(model.ctx_len + 1) :]
        inputs.append((full[:-1], cont))
    # Longest common prefix of the model inputs, leaving at least one token per candidate to run batched.
    shortest = min(len(i) for i, _ in inputs)
    p = 0
    while p < shortest - 1 and all(i[p] == inputs[0][0][p] for i, _ in inputs):
        p += 1
    cache = None
    hp = None
    if p > 0:
        hp, cache = model.forward(np.array([inputs[0][0][:p]]), keep_cache=True)
        hp = hp[0]
    S = max(len(i) - p for i, _ in inputs)
    batch = np.full((len(inputs), S), eos, dtype=np.int64)  # right padding never influences earlier positions
    for b, (i, _) in enumerate(inputs):
        batch[b, : len(i) - p] = i[p:]
    hs, _ = model.forward(batch, cache=cache)
    out = []
    for b, (i, cont) in enumerate(inputs):
        start = len(i) - len(cont)
        rows = [hp[q] if q < p else hs[b, q - p] for q in range(start, len(i))]
        lp = log_softmax(model.logits(np.stack(rows)))
        ll = float(sum(lp[j, t] for j, t in enumerate(cont)))
        greedy = bool(all(int(np.argmax(lp[j])) == t for j, t in enumerate(cont)))
        out.append((ll, greedy, len(pairs[b][0]), cont))
    return out


def run_tasks(args):
    model = Llama(args.gguf)
    tok, eos = model.tokenizer()
    root = Path(args.data_dir)
    tasks = TASKS if args.tasks == "all" else args.tasks.split(",")
    summary = {"gguf": str(args.gguf), "limit": args.limit, "num_fewshot": 0, "tasks": []}
    dump = open(args.dump, "w") if args.dump else None
    for task in tasks:
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        docs = load_docs(task, root, args.limit)
        t0 = time.time()
        acc, accn, lls = [], [], []
        for i, doc in enumerate(docs):
            res = score_doc(model, tok, eos, doc)
            ll = [r[0] for r in res]
            if doc["greedy"]:
                ok = ok_n = res[0][1]
            else:
                ok = int(np.argmax(ll)) == doc["gold"]
                ok_n = int(np.argmax([x / max(n, 1) for x, n in zip(ll, doc["norm"])])) == doc["gold"]
            acc.append(float(ok))
            accn.append(float(ok_n))
            lls.append(ll[0])
            if dump:
                rec = {
                    "task": task,
                    "index": i,
                    "gold": doc["gold"],
                    "logprobs": ll,
                    "correct": bool(ok),
                    "correct_norm": bool(ok_n),
                    "norm": doc["norm"],
                    "context_tokens": [r[2] for r in res],
                    "continuation_tokens": [r[3] for r in res],
                }
                dump.write(json.dumps(rec) + "\n")
                dump.flush()
            if args.progress and (i + 1) % 25 == 0:
                rate = (time.time() - t0) / (i + 1)
                print(f"  {task} {i + 1}/{len(docs)} ({rate:.2f} s/example)", file=sys.stderr, flush=True)
        n = len(docs)

        def ms(xs):
            m = float(np.mean(xs))
            se = float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")
            return m, se

        a, ase = ms(acc)
        r = {"task": task, "n": n, "acc": a, "acc_stderr": ase, "seconds": time.time() - t0}
        if task == "lambada":
            r["perplexity"] = math.exp(-float(np.mean(lls)))
        else:
            r["acc_norm"], r["acc_norm_stderr"] = ms(accn)
        summary["tasks"].append(r)
        print(json.dumps(r), flush=True)
    if dump:
        dump.close()
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Logits mode


DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1905, Albert Einstein published four papers that",
]


def prompt_logits(model: Llama, tok, prompts):
    out = []
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False).ids
        h, _ = model.forward(np.array([ids]))
        out.append((ids, model.logits(h[0])))
    return out


def run_logits(args):
    prompts = args.prompt or DEFAULT_PROMPTS
    model = Llama(args.gguf)
    tok, _ = model.tokenizer()
    base = prompt_logits(model, tok, prompts)
    for (ids, lg), p in zip(base, prompts):
        top = np.argsort(-lg[-1])[:5]
        print(f"{p!r}: {len(ids)} tokens; next-token top-5 {[tok.decode([int(t)]) for t in top]}")
    worst = {}
    if args.compare_gguf:
        other = Llama(args.compare_gguf)
        otok, _ = other.tokenizer()
        for key in ("tokens", "merges", "token_type", "bos_token_id", "eos_token_id", "model", "pre"):
            a = _field_value(model.reader, f"tokenizer.ggml.{key}")
            b = _field_value(other.reader, f"tokenizer.ggml.{key}")
            size = f" ({len(a)} entries)" if isinstance(a, list) else f" ({a!r})"
            print(f"tokenizer.ggml.{key}: {'identical' if a == b else 'DIFFERENT'}{size}")
        kinds = sorted({t.tensor_type.name for t in other.reader.tensors})
        print(f"{args.compare_gguf}: {len(other.reader.tensors)} tensors of type {', '.join(kinds)}")
        diffs, last = [], []
        for (ids, lg), p in zip(base, prompts):
            oids = otok.encode(p, add_special_tokens=False).ids
            if oids != ids:
                print(f"token ids differ for {p!r}: {ids} vs {oids}")
            h, _ = other.forward(np.array([ids]))
            olg = other.logits(h[0])
            diffs.append(float(np.abs(olg - lg).max()))
            last.append(float(np.abs(olg[-1] - lg[-1]).max()))
        worst["gguf"] = max(diffs)
        print(
            f"{args.compare_gguf} vs {args.gguf}: max |logit diff| over all positions {max(diffs):.3e}, "
            f"at the last position {max(last):.3e} ({len(prompts)} prompts)"
        )
    if args.compare_mor:
        d = Path(args.compare_mor)
        index = json.loads((d / "logits.json").read_text())
        diffs, last, scale = [], [], []
        for e in index["prompts"]:
            ids = tok.encode(e["text"], add_special_tokens=False).ids
            if ids != e["ids"]:
                print(f"token ids differ for {e['text']!r}: reference {ids} vs mor {e['ids']}")
            mlg = np.load(d / e["file"])
            h, _ = model.forward(np.array([e["ids"]]))
            lg = model.logits(h[0])
            diffs.append(float(np.abs(mlg - lg).max()))
            last.append(float(np.abs(mlg[-1] - lg[-1]).max()))
            scale.append(float(np.abs(lg).max()))
            agree = int(np.argmax(mlg[-1])) == int(np.argmax(lg[-1]))
            print(f"  {e['text'][:40]!r}: max |diff| {diffs[-1]:.3e}, last {last[-1]:.3e}, argmax agrees {agree}")
        worst["mor"] = max(diffs)
        print(
            f"mor ({d}) vs reference ({args.gguf}): max |logit diff| over all positions {max(diffs):.3e}, "
            f"at the last position {max(last):.3e}; largest |logit| {max(scale):.2f} ({len(index['prompts'])} prompts)"
        )
    if args.sensitivity:
        # What a wrong export would look like: the same weights with llama.cpp's Q/K row permutation undone (the
        # Hugging Face row order written into a GGUF). Shows that the comparisons above can fail.
        H, KV, hd = model.n_head, model.n_kv, model.hd

        def unpermute(w, n):
            return w.reshape(n, hd // 2, 2, -1).swapaxes(1, 2).reshape(n * hd, -1)

        for L in model.layers:
            w = L["wqkv"].T
            q, k, v = w[: H * hd], w[H * hd : (H + KV) * hd], w[(H + KV) * hd :]
            L["wqkv"] = np.ascontiguousarray(np.concatenate([unpermute(q, H), unpermute(k, KV), v]).T)
        wrong = prompt_logits(model, tok, prompts)
        d = max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(base, wrong))
        print(f"sensitivity: the same weights without the Q/K permutation give max |logit diff| {d:.3f}")
    if args.tolerance is not None and worst and max(worst.values()) > args.tolerance:
        raise SystemExit(f"logit differences {worst} exceed the tolerance {args.tolerance}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("tasks", help="score tasks zero-shot")
    t.add_argument("--gguf", required=True)
    t.add_argument("--tasks", default="all")
    t.add_argument("--limit", type=int, default=None, help="first N examples per task")
    t.add_argument("--data-dir", default="assets/eval")
    t.add_argument("--dump", help="per-example JSONL output")
    t.add_argument("--out", help="summary JSON output")
    t.add_argument("--progress", action="store_true")
    lg = sub.add_parser("logits", help="next-token logits of prompts and comparisons")
    lg.add_argument("--gguf", required=True)
    lg.add_argument("--prompt", action="append", help="prompt (repeatable; default: four built-in prompts)")
    lg.add_argument("--compare-gguf", help="a second GGUF (e.g. mor's export) run on the same token ids")
    lg.add_argument("--compare-mor", help="directory written by `mor eval logits`")
    lg.add_argument("--sensitivity", action="store_true", help="also show the effect of a missing Q/K permutation")
    lg.add_argument("--tolerance", type=float, help="fail if any max |logit diff| exceeds this")
    args = ap.parse_args()
    if args.mode == "tasks":
        run_tasks(args)
    else:
        run_logits(args)


if __name__ == "__main__":
    main()
