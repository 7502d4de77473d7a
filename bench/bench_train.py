"""Training throughput of the off-policy distillation step: tokens/s and model-FLOPs utilisation
against this machine's measured fp32 matmul peak, where the step's time goes, and the share of
it spent reading the logit cache.

    taskset -c 1 python bench/bench_train.py                 # 30M student + the tiny student
    taskset -c 1 python bench/bench_train.py --students 30M --rounds 1 --no-doc   # a quick look

What runs is the stage's own code: `CacheReplay.micro_step` (factory/stages/distill.py: rows of
the off-policy set, their cached teacher rows, `pack`, the student forward to its last hidden
states, `fused_sparse_divergence` against the top-k cache, the ce/entropy metrics pass) through
`factory.loop.train` (accelerate, AdamW, clipping, schedule), one process, fp32, one torch thread
by default. Inputs come from bench/world.py: the arith task's gold traces as the teacher's
responses in both modes ("arith", the tiny world's lengths) or tiled to random lengths 4-180
("spread", lengths that vary like real teacher responses), and a compact top-64 cache.

Students (conf/student/tiny.yaml with arch overrides):
  30M   hidden 512, 8 layers, 8/4 heads of 64, intermediate 2048, vocab 128 (31.5M parameters)
  tiny  the tiny world's own student (hidden 64, 2 layers): steps are short, so it is the worst
        case for the share of the step spent reading the cache

MFU = 6 N tokens / step time / peak, N = `count_params(card)["flops_params"]` (non-embedding
parameters + LM head), tokens = the real tokens of the step (padding is waste, not work);
attention's score FLOPs are left out (about 1% here at ~70-token sequences). Peak = median of
5 fp32 `torch.mm` of [2048, 2048] at the same thread count, measured before every variant of
every round. The machine is shared with other developers' jobs: rates are given per CPU second
of this process (steady under load) and per wall second; both MFUs use the peak measured the
same way.

Variants, run in turn in each round (a fresh student, same seed, each time):
  padded       the step before packing (every sequence in its own right-padded row): `pack`
               patched here with the old layout, for the side-by-side ratio
  packed       the stage as it is (`pack` shares rows between sequences, none wider than the
               longest; since 2026-11-29 the loop's AdamW uses torch's fused CPU kernel, which
               an earlier "packed, fused AdamW" variant patched in to measure first)

Breakdown (packed variant; CPU ms per step, summed over its micro-batches): cache read =
`CacheReplay.teacher_rows` (`CacheReader.batch_flat`: gather + decode, then the kept rows),
batching = the off-policy set's rows + `pack`, forward + loss = the rest of `batch_loss`,
optimizer = AdamW's step (optimizer step hooks), backward and the rest = what remains.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import world  # noqa: E402  bench/world.py (the script's folder is on sys.path)
from report import cpu_model, publish  # noqa: E402

import factory.stages.distill as distill  # noqa: E402
from factory.loop import train  # noqa: E402
from students.builders import build_model, count_params  # noqa: E402

STUDENTS = {
    "30M": ["student.arch.hidden_size=512", "student.arch.num_hidden_layers=8",
            "student.arch.num_attention_heads=8", "student.arch.num_key_value_heads=4",
            "student.arch.head_dim=64", "student.arch.intermediate_size=2048"],
    "tiny": [],
}
VARIANTS = ("padded", "packed")
MFU_TARGET = 0.30
CACHE_TARGET = 0.05
PEAK_N = 2048
_ORIGINAL_PACK = distill.pack


def padded_pack(sequences, starts, offsets, pad_id):
    """The layout `pack` had before it shared rows: sequence i right-padded in row i."""
    width = max(len(s) for s in sequences)
    ids_bl = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask_bl = torch.zeros_like(ids_bl)
    rows, positions = [], []
    for i, (seq, start, offs) in enumerate(zip(sequences, starts, offsets)):
        ids_bl[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask_bl[i, : len(seq)] = 1
        rows.extend([i] * len(offs))
        positions.extend(start + t - 1 for t in offs)
    row_n, pos_n = torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
    return distill.Packed(ids_bl, mask_bl, row_n, pos_n, ids_bl[row_n, pos_n + 1])


class Parts:
    """CPU and wall seconds spent in named parts of the step, and the step's row layout."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.cpu, self.wall = {}, {}
        self.slots = self.real = 0

    @contextlib.contextmanager
    def timed(self, name):
        t, p = world.time_now()
        try:
            yield
        finally:
            t2, p2 = world.time_now()
            self.cpu[name] = self.cpu.get(name, 0.0) + p2 - p
            self.wall[name] = self.wall.get(name, 0.0) + t2 - t

    def wrap(self, name, fn):
        def wrapped(*a, **kw):
            with self.timed(name):
                return fn(*a, **kw)
        return wrapped


class TimedDataset:
    """The off-policy set, its row fetches timed as batching."""

    def __init__(self, dataset, parts: Parts):
        self._dataset, self._parts = dataset, parts

    def __getitem__(self, key):
        with self._parts.timed("batching"):
            return self._dataset[key]

    def __getattr__(self, name):
        return getattr(self._dataset, name)


class StepClock:
    """A metrics logger (log_every=1) that timestamps each step and collects its parts."""

    def __init__(self, parts: Parts):
        self.parts, self.marks = parts, []

    def log(self, stage, step, metrics):
        wall, cpu = world.time_now()
        p = self.parts
        self.marks.append(dict(wall=wall, cpu=cpu, tokens=metrics["tokens"], slots=p.slots,
                               real=p.real, parts=dict(p.cpu), parts_wall=dict(p.wall)))
        p.reset()


def run_variant(cfg, dataset, cache_dir, variant: str, steps: int, warmup: int, work: Path):
    """Train a fresh student `warmup + steps` steps through the loop; per-step measurements of
    the last `steps`."""
    stage_cfg = cfg.pipeline.off_policy
    replay = world.replay_for(cfg, dataset, cache_dir,
                              [stage_cfg.batch_size] * stage_cfg.grad_accum)
    parts = Parts()
    replay.dataset = TimedDataset(dataset, parts)
    replay.teacher_rows = parts.wrap("cache read", replay.teacher_rows)
    batch_loss = replay.batch_loss
    replay.batch_loss = parts.wrap("step code", batch_loss)
    base_pack = padded_pack if variant == "padded" else distill.pack

    def pack(*a, **kw):
        with parts.timed("batching"):
            out = base_pack(*a, **kw)
        parts.slots += out.input_ids_bl.numel()
        parts.real += int(out.attention_mask_bl.sum())
        return out

    opt_start = {}

    def pre_hook(opt, args, kwargs):
        opt_start["t"] = world.time_now()

    def post_hook(opt, args, kwargs):
        t, p = opt_start.pop("t")
        t2, p2 = world.time_now()
        parts.cpu["optimizer"] = parts.cpu.get("optimizer", 0.0) + p2 - p
        parts.wall["optimizer"] = parts.wall.get("optimizer", 0.0) + t2 - t

    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    handles = [register_optimizer_step_pre_hook(pre_hook),
               register_optimizer_step_post_hook(post_hook)]
    torch.manual_seed(0)
    model = build_model(cfg.student, init="scratch")
    model.train()
    clock = StepClock(parts)
    distill.pack = pack
    try:
        train(model, replay.micro_step, stage="bench", steps=warmup + steps, lr=stage_cfg.lr,
              warmup_ratio=0.0, grad_accum=stage_cfg.grad_accum, trainer_cfg=cfg.trainer,
              work_dir=work, metrics=clock)
    finally:
        distill.pack = _ORIGINAL_PACK
        for h in handles:
            h.remove()
        shutil.rmtree(work, ignore_errors=True)
    out = []
    for prev, cur in zip(clock.marks[warmup - 1:], clock.marks[warmup:]):
        p = cur["parts"]
        step_code = p.get("step code", 0.0)
        out.append(dict(
            wall=cur["wall"] - prev["wall"], cpu=cur["cpu"] - prev["cpu"],
            tokens=cur["tokens"] - prev["tokens"], slots=cur["slots"], real=cur["real"],
            cache=p.get("cache read", 0.0), cache_wall=cur["parts_wall"].get("cache read", 0.0),
            batching=p.get("batching", 0.0), optimizer=p.get("optimizer", 0.0),
            fwd_loss=step_code - p.get("cache read", 0.0) - p.get("batching", 0.0)))
    return out



def profile_step(cfg, dataset, cache_dir, top: int = 8) -> list[tuple[str, float]]:
    """torch.profiler over one packed off-policy step (micro-step, backward, AdamW): the ops
    with the most self CPU time, as (name, share of the step)."""
    from torch.profiler import ProfilerActivity, profile

    stage_cfg = cfg.pipeline.off_policy
    replay = world.replay_for(cfg, dataset, cache_dir, [stage_cfg.batch_size])
    torch.manual_seed(0)
    model = build_model(cfg.student, init="scratch").train()
    opt = torch.optim.AdamW(model.parameters(), lr=stage_cfg.lr, betas=(0.9, 0.95))

    def step(s):
        replay.micro_step(model, s, 0).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(2)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def med(xs):
    return float(statistics.median(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--students", default="30M,tiny")
    ap.add_argument("--profiles", default="arith,spread")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant and round "
                    "(the tiny student runs 10x as many)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", type=int, default=256, help="arith problems (x 2 modes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = world.loadavg()
    t_start = world.time_now()[0]
    students = args.students.split(",")
    profiles = args.profiles.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    results = {}  # (student, profile, variant) -> list of step dicts
    peaks = []  # (wall, cpu) FLOP/s
    ops = []
    try:
        cfgs, worlds = {}, {}
        for s in students:
            cfgs[s] = world.compose_cfg(STUDENTS[s] + [
                f"trainer.num_threads={args.threads}", "trainer.progress=false",
                "trainer.log_every=1", "trainer.checkpoint_every=0"])
        for prof in profiles:
            cfg = cfgs[students[0]]  # the set and cache depend on the tokenizer and vocab only
            ds = world.offpolicy_set(tmp / f"set-{prof}", cfg, args.problems, prof)
            cache = world.logit_cache(tmp / f"cache-{prof}", ds, cfg.pipeline.cache,
                                      cfg.student.arch.vocab_size)
            worlds[prof] = (ds, cache)
        for r in range(args.rounds):
            for s in students:
                steps = args.steps * (10 if s == "tiny" else 1)
                for prof in profiles:
                    # rotate the order each round: the first variant after a new world or
                    # student pays first-touch costs the others do not
                    for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                        peaks.append(world.matmul_peak(PEAK_N))
                        out = run_variant(cfgs[s], *worlds[prof], variant, steps, args.warmup,
                                          tmp / "work")
                        results.setdefault((s, prof, variant), []).extend(out)
                        print(f"round {r} {s} {prof} {variant}: "
                              f"{med([o['cpu'] for o in out]):.3f} CPU s/step, "
                              f"{med([o['tokens'] for o in out]):.0f} tokens, "
                              f"load {world.loadavg()}", flush=True)
        if "30M" in students:
            ops = profile_step(cfgs["30M"], *worlds[profiles[0]])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    peak_wall = med([p[0] for p in peaks])
    peak_cpu = med([p[1] for p in peaks])
    rows, breakdown, target_lines = [], [], []
    for s in students:
        n = count_params(cfgs[s].student)["flops_params"]
        for prof in profiles:
            base = None
            for variant in VARIANTS:
                out = results[(s, prof, variant)]
                tok = med([o["tokens"] for o in out])
                wall, cpu = med([o["wall"] for o in out]), med([o["cpu"] for o in out])
                tps_wall = med([o["tokens"] / o["wall"] for o in out])
                tps_cpu = med([o["tokens"] / o["cpu"] for o in out])
                mfu_wall = 6 * n * tps_wall / peak_wall
                mfu_cpu = 6 * n * tps_cpu / peak_cpu
                pad = 1 - sum(o["real"] for o in out) / sum(o["slots"] for o in out)
                if base is None:
                    base = tps_cpu
                rows.append(
                    f"| {s} | {prof} | {variant} | {tok:,.0f} | {pad:.0%} | {wall:.3f} ({cpu:.3f}) "
                    f"| {tps_wall:,.0f} ({tps_cpu:,.0f}) | {6 * n * tps_cpu / 1e9:.1f} | "
                    f"{mfu_wall:.1%} | {mfu_cpu:.1%} | {tps_cpu / base:.2f}x |")
                if variant == "packed":
                    parts = {k: med([o[k] / o["cpu"] for o in out])
                             for k in ("cache", "batching", "fwd_loss", "optimizer")}
                    rest = 1 - sum(parts.values())
                    cache_wall = med([o["cache_wall"] / o["wall"] for o in out])
                    breakdown.append(
                        f"| {s} | {prof} | {cpu * 1e3:,.1f} | "
                        f"{med([o['cache'] for o in out]) * 1e3:.2f} ({parts['cache']:.2%}; "
                        f"wall {cache_wall:.2%}) | {parts['batching']:.1%} | "
                        f"{parts['fwd_loss']:.1%} | {rest:.1%} | {parts['optimizer']:.1%} |")
                    worst = max(parts["cache"], cache_wall)
                    target_lines.append(
                        f"- Cache share, {s} student, {prof}: {parts['cache']:.2%} of the step's "
                        f"CPU time ({cache_wall:.2%} of its wall time), target < "
                        f"{CACHE_TARGET:.0%}: {'met' if worst < CACHE_TARGET else 'NOT met'}, "
                        f"{CACHE_TARGET / max(worst, 1e-9):.0f}x under." if worst < CACHE_TARGET
                        else f"- Cache share, {s} student, {prof}: {worst:.1%}, target < "
                        f"{CACHE_TARGET:.0%}: NOT met.")
                    if s == "30M":
                        verdict = "met" if mfu_cpu >= MFU_TARGET else "NOT met"
                        target_lines.insert(0,
                            f"- MFU, 30M student, {prof}, the stage as it is (packed): "
                            f"{mfu_cpu:.1%} per CPU second ({mfu_wall:.1%} per wall second), "
                            f"target >= {MFU_TARGET:.0%}: {verdict}, "
                            f"{mfu_cpu / MFU_TARGET:.2f}x the target.")
    counts = {s: count_params(cfgs[s].student)["total"] for s in students}
    cmd = "python bench/bench_train.py " + " ".join(sys.argv[1:])
    cfg0 = cfgs[students[0]]
    section = "\n".join([
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: off-policy step, "
        f"{', '.join(f'{s} ({counts[s] / 1e6:.2f}M params)' for s in students)}",
        "",
        f"- command: `{world.taskset()} {cmd.strip()}` ({world.time_now()[0] - t_start:.0f} s)",
        f"- machine: {cpu_model()}, pinned to one core, torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average at start "
        f"{load0}, at end {world.loadavg()} (shared machine: per-CPU-second rates are the "
        f"steady ones)",
        f"- peak: fp32 torch.mm [{PEAK_N}]^2, median of {len(peaks)} measurements (each a median "
        f"of 5): {peak_cpu / 1e9:.1f} GFLOP per CPU second, {peak_wall / 1e9:.1f} per wall second",
        f"- step: batch {cfg0.pipeline.off_policy.batch_size} rows x grad_accum "
        f"{cfg0.pipeline.off_policy.grad_accum}, max_len {cfg0.pipeline.off_policy.max_len}, "
        f"loss {cfg0.loss.kind} chunk {cfg0.loss.chunk_size}, cache k {cfg0.pipeline.cache.k} "
        f"{cfg0.pipeline.cache.encoding}; {args.rounds} round(s) x {args.steps} measured steps "
        f"(tiny: x10) after {args.warmup} warm-up step(s); medians over steps and rounds",
        "",
        "| student | lengths | variant | tokens/step | padding | s/step wall (CPU) | "
        "tokens/s wall (CPU) | GFLOP per CPU s | MFU wall | MFU CPU | vs padded (CPU) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Where the packed step's CPU time goes (shares of the step; cache read in ms per step):",
        "",
        "| student | lengths | step CPU ms | cache read ms (share) | batching | forward + loss | "
        "backward + clip + loop | optimizer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *breakdown,
        "",
        *([f"Top ops of one 30M {profiles[0]} step (torch.profiler, self CPU): "
           + ", ".join(f"{name} {share:.0%}" for name, share in ops), ""] if ops else []),
        *target_lines,
        "",
    ])
    publish(section, append=not args.no_doc)


if __name__ == "__main__":
    main()
