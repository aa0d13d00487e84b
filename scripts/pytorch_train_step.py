"""The PyTorch side of mor's training comparison (docs/benchmarks.md, "Training at the 135M shape").

One training step as mor's `bench train` times it -- forward, next-token cross-entropy, backward, AdamW -- with the
HF LlamaForCausalLM at the SmolLM-135M config (the `smollm-135m-vanilla` preset: 30 layers, d 576, 9/3 heads,
FFN 1536, vocabulary 49152, tied embeddings), f32, eager attention, on random tokens. Prints one line per step and
a summary with the median step time, tokens/s and the process's peak RSS (VmHWM).

Run through scripts/pytorch_train_step.sh, which installs the pinned torch and transformers.
"""

import argparse
import os
import statistics
import time


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=0.02,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    # The same token pattern as mor's bench (any ids do: the cost does not depend on them).
    ids = (torch.arange(args.batch * args.seq_len, dtype=torch.int64) * 2654435761 % args.vocab).reshape(
        args.batch, args.seq_len
    )

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    times = []
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if s > 0:
            times.append(dt)
        print(
            f"step {s}{' (warm-up)' if s == 0 else ''}: {dt:.2f} s, loss {loss:.4f}, peak RSS {peak_rss_mib():.0f} MiB",
            flush=True,
        )
    med = statistics.median(times)
    tokens = args.batch * args.seq_len
    print(
        f"pytorch {torch.__version__} eager f32, {n_params / 1e6:.2f}M params, batch {args.batch}x{args.seq_len}, "
        f"threads {torch.get_num_threads()}: median {med:.2f} s/step, {tokens / med:.0f} tokens/s, "
        f"peak RSS {peak_rss_mib():.0f} MiB; load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
