"""Logit cache: bytes per token, fidelity and throughput of each encoding (teachers/cache.py).

    python bench/bench_cache.py                        # 200k tokens per cache, k = 16, 64, 128
    python bench/bench_cache.py --tokens 50000 --no-append

For k = 16, 64, 128 at Qwen3's vocabulary (151,936) and each encoding (plain; compact with
8-bit log-probs, the default; compact with 6-bit log-probs, for the trade-off):

* bytes per token of the shard files (the manifest's total shard bytes / tokens), against a dense
  bf16 distribution (303,872 B) and DistillKit's compressed top-k (114-344 B);
* mean coarsened KL(exact || stored) per token over {k ids, tail} (``coarsened_kl``), on a pool
  of rows from Zipf-like logits (``synthetic_lm_logits``): the ``mixed`` profile (entropy ~0 to
  ~8 nats), the ``flat`` high-entropy profile, and sampled mode on ``mixed``;
* write throughput (encode, Arrow write, fsync, sha256; ``CacheWriter.add`` to ``close``) and read
  throughput (``CacheReader.batch`` of 32 sequences, decode and pad; sequential and shuffled
  order, page cache warm) in tokens/s over a cache of --tokens tokens (the pool's rows cycled,
  sequences of 64-960 tokens), and the sha256 ``verify()`` rate.

Prints a table and appends it to docs/benchmarks.md under "## Logit cache".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import cpu_model, publish  # noqa: E402  bench/report.py (the script's folder is on sys.path)
from teachers.cache import (  # noqa: E402
    CacheReader,
    CacheSpec,
    CacheWriter,
    coarsened_kl,
    from_logits,
    synthetic_lm_logits,
)

VOCAB = 151_936
DENSE_BF16 = 2 * VOCAB  # 303,872 bytes per token
DISTILLKIT = (114, 344)
ENCODINGS = [("plain", "plain", 8), ("compact", "compact", 8), ("compact 6-bit", "compact", 6)]
TARGET_BYTES, TARGET_KL = 256, 1e-3


def make_pools(ks, n: int, profile: str, seed: int):
    """{(mode, k): (ids, logprobs, tail)} from the same n rows of logits; from_logits tokens/s."""
    g = torch.Generator().manual_seed(seed)
    parts = {(m, k): [] for m in ("topk", "sampled") for k in ks}
    t_rows = 0.0
    for a in range(0, n, 64):
        z = synthetic_lm_logits(min(64, n - a), VOCAB, g, profile)
        for (mode, k), acc in parts.items():
            t0 = time.perf_counter()
            acc.append(from_logits(z, k, mode, g))
            if (mode, k) == ("topk", 64):
                t_rows += time.perf_counter() - t0
    return {key: tuple(torch.cat(x) for x in zip(*acc)) for key, acc in parts.items()}, n / t_rows


def pool_kl(spec: CacheSpec, rows, workdir: Path) -> float:
    """Mean coarsened KL of the pool's rows through a cache of this spec."""
    d = workdir / "kl"
    with CacheWriter(d, spec) as w:
        w.add(0, *rows)
    kl = coarsened_kl(rows, CacheReader(d, expect=spec).get(0))
    shutil.rmtree(d)
    return float(kl.mean())


def lengths_for(tokens: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < tokens:
        L = int(min(rng.integers(64, 961), tokens - total))
        out.append(L)
        total += L
    return out


class Clock:
    """Wall and CPU (process) seconds: on a shared machine CPU seconds are the steadier number."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def write_cache(d: Path, spec: CacheSpec, rows, lengths) -> Clock:
    """Write the cache (the pool's rows cycled); time add() .. close(), not the row slicing."""
    ids, lp, tail = rows
    n, a = len(ids), 0
    seqs = []
    for L in lengths:
        idx = torch.arange(a, a + L) % n
        seqs.append((ids[idx], lp[idx], tail[idx]))
        a += L
    with Clock() as clock, CacheWriter(d, spec) as w:
        for i, seq in enumerate(seqs):
            w.add(i, *seq)
    return clock


def read_rates(reader: CacheReader, order, batch: int) -> tuple[float, float]:
    """Tokens per wall second and per CPU second, decoding `order` in batches."""
    tokens = 0
    with Clock() as clock:
        for b in range(0, len(order), batch):
            tokens += int(reader.batch(order[b:b + batch]).lengths_b.sum())
    return tokens / clock.wall, tokens / clock.cpu


def rate(pair) -> str:
    return f"{pair[0] / 1e3:,.0f}k ({pair[1] / 1e3:,.0f}k)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens per cache for throughput")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--pool", type=int, default=1024, help="tokens of 'mixed' rows (KL, cycled)")
    ap.add_argument("--flat-pool", type=int, default=256, help="tokens of 'flat' rows (KL only)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per CacheReader.batch call")
    ap.add_argument("--reps", type=int, default=3, help="read passes (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: CPU seconds = one core's work; 0: leave as is)")
    ap.add_argument("--workdir", default=None, help="where the caches go (default: a temp dir)")
    ap.add_argument("--no-append", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        mixed, logits_rate = make_pools(args.ks, args.pool, "mixed", 0)
        flat, _ = make_pools(args.ks, args.flat_pool, "flat", 1)
        t_pool = time.perf_counter() - t0
        z = mixed[("topk", 64)]
        p_top = z[1][:, 0].exp()
        mass_k = z[1].exp().sum(-1)
        lengths = lengths_for(args.tokens, 0)
        results = []
        for k in args.ks:
            for name, enc, bits in ENCODINGS:
                spec = CacheSpec(k=k, mode="topk", encoding=enc, vocab_size=VOCAB,
                                 teacher="synthetic-zipf", sampling={}, logprob_bits=bits)
                kl = {"mixed": pool_kl(spec, mixed[("topk", k)], workdir),
                      "flat": pool_kl(spec, flat[("topk", k)], workdir),
                      "sampled": pool_kl(CacheSpec(**{**spec.to_dict(), "mode": "sampled"}),
                                         mixed[("sampled", k)], workdir)}
                d = workdir / f"{enc}-{bits}-{k}"
                if not results:  # warm-up: first-use imports and allocations
                    write_cache(workdir / "warm", spec, mixed[("topk", k)], lengths[:4])
                    shutil.rmtree(workdir / "warm")
                w = write_cache(d, spec, mixed[("topk", k)], lengths)
                reader = CacheReader(d, expect=spec)
                t_v = time.perf_counter()
                reader.verify()
                verify_mb_s = reader.manifest["bytes"] / 1e6 / (time.perf_counter() - t_v)
                seq = np.arange(len(reader))
                shuf = np.random.default_rng(1).permutation(len(reader))
                r_seq = [statistics.median(x) for x in
                         zip(*(read_rates(reader, seq, args.batch) for _ in range(args.reps)))]
                r_shuf = [statistics.median(x) for x in
                          zip(*(read_rates(reader, shuf, args.batch) for _ in range(args.reps)))]
                results.append(dict(name=name, k=k, bpt=reader.bytes_per_token, row=spec.row_bytes,
                                    kl=kl, write=(reader.tokens / w.wall, reader.tokens / w.cpu),
                                    read_seq=r_seq,
                                    read_shuf=r_shuf, verify=verify_mb_s, tokens=reader.tokens,
                                    seqs=len(reader)))
                del reader
                shutil.rmtree(d)
                print(f"k={k} {name}: {results[-1]['bpt']:.1f} B/token, KL {kl['mixed']:.2e}, "
                      f"write {results[-1]['write'][0]:,.0f} tok/s, read {r_seq[0]:,.0f} tok/s",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    table = [
        "| encoding | k | bytes/token (payload) | dense bf16 / this | vs DistillKit 114–344 | "
        "KL mixed | KL flat | KL sampled | write tok/s | read tok/s, in order | read tok/s, shuffled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lo, hi = DISTILLKIT
        vs = ("below" if r["bpt"] < lo else "above" if r["bpt"] > hi else "within")
        table.append(
            f"| {r['name']} | {r['k']} | {r['bpt']:.1f} ({r['row']}) | {DENSE_BF16 / r['bpt']:,.0f}x | "
            f"{vs} | {r['kl']['mixed']:.1e} | {r['kl']['flat']:.1e} | {r['kl']['sampled']:.1e} | "
            f"{rate(r['write'])} | {rate(r['read_seq'])} | {rate(r['read_shuf'])} |"
        )
    main64 = next((r for r in results if r["name"] == "compact" and r["k"] == 64), None)
    targets = []
    if main64:
        b, klm = main64["bpt"], max(main64["kl"].values())
        targets = [
            f"- Bytes/token at k = 64, compact: {b:.1f} B, target <= {TARGET_BYTES} B: "
            f"{'met' if b <= TARGET_BYTES else 'NOT met'}, {abs(TARGET_BYTES - b):.1f} B "
            f"({abs(TARGET_BYTES - b) / TARGET_BYTES:.0%}) {'under' if b <= TARGET_BYTES else 'over'}.",
            f"- Mean coarsened KL at k = 64, compact (worst of mixed / flat / sampled): {klm:.1e} nats "
            f"per token, target < {TARGET_KL:.0e}: {'met' if klm < TARGET_KL else 'NOT met'}, "
            f"{TARGET_KL / klm if klm < TARGET_KL else klm / TARGET_KL:,.0f}x "
            f"{'under' if klm < TARGET_KL else 'over'}.",
        ]
    verify_rate = statistics.median(r["verify"] for r in results)
    cmd = "python bench/bench_cache.py " + " ".join(sys.argv[1:])
    section = "\n".join([
        "## Logit cache",
        "",
        f"Qwen3 vocabulary ({VOCAB:,}); top-k mode unless noted. KL: mean coarsened "
        f"KL(exact || stored) in nats per token over {{k ids, tail}}, both sides renormalised "
        f"(`teachers.cache.coarsened_kl`), on Zipf-like logits (`synthetic_lm_logits`): "
        f"'mixed' {args.pool} tokens (mean top-1 p {float(p_top.mean()):.2f}, mean top-64 mass "
        f"{float(mass_k.mean()):.2f}), 'flat' {args.flat_pool} tokens (high entropy), 'sampled' "
        f"= sampled mode on 'mixed'. Throughput: {results[0]['tokens']:,} tokens per cache in "
        f"{results[0]['seqs']} sequences of 64–960 tokens (pool rows cycled), one shard; write = "
        f"`CacheWriter.add` .. `close` (encode, Arrow IPC write, fsync, sha256); read = "
        f"`CacheReader.batch` of {args.batch} sequences (decode + pad to [B, T, k] int64/fp32), "
        f"median of {args.reps} passes, page cache warm. Rates: tokens per wall second (per CPU "
        f"second in parentheses, steadier on a shared machine). Bytes/token: shard bytes / tokens "
        f"(payload per row in parentheses). Dense bf16 = {DENSE_BF16:,} B/token.",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs (nproc), load average {load0:.1f} at start "
        f"(shared with other developers: absolute throughput is noisy), torch threads "
        f"{torch.get_num_threads()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"pyarrow {pa.__version__}, numpy {np.__version__}; {datetime.date.today().isoformat()}. "
        f"Command: `{cmd.strip()}` ({time.perf_counter() - t0:.0f} s, of which {t_pool:.0f} s "
        f"making the pools).",
        "",
        *table,
        "",
        *targets,
        f"- `CacheReader.verify()` (sha256 of every shard): {verify_rate:,.0f} MB/s median; "
        f"`from_logits` (fp32 log-softmax + top-64 over the full vocabulary, CPU): "
        f"{logits_rate:,.0f} tokens/s.",
        "",
    ])
    publish(section, append=not args.no_append)


if __name__ == "__main__":
    main()
