"""Sampler throughput on a Pass@64 evaluation shape: `factory.sampling.sample` against a loop of
`model.generate(num_return_sequences=64)`, one call per prompt, with the same sampling settings.

    python bench/bench_sampling.py                  # 200 prompts x 64 samples, batch 512 and 2048
    python bench/bench_sampling.py --prompts 50 --reps 1 --no-append       # a quicker look

The model is the tiny student's architecture (conf/student/tiny.yaml: Qwen3, vocab 128, hidden 64,
2 layers, heads 4/2, head_dim 16) with random weights, so completions run until eos (about 1 in
128 per step) or max_new_tokens. Tokens/s counts generated tokens (up to and including eos).
One torch thread by default: on the shared 2-core machine a 2-thread pool spins under load.
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
from report import cpu_model, publish  # bench/report.py (scripts run from bench/ on sys.path)

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


def run_sampler(model, prompts, args, batch_size: int) -> int:
    out = sample(
        model, prompts, args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, stop_ids=[EOS], pad_id=PAD,
        batch_size=batch_size, generator=torch.Generator().manual_seed(0),
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
    """(median wall s, median CPU s, tokens) of each fn. The fns alternate within each
    repetition, so load from other processes on a shared machine falls on all of them alike."""
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    tokens = [0] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            w0, c0 = time.perf_counter(), time.process_time()
            tokens[i] = fn()
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c), tok)
            for w, c, tok in zip(wall, cpu, tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[512, 2048],
                    help="sampler rows per forward; one table row each (eval's default is 512)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default; on a shared machine its pool spins)")
    ap.add_argument("--no-append", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = tiny_model(0)
    prompts = make_prompts(args.prompts, 1)
    run_sampler(model, prompts[:2], args, args.batch_size[0])  # warm-up
    load = os.getloadavg()[0]
    start = time.perf_counter()
    fns = [lambda bs=bs: run_sampler(model, prompts, args, bs) for bs in args.batch_size]
    results = timed_interleaved(fns + [lambda: run_generate(model, prompts, args)], args.reps)
    names = [f"`factory.sampling.sample`, batch {bs}" for bs in args.batch_size]
    names.append(f"`model.generate` loop, one call per prompt (num_return_sequences={args.n})")
    w_g, c_g, tok_g = results[-1]
    table = ["| method | wall s (median) | tokens | tokens/s (per CPU s) | speed-up (per CPU s) |",
             "|---|---|---|---|---|"]
    speedups = []
    for name, (w, c, tok) in zip(names, results):
        up, up_cpu = (tok / w) / (tok_g / w_g), (tok / c) / (tok_g / c_g)
        speedups.append((name, up, up_cpu))
        table.append(f"| {name} | {w:.2f} | {tok:,} | {tok / w:,.0f} ({tok / c:,.0f}) | "
                     f"{up:.2f}x ({up_cpu:.2f}x) |")
    cmd = "python bench/bench_sampling.py " + " ".join(a for a in sys.argv[1:] if a != "--no-append")
    verdict = "; ".join(f"batch {bs}: {up:.2f}x {'meets' if up >= 3 else 'misses'} it"
                        for bs, (_, up, _) in zip(args.batch_size, speedups))
    section = "\n".join([
        "## Sampling throughput",
        "",
        f"`bench/bench_sampling.py`: the one sampler against a loop of `model.generate`, one call "
        f"per prompt, on a Pass@{args.n} evaluation shape: {args.prompts} prompts of 20-40 tokens "
        f"x {args.n} samples, max_new_tokens {args.max_new_tokens}, T={args.temperature} "
        f"top-p {args.top_p} top-k {args.top_k}, stop at eos. Model: the tiny student's "
        "architecture (Qwen3, vocab 128, hidden 64, 2 layers) with random weights, fp32, so "
        "rows end at a random eos or at max_new_tokens. Tokens/s counts generated tokens (eos "
        f"included); median of {args.reps} repetitions, the methods alternating within each.",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, shared with other developers (load "
        f"average {load:.1f} at start: wall times are noisy, CPU seconds steadier), torch "
        f"threads {torch.get_num_threads()}; Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.date.today().isoformat()}. Command: `{cmd.strip()}` "
        f"({time.perf_counter() - start:.0f} s).",
        "",
        *table,
        "",
        f"- Target >= 3x over the generate loop: {verdict}.",
        "",
    ])
    publish(section, append=not args.no_append)


if __name__ == "__main__":
    main()
