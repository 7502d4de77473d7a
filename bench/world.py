"""The distillation benches' inputs, built with the project's own code: cards composed from the
Hydra tree (arch overrides on the tiny cards), an off-policy set in the teacher/generate stage's
format and a logit cache in the teacher/record stage's format.

The off-policy set is the arith task's gold traces standing in for the teacher's responses (as in
tests/integration/test_distill_stages.py), both modes; profile "spread" tiles each response to a
random length (4-180 tokens) so lengths vary the way real teacher responses do. The cache is
`from_logits` over Zipf-like synthetic logits (`synthetic_lm_logits`): the step's cost does not
depend on the values, only on k and the encoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    from factory.inspect import compose

    return compose(list(overrides))


def taskset() -> str:
    """The command prefix that pins a process to this one's CPUs (as it was run)."""
    cpus = sorted(os.sched_getaffinity(0))
    return f"taskset -c {','.join(map(str, cpus))}" if len(cpus) < (os.cpu_count() or 0) else ""


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def offpolicy_set(out: Path, cfg, n_problems: int, profile: str = "arith", seed: int = 0):
    """Write the off-policy set (datasets.save_to_disk under `out`/data) and return it."""
    import datasets

    from factory import chat
    from factory.stages.distill import OFFPOLICY_DATA
    from factory.stages.models import tokenizer_for
    from factory.tasks.registry import build_task

    if profile not in ("arith", "spread"):
        raise ValueError(f"profile {profile!r}: expected arith or spread")
    tokenizer = tokenizer_for(cfg.student)
    rng = np.random.default_rng(seed)
    rows = []
    for p in build_task(cfg.task).problems("train", n_problems):
        for mode in ("think", "no_think"):
            thinking = mode == "think"
            text = chat.assistant_text(p.reasoning, p.answer, thinking)
            response = chat.encode(tokenizer, text)
            if profile == "spread":
                length = int(rng.integers(4, 181))
                response = (response * (length // len(response) + 1))[:length]
            rows.append({
                "row": len(rows), "problem_id": p.id, "mode": mode,
                "prompt_ids": chat.prompt_ids(tokenizer, [chat.user_message(p.prompt, mode)],
                                              enable_thinking=thinking),
                "response_ids": response, "response_text": text, "correct": True})
    path = Path(out) / OFFPOLICY_DATA
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def logit_cache(out: Path, dataset, cache_cfg, vocab_size: int, seed: int = 0) -> Path:
    """A logit cache over `dataset`'s responses, encoded as `cache_cfg` asks (k, encoding, bits)."""
    from teachers.cache import CacheSpec, CacheWriter, from_logits, synthetic_lm_logits

    spec = CacheSpec(k=cache_cfg.k, mode=cache_cfg.mode, encoding=cache_cfg.encoding,
                     vocab_size=vocab_size, teacher="synthetic-zipf",
                     logprob_bits=cache_cfg.logprob_bits)
    g = torch.Generator().manual_seed(seed)
    with CacheWriter(out, spec, shard_tokens=cache_cfg.shard_tokens) as writer:
        for row, response in zip(dataset["row"], dataset["response_ids"]):
            z = synthetic_lm_logits(len(response), vocab_size, g)
            writer.add(row, *from_logits(z, spec.k, spec.mode, g))
    return Path(out)


def replay_for(cfg, dataset, cache_dir: Path, rows_per_micro: list[int]):
    """The off-policy stage's batches (`CacheReplay`) over the set and its cache."""
    from factory.stages.distill import CacheReplay, cache_expect
    from factory.stages.models import tokenizer_for
    from teachers.cache import CacheReader

    reader = CacheReader(cache_dir, expect=cache_expect(cfg.pipeline.cache))
    return CacheReplay(dataset, reader, loss_cfg=cfg.loss, max_len=cfg.pipeline.off_policy.max_len,
                       pad_id=tokenizer_for(cfg.student).pad_token_id, seed=cfg.seed,
                       rows_per_micro=rows_per_micro, vocab_size=cfg.student.arch.vocab_size)


def matmul_peak(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """fp32 torch.mm of two [n, n] matrices at the current thread count: the median of `reps`
    timed runs after one warm-up, as (FLOP per wall second, FLOP per CPU second)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    wall, cpu = [], []
    for _ in range(reps):
        t, p = time_now()
        torch.mm(a, b, out=c)
        t2, p2 = time_now()
        wall.append(t2 - t)
        cpu.append(p2 - p)
    flops = 2.0 * n**3
    return flops / float(np.median(wall)), flops / float(np.median(cpu))


def time_now() -> tuple[float, float]:
    """(wall, this process's CPU) seconds."""
    import time

    return time.perf_counter(), time.process_time()


def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), in KiB."""
    import re

    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
