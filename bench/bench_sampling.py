"""Sampler throughput on a Pass@64 evaluation shape: `factory.sampling.sample` against a loop of
`model.generate(num_return_sequences=64)`, one call per prompt, with the same sampling settings.

    python bench/bench_sampling.py                       # 200 prompts x 64 samples, tiny student
    python bench/bench_sampling.py --prompts 50 --reps 3 --no-append

The model is the tiny student's architecture (conf/student/tiny.yaml: Qwen3, vocab 128, hidden 64,
2 layers, heads 4/2, head_dim 16) with random weights, so completions run until eos (about 1 in
128 per step) or max_new_tokens. Tokens/s counts generated tokens (up to and including eos).
Prints a table and appends it to docs/benchmarks.md under "## Sampling throughput".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from factory.sampling import sample  # noqa: E402

EOS, PAD = 2, 0


def tiny_model(seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rope_theta=10_000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS,
        pad_token_id=PAD, initializer_range=0.3,  # wide init: varied, non-repeating samples
    )
    return Qwen3ForCausalLM(cfg).eval()


def make_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 41, (n,), generator=g).tolist()
    return [[1] + torch.randint(5, 128, (L - 1,), generator=g).tolist() for L in lengths]


def run_sampler(model, prompts, args) -> int:
    out = sample(
        model, prompts, args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, stop_ids=[EOS], pad_id=PAD,
        batch_size=args.batch_size, generator=torch.Generator().manual_seed(0),
    )
    return sum(out.lengths())


def run_generate(model, prompts, args) -> int:
    torch.manual_seed(0)
    total = 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            seqs = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                num_return_sequences=args.n, max_new_tokens=args.max_new_tokens,
                eos_token_id=EOS, pad_token_id=PAD,
            )[:, len(p):]
            # generated tokens: up to and including the first eos
            is_eos = seqs == EOS
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, seqs.shape[1])
            total += int(first.sum())
    return total


def timed_interleaved(fns, reps):
    """Median wall seconds and tokens of each fn; the fns alternate within each repetition, so
    load from other processes on a shared machine falls on both alike."""
    times = [[] for _ in fns]
    tokens = [0] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            tokens[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), tok) for t, tok in zip(times, tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=512, help="sampler rows per forward")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-append", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = tiny_model(0)
    prompts = make_prompts(args.prompts, 1)
    run_sampler(model, prompts[:2], args)  # warm-up
    (t_s, tok_s), (t_g, tok_g) = timed_interleaved(
        [lambda: run_sampler(model, prompts, args), lambda: run_generate(model, prompts, args)],
        args.reps,
    )
    rate_s, rate_g = tok_s / t_s, tok_g / t_g
    rows = [
        ("`factory.sampling.sample`", t_s, tok_s, rate_s),
        (f"`model.generate` loop (num_return_sequences={args.n})", t_g, tok_g, rate_g),
    ]
    table = ["| method | wall s (median) | tokens | tokens/s |", "|---|---|---|---|"]
    table += [f"| {name} | {t:.2f} | {tok} | {r:,.0f} |" for name, t, tok, r in rows]
    speedup = rate_s / rate_g
    cmd = "python bench/bench_sampling.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    section = "\n".join([
        "## Sampling throughput",
        "",
        f"{args.prompts} prompts x {args.n} samples, max_new_tokens {args.max_new_tokens}, "
        f"T={args.temperature} top-p {args.top_p} top-k {args.top_k}; tiny student architecture "
        f"(random weights), sampler batch {args.batch_size}; median of {args.reps}.",
        f"Machine: {machine}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.date.today().isoformat()}. Command: `{cmd.strip()}`.",
        "",
        *table,
        "",
        f"Speed-up: {speedup:.2f}x (target >= 3x).",
        "",
    ])
    print(section)
    if not args.no_append:
        path = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(("\n" if path.exists() and path.stat().st_size else "") + section)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
