"""Peak memory and forward+backward time of the sparse-teacher loss: fused vs plain (and liger).

    python bench/bench_losses.py [--tokens 4096 --vocab 151936 --hidden 1024 --k 64
                                  --chunk-sizes 1024,256 --reps 3 --no-liger --no-doc]

Variants (each in a fresh subprocess, so one variant's peak cannot hide in another's):
  plain        ``sparse_divergence(hidden @ W.T, ids, logprobs)``: holds the [N, V] logits
  fused@C      ``fused_sparse_divergence(hidden, W, ids, logprobs, chunk_size=C)``
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
ru_maxrss, which then includes the set-up), runs one forward+backward and reads VmHWM.
"Working" = peak - baseline: everything the loss and its backward allocate, including the
[V, H] weight gradient every variant returns. Time: median of --reps forward+backward passes
(the first is also the memory run).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
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


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _inputs(tokens: int, vocab: int, hidden: int, k: int, dtype: torch.dtype, seed: int = 0):
    """Student hidden states and head, and a top-k cache whose k ids carry 90% of the mass."""
    gen = torch.Generator().manual_seed(seed)
    hidden_nh = torch.randn(tokens, hidden, generator=gen).to(dtype).requires_grad_()
    weight_vh = (torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5)).to(dtype)
    weight_vh.requires_grad_()
    # distinct ids per row without an [N, V] temporary: a random offset plus a fixed stride
    stride = vocab // k
    ids_nk = (torch.randint(vocab, (tokens, 1), generator=gen) + torch.arange(k) * stride) % vocab
    logprobs_nk = (torch.randn(tokens, k, generator=gen) * 2).log_softmax(-1) + torch.tensor(0.9).log()
    logprobs_nk = logprobs_nk.sort(-1, descending=True).values
    return hidden_nh, weight_vh, ids_nk, logprobs_nk


def _loss_fn(variant: str, hidden_nh, weight_vh, ids_nk, logprobs_nk, teacher, liger_chunk=256):
    if variant == "plain":
        return lambda: sparse_divergence(hidden_nh @ weight_vh.T, ids_nk, logprobs_nk, kind="fkl")
    if variant.startswith("fused@"):
        chunk = int(variant.split("@")[1])
        return lambda: fused_sparse_divergence(
            hidden_nh, weight_vh, ids_nk, logprobs_nk, kind="fkl", chunk_size=chunk
        )
    if variant == "liger-jsd":
        teacher_nh, teacher_vh = teacher
        return lambda: fused_dense_jsd(
            hidden_nh, weight_vh, teacher_nh, teacher_vh, beta=0.5, chunk_size=liger_chunk
        )
    raise ValueError(f"unknown variant {variant}")


def run_child(variant: str, args) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def build(tokens, vocab, hidden, k):
        tensors = _inputs(tokens, vocab, hidden, k, dtype)
        teacher = None
        if variant == "liger-jsd":
            gen = torch.Generator().manual_seed(1)
            teacher = (
                torch.randn(tokens, hidden, generator=gen).to(dtype),
                (torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5)).to(dtype),
            )
        return tensors, _loss_fn(variant, *tensors, teacher, args.liger_chunk_size)

    # warm-up at a tiny size: imports, thread pools, kernel dispatch
    _, warm = build(64, 1024, 64, min(args.k, 16))
    warm().backward()
    (hidden_nh, weight_vh, _, _), loss_fn = build(args.tokens, args.vocab, args.hidden, args.k)
    del warm
    gc.collect()
    baseline_kib = _status_kib("VmRSS")
    exact_peak = _reset_peak()
    times, peak_kib, loss_value = [], None, None
    for rep in range(args.reps):
        hidden_nh.grad = weight_vh.grad = None
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - start)
        if rep == 0:
            peak_kib = _status_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
        "memory_method": "VmHWM after clear_refs" if exact_peak else "ru_maxrss (includes set-up)",
    }


def _machine() -> dict:
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
    }


def _table(results: list[dict], plain: dict | None) -> str:
    lines = [
        "| variant | peak RSS (MiB) | working = peak - inputs (MiB) | vs plain | fwd+bwd median (s) "
        "| vs plain | all reps (s) | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        mem_ratio = f"{r['working_mib'] / plain['working_mib']:.3f}" if plain else "-"
        time_ratio = f"{r['median_s'] / plain['median_s']:.2f}x" if plain else "-"
        reps = ", ".join(f"{t:.1f}" for t in r["times_s"])
        lines.append(
            f"| {r['variant']} | {r['peak_mib']:.0f} | {r['working_mib']:.0f} | {mem_ratio} "
            f"| {r['median_s']:.1f} | {time_ratio} | {reps} | {r['loss']:.5f} |"
        )
    return "\n".join(lines)


def _verdicts(results: list[dict], plain: dict | None, grad_weight_mib: float) -> list[str]:
    if plain is None:
        return []
    out = []
    for r in results:
        if not r["variant"].startswith("fused@"):
            continue
        mem = r["working_mib"] / plain["working_mib"]
        tim = r["median_s"] / plain["median_s"]
        beyond = (r["working_mib"] - grad_weight_mib) / plain["working_mib"]
        out.append(
            f"- {r['variant']}: memory {mem:.3f} of plain (target <= {MEMORY_TARGET:.3f}): "
            f"{'met' if mem <= MEMORY_TARGET else 'NOT met'}; time {tim:.2f}x plain "
            f"(target <= {TIME_TARGET}x): {'met' if tim <= TIME_TARGET else 'NOT met'}. "
            f"Without its {grad_weight_mib:.0f} MiB weight-gradient output it holds "
            f"{beyond:.3f} of plain's working memory."
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk-sizes", default="1024,256", help="fused variants, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
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

    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return

    variants = ["plain"] + [f"fused@{c}" for c in args.chunk_sizes.split(",") if c]
    if not args.no_liger:
        variants.append("liger-jsd")
    machine = _machine()
    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python bench/bench_losses.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"# {command.strip()}\n# {json.dumps(machine)}", flush=True)
    results = []
    child_args = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--no-doc",)]
    for variant in variants:
        proc = subprocess.run(
            [sys.executable, __file__, *child_args, "--child", variant],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            print(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)

    plain = next((r for r in results if r["variant"] == "plain"), None)
    bytes_per = 4 if args.dtype == "fp32" else 2
    grad_weight_mib = args.vocab * args.hidden * bytes_per / MIB
    logits_mib = args.tokens * args.vocab * 4 / MIB
    table = _table(results, plain)
    verdicts = _verdicts(results, plain, grad_weight_mib)
    block = "\n".join(
        [
            f"### {started:%Y-%m-%d %H:%M} UTC: {args.tokens} tokens x vocab {args.vocab}, "
            f"hidden {args.hidden}, k {args.k}, {args.dtype}",
            "",
            f"- command: `{command.strip()}`",
            f"- machine: {machine['nproc']} CPUs ({machine['cpu']}), torch "
            f"{machine['torch']} ({machine['torch_threads']} threads), liger-kernel "
            f"{machine['liger']}, Python {machine['python']}; load average at start "
            f"{machine['load'][0]:.1f} (shared machine: timings are noisy)",
            f"- sizes: one fp32 [N, V] logits tensor is {logits_mib:.0f} MiB; the [V, H] weight "
            f"gradient every variant returns is {grad_weight_mib:.0f} MiB",
            f"- memory method: {results[0]['memory_method'] if results else '-'}",
            "",
            table,
            "",
            *verdicts,
        ]
    )
    print("\n" + block)
    if not args.no_doc:
        _append_doc(block)
        print(f"\nappended to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
