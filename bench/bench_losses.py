"""Peak memory and forward+backward time of the sparse-teacher loss: fused vs plain (and liger).

    python bench/bench_losses.py [--tokens 4096 --vocab 151936 --hidden 1024 --k 64
                                  --chunk-sizes 1024,256 --rounds 3 --reps 1 --no-liger --no-doc
                                  --device cpu|cuda --dtype fp32|bf16 --threads N]
    python bench/bench_losses.py --tokens 1024,4096,8192 --hidden 256,1024   # a sweep, one block

Variants (each run in a fresh subprocess, so one variant's peak cannot hide in another's):
  plain        ``sparse_divergence(hidden @ W.T, ids, logprobs)``: holds the [N, V] logits
  fused@C      ``fused_sparse_divergence(hidden, W, ids, logprobs, chunk_size=C)``; fused@auto is
               chunk_size=0, the factory's default (``chunk_rows``: ~64 MiB of fp32 logits)
  liger-jsd    ``fused_dense_jsd`` (liger-kernel's LigerFusedLinearJSDLoss) with an in-process
               teacher of the same size: a different problem (a dense teacher, so also a teacher
               matmul and a dense JSD), shown for scale, not like-for-like. Run uncompiled with
               --liger-chunk-size tokens per chunk (default 256): on CPU its torch.func chunk
               step holds about 18 fp32 copies of a [chunk, V] block (measured), so liger's
               own default of 1024 would need ~11 GiB at V = 151,936

Memory: torch's CPU allocator hands large blocks straight to the OS (glibc mmap), so the
process's resident set tracks live tensors; tracemalloc does not see them at all. Each child
builds its inputs, runs a tiny warm-up (library initialisation), records VmRSS as the baseline,
resets the kernel's high-water mark (write "5" to /proc/self/clear_refs; falls back to
ru_maxrss, which then includes the set-up), runs one forward+backward and reads VmHWM. On
CUDA the same protocol uses torch.cuda.memory_allocated / max_memory_allocated (exact per
allocation, the caching allocator's reserve not counted).
"Working" = peak - baseline: everything the loss and its backward allocate, including the
[V, H] weight gradient every variant returns.

Time: median forward+backward wall time over --rounds x --reps. Each round runs every variant
once, in turn, each in its own subprocess, so a change in the load of a shared machine falls on
all variants alike rather than on whichever ran during it (defaults on CPU: 3 rounds of 1 rep).
On CUDA (defaults: 1 round of 10 reps) each child first runs one full-size forward+backward as a
warm-up (cuBLAS handles, Triton and torch.compile), outside the measurement.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factory.losses import fused_dense_jsd, fused_sparse_divergence, sparse_divergence  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Loss kernels"
MIB = 2**20
MEMORY_TARGET = 1 / 8  # fused working memory at most 1/8 of the plain path's
TIME_TARGET = 1.5  # at no more than 1.5x its time
# issue 8: within 1.2x of liger's time "where both apply". Liger's fused JSD needs an in-process
# teacher (a second head matmul and a dense divergence); ours reads a cached top-k teacher. With
# an in-process teacher the factory calls liger itself, so the like-for-like case is 1.0x by
# construction; the line compares the cached-teacher kernel against liger's at the same size.
LIGER_TARGET = 1.2


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _inputs(tokens: int, vocab: int, hidden: int, k: int, dtype: torch.dtype, device="cpu"):
    """Student hidden states and head, and a top-k cache whose k ids carry 90% of the mass."""
    gen = torch.Generator().manual_seed(0)
    hidden_nh = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    weight_vh = (torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5)).to(device, dtype)
    weight_vh.requires_grad_()
    # distinct ids per row without an [N, V] temporary: a random offset plus a fixed stride
    stride = vocab // k
    ids_nk = (torch.randint(vocab, (tokens, 1), generator=gen) + torch.arange(k) * stride) % vocab
    logprobs_nk = (torch.randn(tokens, k, generator=gen) * 2).log_softmax(-1) + math.log(0.9)
    logprobs_nk = logprobs_nk.sort(-1, descending=True).values
    return hidden_nh, weight_vh, ids_nk.to(device), logprobs_nk.to(device)


def _loss_fn(variant, hidden_nh, weight_vh, ids_nk, logprobs_nk, teacher, liger_chunk, compiled):
    if variant == "plain":
        return lambda: sparse_divergence(hidden_nh @ weight_vh.T, ids_nk, logprobs_nk, kind="fkl")
    if variant.startswith("fused@"):
        chunk = variant.split("@")[1]
        chunk = 0 if chunk == "auto" else int(chunk)  # 0: the factory's default, chunk_rows
        return lambda: fused_sparse_divergence(
            hidden_nh, weight_vh, ids_nk, logprobs_nk, kind="fkl", chunk_size=chunk
        )
    if variant == "liger-jsd":
        teacher_nh, teacher_vh = teacher
        return lambda: fused_dense_jsd(
            hidden_nh, weight_vh, teacher_nh, teacher_vh, beta=0.5, chunk_size=liger_chunk,
            compiled=compiled,
        )
    raise ValueError(f"unknown variant {variant}")


def run_child(variant: str, args) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device == "cuda"
    compiled = cuda  # liger's own recommendation on GPU; on CPU torch.compile needs a toolchain

    def build(tokens, vocab, hidden, k):
        tensors = _inputs(tokens, vocab, hidden, k, dtype, args.device)
        teacher = None
        if variant == "liger-jsd":
            gen = torch.Generator().manual_seed(1)
            teacher = (
                torch.randn(tokens, hidden, generator=gen).to(args.device, dtype),
                (torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5)).to(
                    args.device, dtype
                ),
            )
        return tensors, _loss_fn(variant, *tensors, teacher, args.liger_chunk_size, compiled)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # warm-up at a tiny size: imports, thread pools, kernel dispatch
    _, warm = build(64, 1024, 64, min(args.k, 16))
    warm().backward()
    (hidden_nh, weight_vh, _, _), loss_fn = build(args.tokens, args.vocab, args.hidden, args.k)
    del warm
    if cuda:  # and at full size on GPU, where first calls compile and autotune
        loss_fn().backward()
        hidden_nh.grad = weight_vh.grad = None
    gc.collect()
    sync()
    if cuda:
        torch.cuda.empty_cache()
        baseline_kib = torch.cuda.memory_allocated() / 1024
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated"
    else:
        baseline_kib = _status_kib("VmRSS")
        method = "VmHWM after clear_refs" if _reset_peak() else "ru_maxrss (includes set-up)"
    times, peak_kib, loss_value = [], None, None
    for rep in range(args.reps):
        hidden_nh.grad = weight_vh.grad = None
        sync()
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
        if rep == 0:
            if cuda:
                peak_kib = torch.cuda.max_memory_allocated() / 1024
            elif method.startswith("VmHWM"):
                peak_kib = _status_kib("VmHWM")
            else:
                peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            loss_value = loss.item()
        del loss
    return {
        "variant": variant,
        "baseline_mib": baseline_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "working_mib": (peak_kib - baseline_kib) / 1024,
        "times_s": times,
        "median_s": statistics.median(times),
        "loss": loss_value,
        "memory_method": method,
    }


def _machine(device: str) -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:  # liger is optional for this bench
        liger = "not installed"
    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "torch": torch.__version__,
        "liger": liger,
        "python": platform.python_version(),
        "load": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }


def _merge(runs: list[dict]) -> dict:
    """One variant's rounds: its largest working memory, the median of all its timings."""
    worst = max(runs, key=lambda r: r["working_mib"])
    times = [t for r in runs for t in r["times_s"]]
    return {**worst, "times_s": times, "median_s": statistics.median(times)}


def _table(results: list[dict], plain: dict | None) -> str:
    lines = [
        "| variant | peak (MiB) | working = peak - inputs (MiB) | vs plain | fwd+bwd median (s) "
        "| vs plain | all timings (s) | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        mem_ratio = f"{r['working_mib'] / plain['working_mib']:.3f}" if plain else "-"
        time_ratio = f"{r['median_s'] / plain['median_s']:.2f}x" if plain else "-"
        digits = 1 if r["median_s"] >= 1 else 4
        reps = ", ".join(f"{t:.{digits}f}" for t in r["times_s"])
        lines.append(
            f"| {r['variant']} | {r['peak_mib']:.0f} | {r['working_mib']:.0f} | {mem_ratio} "
            f"| {r['median_s']:.{digits}f} | {time_ratio} | {reps} | {r['loss']:.5f} |"
        )
    return "\n".join(lines)


def _verdicts(results: list[dict], plain: dict | None, grad_weight_mib: float) -> list[str]:
    if plain is None:
        return []
    liger = next((r for r in results if r["variant"] == "liger-jsd"), None)
    out = []
    for r in results:
        if not r["variant"].startswith("fused@"):
            continue
        mem = r["working_mib"] / plain["working_mib"]
        tim = r["median_s"] / plain["median_s"]
        beyond = (r["working_mib"] - grad_weight_mib) / plain["working_mib"]
        vs_liger = ""
        if liger is not None:
            lt = r["median_s"] / liger["median_s"]
            vs_liger = (f" Time {lt:.2f}x liger's fused JSD (target <= {LIGER_TARGET}x): "
                        f"{'met' if lt <= LIGER_TARGET else 'NOT met'}.")
        out.append(
            f"- {r['variant']}: memory {mem:.3f} of plain (target <= {MEMORY_TARGET:.3f}): "
            f"{'met' if mem <= MEMORY_TARGET else 'NOT met'}; time {tim:.2f}x plain "
            f"(target <= {TIME_TARGET}x): {'met' if tim <= TIME_TARGET else 'NOT met'}. "
            f"Without its {grad_weight_mib:.0f} MiB weight-gradient output it holds "
            f"{beyond:.3f} of plain's working memory.{vs_liger}"
        )
    return out


def _append_doc(block: str) -> None:
    intro = (
        f"{SECTION}\n\n"
        "`bench/bench_losses.py`: the sparse-teacher loss (cached top-k, fkl) through the LM "
        "head, fused (`fused_sparse_divergence`, logits one chunk at a time) against the plain "
        "path (`sparse_divergence(hidden @ W.T)`, full fp32 logits), and liger-kernel's fused "
        "JSD with an in-process teacher for scale. Each variant runs in a fresh subprocess; "
        "memory is the resident-set high-water mark above the inputs (VmHWM after resetting it "
        "through /proc/self/clear_refs), which is honest on CPU because torch returns large "
        "blocks to the OS; tracemalloc cannot see torch tensors. Time is the median "
        "forward+backward wall time. Targets: fused working memory <= 1/8 of plain at <= 1.5x "
        "its time. The machines are shared (other developers' jobs run on the same 2 cores), "
        "so times are noisy; the load average at the start of each run is recorded.\n"
    )
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if SECTION not in text:
        text = text.rstrip("\n") + "\n\n" + intro
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt < 0 else nxt + 1
    section = text[start:end].rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    text = text[:start] + section + ("\n" + text[end:] if nxt >= 0 else "")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def _run_size(args, variants, tokens: int, hidden: int) -> tuple[list[dict], dict]:
    """Every variant at one size, in rounds; each variant's runs merged."""
    child_args = ["--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(args.vocab),
                  "--k", str(args.k), "--dtype", args.dtype, "--device", args.device,
                  "--liger-chunk-size", str(args.liger_chunk_size), "--threads", str(args.threads),
                  "--reps", str(args.reps)]
    runs = {v: [] for v in variants}
    failures = {}
    for _ in range(args.rounds):
        for variant in variants:
            if variant in failures:
                continue
            proc = subprocess.run(
                [sys.executable, __file__, *child_args, "--child", variant],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if proc.returncode != 0:
                print(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                failures[variant] = proc.stderr.strip().splitlines()[-1][:300]
                continue
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{tokens} x {hidden}: {json.dumps(runs[variant][-1])}", flush=True)
    return [_merge(rs) for rs in runs.values() if rs], failures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="4096", help="comma-separated: a sweep")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", default="1024", help="comma-separated: a sweep")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk-sizes", default="1024,256",
                        help="fused variants, comma-separated; 0 is the factory's default (auto: "
                             "about 64 MiB of fp32 logits per chunk)")
    parser.add_argument("--rounds", type=int, help="default: 3 on CPU, 1 on CUDA")
    parser.add_argument("--reps", type=int, help="timed reps per child; default: 1 CPU, 10 CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-liger", action="store_true", help="skip the liger fused JSD variant")
    parser.add_argument(
        "--liger-chunk-size",
        type=int,
        default=256,
        help="liger's chunk: uncompiled on CPU it holds ~18 fp32 copies of a [chunk, V] block",
    )
    parser.add_argument("--no-doc", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    args.rounds = args.rounds or (1 if cuda else 3)
    args.reps = args.reps or (10 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        args.tokens, args.hidden = int(args.tokens), int(args.hidden)
        print(json.dumps(run_child(args.child, args)))
        return

    sizes = [(int(n), int(h)) for h in args.hidden.split(",") for n in args.tokens.split(",")]
    variants = ["plain"] + [f"fused@{'auto' if c == '0' else c}"
                            for c in args.chunk_sizes.split(",") if c]
    if not args.no_liger:
        variants.append("liger-jsd")
    machine = _machine(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python bench/bench_losses.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"# {command.strip()}\n# {json.dumps(machine)}", flush=True)
    bytes_per = 4 if args.dtype == "fp32" else 2
    if cuda:
        where = f"{machine['gpu']} (CUDA), host {machine['nproc']} CPUs ({machine['cpu']}), torch"
        load = "; memory from the CUDA allocator, times after torch.cuda.synchronize"
    else:
        where = f"{machine['nproc']} CPUs ({machine['cpu']}), torch"
        load = (f"; load average at start {machine['load'][0]:.1f} (shared machine: timings are "
                "noisy)")
    body = []
    for tokens, hidden in sizes:
        results, failures = _run_size(args, variants, tokens, hidden)
        plain = next((r for r in results if r["variant"] == "plain"), None)
        grad_weight_mib = args.vocab * hidden * bytes_per / MIB
        logits_mib = tokens * args.vocab * 4 / MIB
        if len(sizes) > 1:
            body += [f"#### {tokens} tokens x hidden {hidden}", ""]
        body += [
            f"- sizes: one fp32 [N, V] logits tensor is {logits_mib:.0f} MiB; the [V, H] weight "
            f"gradient every variant returns is {grad_weight_mib:.0f} MiB",
            "",
            _table(results, plain),
            "",
            *_verdicts(results, plain, grad_weight_mib),
            *(f"- {v} failed: `{msg}`" for v, msg in failures.items()),
            "",
        ]
    what = (f"{args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}" if len(sizes) == 1
            else f"tokens {args.tokens} x hidden {args.hidden}, vocab {args.vocab}")
    block = "\n".join(
        [
            f"### {started:%Y-%m-%d %H:%M} UTC: {what}, k {args.k}, {args.dtype}, {args.device}",
            "",
            f"- command: `{command.strip()}`",
            f"- machine: {where} {machine['torch']} ({machine['torch_threads']} threads), "
            f"liger-kernel {machine['liger']}, Python {machine['python']}{load}",
            f"- memory method: "
            f"{'torch.cuda.max_memory_allocated' if cuda else 'VmHWM after clear_refs'} "
            f"(largest of {args.rounds} round(s)); time: median of {args.rounds} round(s) x "
            f"{args.reps} rep(s)",
            "",
            *body,
        ]
    )
    print("\n" + block)
    if not args.no_doc:
        _append_doc(block)
        print(f"\nappended to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
