"""On-policy distillation side by side with TRL: seconds per step and peak memory of our
on-policy stage against TRL's DistillationTrainer and its experimental GKDTrainer, on the same
teacher, student, prompts, batch, generation length and steps, at the tiny world's vocabulary and
at Qwen3's (151,936).

TRL is not a dependency of this project: run this from a bench-only virtual environment.

    python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0 trl==1.16.0 -e .
    taskset -c 1 .bench-venv/bin/python bench/bench_trl.py             # both vocabularies
    taskset -c 1 .bench-venv/bin/python bench/bench_trl.py --vocabs 128 --rounds 1 --no-doc
    taskset -c 1 .bench-venv/bin/python bench/bench_trl.py --phases --vocabs 151936  # memory by phase

Each (vocabulary, trainer) runs in a fresh child process (so one's peak cannot hide in
another's), in turn within each round, so a change in the shared machine's load falls on all of
them alike. A child builds both models from the cards (conf/student/tiny.yaml and
conf/teacher/tiny-moe.yaml, `student.arch.vocab_size` / `teacher.arch.vocab_size` overridden;
random weights from fixed seeds, fp32) and the trainer, records its resident set as the baseline,
resets the high-water mark (/proc/self/clear_refs), trains warm-up + measured steps and reads
VmHWM at the end of the last step (before any checkpoint). Peak = VmHWM; working = peak -
baseline (what training allocates beyond the loaded models, libraries and trainer objects).

The same work on every side:
* prompts: the arith task's training problems rendered in thinking mode by the tiny chat template
  (the identical token ids on both sides: checked); `--batch` prompts per step, one sample each
  (TRL's trainers sample once per prompt; ours with n_per_prompt=1), one micro-batch;
* generation: at most `--new-tokens` tokens at temperature 1, top-k 0, top-p 1, stopping at the
  chat template's end tokens, from the student's weights at the start of the step;
* loss: reverse KL per completion token (TRL beta = 1; ours the "topk" estimator, the reverse KL
  on the teacher's top-k support plus its tail bucket, k = 64: the design's sparse teacher,
  against TRL's full-vocabulary teacher distribution; at vocab 128 k=64 is half the vocabulary);
  lambda = 1 (every step on-policy) on all sides;
* optimizer: AdamW, lr 5e-4, betas (0.9, 0.95), weight decay as trainer.weight_decay, cosine
  schedule without warm-up, gradient clipping at 1.0, fp32 (TRL: bf16=False), no gradient
  checkpointing (TRL's default is on; ours never checkpoints the model), one torch thread.
Ours runs twice: at the default `loss.chunk_size=0` (auto: ~64 MiB of fp32 logits per chunk of
the fused losses, 110 rows at 151,936) and at 1024 rows, the default before auto; the knob sets
most of its working memory at a large vocabulary.
Generated tokens per step are counted on every side (the student's `generate`/sampler output up
to its stop token) and shown, since random weights stop at random lengths at a small vocabulary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPLS = ("ours", "ours-chunk1024", "trl-distillation", "trl-gkd")
LABELS = {"ours": "ours: on-policy stage (`OnPolicyData` through `factory.loop.train`)",
          "ours-chunk1024": "ours, `loss.chunk_size=1024` (the default before auto)",
          "trl-distillation": "TRL `DistillationTrainer`",
          "trl-gkd": "TRL `experimental.gkd.GKDTrainer`"}
LR, BETAS = 5e-4, (0.9, 0.95)
SPEED_TARGET, MEMORY_TARGET = 2.0, 0.5


# ----------------------------------------------------------------------------------------------
# Child: one trainer, one vocabulary
# ----------------------------------------------------------------------------------------------


def _setup(args):
    import torch

    import world

    torch.set_num_threads(args.threads)
    cfg = world.compose_cfg([
        f"student.arch.vocab_size={args.vocab}", f"teacher.arch.vocab_size={args.vocab}",
        f"trainer.num_threads={args.threads}", "trainer.progress=false", "trainer.log_every=1",
        "trainer.checkpoint_every=0",
        f"pipeline.on_policy.batch_size={args.batch}", "pipeline.on_policy.n_per_prompt=1",
        "pipeline.on_policy.grad_accum=1", "pipeline.on_policy.modes=[think]",
        f"pipeline.on_policy.max_new_tokens={args.new_tokens}", "pipeline.on_policy.gkd_lambda=1.0",
        "pipeline.on_policy.estimator=topk", "pipeline.on_policy.temperature=1.0",
        f"pipeline.on_policy.lr={LR}", "pipeline.on_policy.warmup_ratio=0.0",
        f"pipeline.on_policy.steps={args.warmup + args.steps}",
        *(["loss.chunk_size=1024"] if args.impl == "ours-chunk1024" else [])])
    from factory import chat
    from factory.stages.models import tokenizer_for
    from factory.tasks.registry import build_task
    from students.builders import build_model

    tokenizer = tokenizer_for(cfg.student)
    problems = build_task(cfg.task).problems("train", args.prompts)
    messages = [chat.user_message(p.prompt, "think") for p in problems]
    prompts = [chat.prompt_ids(tokenizer, [m], enable_thinking=True) for m in messages]
    torch.manual_seed(0)
    student = build_model(cfg.student, init="scratch")
    torch.manual_seed(1)
    teacher = build_model(cfg.teacher, init="scratch").eval()
    return cfg, tokenizer, problems, messages, prompts, student, teacher


class GenerationCounter:
    """Counts the tokens the student's `generate` returns, up to and including a stop token."""

    def __init__(self, model, stop_ids):
        import torch

        self.tokens, self.stop = 0, torch.tensor(sorted(stop_ids))
        self._generate = model.generate
        model.generate = self

    def __call__(self, *a, **kw):
        import torch

        out = self._generate(*a, **kw)
        seqs = out.sequences if hasattr(out, "sequences") else out
        prompt_len = (kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]
        new = seqs[:, prompt_len:]
        stop = torch.isin(new, self.stop)
        first = torch.where(stop.any(1), stop.int().argmax(1) + 1, new.shape[1])
        self.tokens += int(first.sum())
        return out


class PhaseProfile:
    """Resident-set high-water mark per phase of a step (--phases): each wrapped call resets
    VmHWM on entry and reads it on exit; an enclosing phase keeps the highest mark seen inside
    it, so nesting (TRL's loss runs the teacher's forward) reads right."""

    def __init__(self):
        self.open: list[dict] = []
        self.rows: list[dict] = []

    def wrap(self, owner, name: str, label: str) -> None:
        import functools

        import world

        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapped(*a, **kw):
            mark = world.rss_kib("VmHWM") / 1024
            for frame in self.open:
                frame["peak"] = max(frame["peak"], mark)
            frame = {"phase": label, "before": world.rss_kib("VmRSS") / 1024, "peak": 0.0}
            world.reset_peak_rss()
            self.open.append(frame)
            try:
                return fn(*a, **kw)
            finally:
                self.open.pop()
                frame["peak"] = max(frame["peak"], world.rss_kib("VmHWM") / 1024)
                frame["after"] = world.rss_kib("VmRSS") / 1024
                for outer in self.open:
                    outer["peak"] = max(outer["peak"], frame["peak"])
                self.rows.append(frame)

        setattr(owner, name, wrapped)


def install_phases(impl: str, student, teacher, trainer=None) -> PhaseProfile:
    import torch

    prof = PhaseProfile()
    if impl.startswith("ours"):
        import factory.stages.distill as distill
        from teachers.bank import HFBackend

        prof.wrap(distill, "sample", "sample (student generates)")
        prof.wrap(HFBackend, "score", "teacher scores (forward + top-k)")
        prof.wrap(distill, "response_hidden", "student forward (to hidden states)")
        prof.wrap(distill, "topk_reverse_kl", "loss (chunked head + divergence, grads formed)")
    else:
        prof.wrap(student, "generate", "sample (student generates)")
        prof.wrap(trainer, "compute_loss", "loss (student + teacher forward, divergence)")
        prof.wrap(teacher.model, "forward", "teacher forward (backbone; TRL projects it in the loss)")
    prof.wrap(torch.Tensor, "backward", "backward")
    prof.wrap(torch.optim.AdamW, "step", "optimizer step (AdamW)")
    return prof


def child(args) -> dict:
    import torch

    import world

    cfg, tokenizer, problems, messages, prompts, student, teacher = _setup(args)
    marks = []  # (wall, cpu) at the end of each step
    prof = None  # with --phases: the PhaseProfile, installed once the trainer exists
    step_rows = []  # with --phases: where each step's phase rows end
    peak = {}

    def mark(step: int):
        marks.append(world.time_now())
        if prof is not None:
            step_rows.append(len(prof.rows))
        if step == args.warmup + args.steps:
            peak["hwm"] = world.rss_kib("VmHWM")

    from factory.sampling import token_kwargs

    stop_ids = token_kwargs(tokenizer)["stop_ids"]
    work = Path(tempfile.mkdtemp(prefix=f"bench_trl_{args.impl}_"))
    counter = None
    if args.impl.startswith("ours"):
        from factory.loop import train
        from factory.stages.distill import OnPolicyCounters, OnPolicyData, Prompt, TaskGrader
        from teachers.bank import HFBackend

        stage_cfg = cfg.pipeline.on_policy
        counters = OnPolicyCounters()
        data = OnPolicyData(
            pools={"think": [Prompt(p.id, "think", ids) for p, ids in zip(problems, prompts)]},
            replay=None,  # lambda = 1: no off-policy step
            teacher=lambda: HFBackend(teacher, tokenizer, batch_size=cfg.pipeline.cache.batch_size),
            tokenizer=tokenizer, grade=TaskGrader(cfg.task), stage_cfg=stage_cfg,
            loss_cfg=cfg.loss, k=cfg.pipeline.cache.k, seed=cfg.seed, counters=counters)

        class Clock:
            def log(self, stage, step, metrics):
                mark(step)

        def run():
            train(student, data.micro_step, stage="bench", steps=stage_cfg.steps, lr=stage_cfg.lr,
                  warmup_ratio=0.0, grad_accum=1, trainer_cfg=cfg.trainer, work_dir=work,
                  metrics=Clock())
            return counters.sampled_tokens
    else:
        import datasets
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_end(self, targs, state, control, **kw):
                mark(state.global_step)

        tok = tokenizer_copy(tokenizer)
        common = dict(
            output_dir=str(work), per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=LR,
            lr_scheduler_type="cosine", warmup_steps=0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
            weight_decay=cfg.trainer.weight_decay, max_grad_norm=cfg.trainer.grad_clip,
            bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
            temperature=1.0, beta=1.0, logging_steps=10**6, save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed)
        # the student generates with the card's stop tokens on every side
        student.generation_config.eos_token_id = stop_ids
        student.generation_config.pad_token_id = tokenizer.pad_token_id
        if args.impl == "trl-distillation":
            from trl import DistillationConfig, DistillationTrainer

            check_prompts(tok, messages, prompts)
            targs = DistillationConfig(**common, max_completion_length=args.new_tokens, top_p=1.0,
                                       top_k=0, chat_template_kwargs={"enable_thinking": True})
            trainer = DistillationTrainer(
                model=student, teacher_model=teacher, args=targs, processing_class=tok,
                train_dataset=datasets.Dataset.from_list([{"prompt": [m]} for m in messages]),
                callbacks=[Clock()])
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            from factory import chat

            rows = [{"messages": [m, {"role": "assistant",
                                      "content": chat.assistant_text(p.reasoning, p.answer, True)}]}
                    for p, m in zip(problems, messages)]
            targs = GKDConfig(**common, lmbda=1.0, max_new_tokens=args.new_tokens,
                              max_length=cfg.pipeline.on_policy.max_len)
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=targs,
                                 processing_class=tok,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 callbacks=[Clock()])
        counter = GenerationCounter(trainer.model, stop_ids)

        def run():
            trainer.train()
            return counter.tokens

    if args.phases:
        prof = install_phases(args.impl, student, teacher,
                              None if args.impl.startswith("ours") else trainer)
    import gc

    gc.collect()
    baseline = world.rss_kib("VmRSS")
    method = "VmHWM after clear_refs" if world.reset_peak_rss() else "ru_maxrss"
    t0 = world.time_now()
    generated = run()
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])][-args.steps:]
    # tokens generated in the measured steps are not separable from the warm-up's: per-step mean
    return {"impl": args.impl, "vocab": args.vocab, "wall": [s[0] for s in steps],
            "cpu": [s[1] for s in steps], "total_wall": marks[-1][0] - t0[0],
            "generated_per_step": generated / (args.warmup + args.steps),
            "baseline_mib": baseline / 1024, "peak_mib": peak["hwm"] / 1024, "method": method,
            "versions": versions(),
            "phases": prof.rows[step_rows[-2]:step_rows[-1]] if prof else None}


def tokenizer_copy(tokenizer):
    """TRL wants a left-padding tokenizer for generation; ours pads right (its own copy)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    return tok


def check_prompts(tok, messages, prompts):
    got = [tok.apply_chat_template([m], add_generation_prompt=True, tokenize=True,
                                   return_dict=True, enable_thinking=True)["input_ids"]
           for m in messages]
    if got != prompts:
        raise SystemExit("TRL's rendering of the prompts differs from ours: not the same work")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "trl", "liger-kernel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


# ----------------------------------------------------------------------------------------------
# Parent: rounds of children, the table
# ----------------------------------------------------------------------------------------------


def run_child(impl: str, vocab: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--vocab", str(vocab),
           "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--prompts", str(args.prompts), "--threads", str(args.threads),
           *(["--phases"] if args.phases else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} at vocab {vocab} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_phases(args) -> None:
    vocab = max(int(v) for v in args.vocabs.split(","))
    for impl in ("ours", "trl-distillation"):
        out = run_child(impl, vocab, args)
        print(f"\n{LABELS[impl]}, vocab {vocab:,}: baseline {out['baseline_mib']:,.0f} MiB "
              f"(libraries, both models, the trainer); phases of the last step, in the order "
              f"they end (a nested one before its enclosing one):\n")
        print("| phase | RSS before (MiB) | high-water mark in it (MiB) | above the baseline | "
              "RSS after (MiB) |\n| --- | ---: | ---: | ---: | ---: |")
        for row in out["phases"]:
            print(f"| {row['phase']} | {row['before']:,.0f} | {row['peak']:,.0f} | "
                  f"{row['peak'] - out['baseline_mib']:+,.0f} | {row['after']:,.0f} |")


def med(xs):
    return float(statistics.median(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=IMPLS)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--vocabs", default="128,151936")
    ap.add_argument("--batch", type=int, default=8, help="prompts per step, one sample each")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64, help="prompt pool (arith problems)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--phases", action="store_true",
                    help="instead of the comparison: the resident set's high-water mark per phase "
                         "of the last step, ours and TRL's DistillationTrainer, largest vocabulary "
                         "(printed, not appended: the resets it needs spoil the step's own peak)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.child:
        args.impl = args.child
        print(json.dumps(child(args)))
        return

    import world
    from report import cpu_model, publish

    if args.phases:
        print_phases(args)
        return
    load0, t0 = world.loadavg(), time.perf_counter()
    impls, vocabs = args.impls.split(","), [int(v) for v in args.vocabs.split(",")]
    runs: dict[tuple[int, str], list[dict]] = {}
    for r in range(args.rounds):
        for vocab in vocabs:
            for impl in impls:
                out = run_child(impl, vocab, args)
                runs.setdefault((vocab, impl), []).append(out)
                print(f"round {r} vocab {vocab} {impl}: {med(out['wall']):.3f} s/step wall, "
                      f"{med(out['cpu']):.3f} CPU, peak {out['peak_mib']:.0f} MiB "
                      f"(working {out['peak_mib'] - out['baseline_mib']:.0f}), "
                      f"{out['generated_per_step']:.1f} generated tokens/step; load "
                      f"{world.loadavg()}", flush=True)

    rows, targets = [], []
    for vocab in vocabs:
        summary = {}
        for impl in impls:
            rs = runs[(vocab, impl)]
            summary[impl] = dict(
                wall=med([w for r in rs for w in r["wall"]]),
                cpu=med([c for r in rs for c in r["cpu"]]),
                peak=max(r["peak_mib"] for r in rs),
                working=max(r["peak_mib"] - r["baseline_mib"] for r in rs),
                baseline=med([r["baseline_mib"] for r in rs]),
                gen=statistics.mean(r["generated_per_step"] for r in rs))
        ours = summary.get("ours")
        for impl in impls:
            s = summary[impl]
            vs = (f"{s['cpu'] / ours['cpu']:.2f}x | {s['peak'] / ours['peak']:.2f}x | "
                  f"{s['working'] / ours['working']:.2f}x" if ours else "- | - | -")
            rows.append(f"| {vocab:,} | {LABELS[impl]} | {s['wall']:.3f} ({s['cpu']:.3f}) | "
                        f"{s['gen']:.1f} | {s['peak']:,.0f} | {s['baseline']:,.0f} | "
                        f"{s['working']:,.0f} | {vs} |")
        pairs = [(o, t) for o in impls if o.startswith("ours") for t in impls
                 if not t.startswith("ours")]
        if vocab == max(vocabs):
            for mine, impl in pairs:
                ours, s = summary[mine], summary[impl]
                speed = s["cpu"] / ours["cpu"]
                speed_wall = s["wall"] / ours["wall"]
                mem, work = ours["peak"] / s["peak"], ours["working"] / s["working"]
                targets.append(
                    f"- {LABELS[mine].split(':')[0]} vs {LABELS[impl]} at vocab {vocab:,}: "
                    f"speed {speed:.2f}x per CPU second "
                    f"({speed_wall:.2f}x per wall second), target >= {SPEED_TARGET:.0f}x: "
                    f"{'met' if speed >= SPEED_TARGET else 'NOT met'}"
                    f"{f', by {speed / SPEED_TARGET:.2f}x' if speed >= SPEED_TARGET else ''}; "
                    f"peak memory ours / theirs {mem:.2f} (working memory {work:.2f}), target <= "
                    f"{MEMORY_TARGET}: {'met' if mem <= MEMORY_TARGET else 'NOT met'} on the peak, "
                    f"{'met' if work <= MEMORY_TARGET else 'NOT met'} on working memory.")
    v = next(iter(runs.values()))[0]["versions"]
    cmd = "python bench/bench_trl.py " + " ".join(sys.argv[1:])
    section = "\n".join([
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: on-policy "
        f"distillation vs TRL, batch {args.batch} x {args.new_tokens} new tokens",
        "",
        f"- command: `{world.taskset()} .bench-venv/bin/{cmd.strip()}` "
        f"({time.perf_counter() - t0:.0f} s)",
        f"- machine: {cpu_model()}, pinned to one core, torch threads {args.threads}; Python "
        f"{v['python']}, torch {v['torch']}, transformers {v['transformers']}, accelerate "
        f"{v['accelerate']}, trl {v['trl']}; load average at start {load0}, at end "
        f"{world.loadavg()} (shared machine: CPU seconds are the steady measure)",
        f"- {args.rounds} round(s) x {args.steps} measured steps after {args.warmup} warm-up "
        f"step(s), each (trainer, vocabulary) in a fresh process; s/step: median; memory: "
        f"largest over rounds, {v and runs[next(iter(runs))][0]['method']}",
        "",
        "| vocab | trainer | s/step wall (CPU) | generated tokens/step | peak RSS MiB | "
        "baseline MiB | working MiB | time vs ours (CPU) | peak vs ours | working vs ours |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        *targets,
        "",
    ])
    publish(section, append=not args.no_doc)


if __name__ == "__main__":
    main()
