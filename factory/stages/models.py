"""Stages that make model artifacts: a card's published weights, pretraining from scratch on the
task corpus (the tiny world's base models), and SFT on verified chain-of-thought data.

Pretraining and SFT are `distributed` stages: in a multi-process run every rank trains on its
shard of each global batch (factory/stages/lm.py) and rank 0 saves the model."""

from __future__ import annotations

import logging
from fractions import Fraction

from omegaconf import OmegaConf

from factory import chat
from factory.flops import train_flops
from factory.ledger import StageCost
from factory.evaluation import evaluate
from factory.loop import StopCheck, save_model, train
from factory.models import load_model, write_source
from factory.pipeline import Stage, StageContext
from factory.stages.lm import PretrainData, SFTData, pack_blocks
from factory.tasks.registry import build_task
from factory.tokenizer import load_tokenizer
from students.builders import build_model, count_params

log = logging.getLogger(__name__)


def card_inputs(card) -> dict:
    """The card as a stage input, without its `bootstrap` recipe: the stages a recipe plans take
    the knobs they use as inputs of their own, so a change to the SFT steps does not remake the
    pretrained model."""
    values = OmegaConf.to_container(card, resolve=True)
    values.pop("bootstrap", None)
    return values


def tokenizer_for(card):
    return load_tokenizer(card.tokenizer or card.pretrained)


def source_stage(name: str, card, arm: str) -> Stage:
    """A card with published weights: the artifact names the source, weights are not copied."""

    def build(ctx: StageContext) -> StageCost:
        write_source(ctx.out, card)
        return StageCost()

    return Stage(name=name, kind="model", inputs={"card": card_inputs(card)}, build=build, arm=arm)


def pretrain_stage(name: str, card, task_cfg, *, steps: int, batch_size: int, lr: float,
                   warmup_ratio: float, block_len: int, corpus_size: int, seed: int, cfg,
                   arm: str, grad_accum: int = 1) -> Stage:
    """Causal-LM pretraining from random weights on the task's corpus."""
    inputs = {"card": card_inputs(card), "task": _corpus_inputs(task_cfg), "steps": steps,
              "batch_size": batch_size, "lr": lr, "warmup_ratio": warmup_ratio,
              "block_len": block_len, "corpus_size": corpus_size, "seed": seed,
              "grad_accum": grad_accum}

    def build(ctx: StageContext) -> StageCost:
        import torch

        tokenizer = tokenizer_for(card)
        task = build_task(task_cfg)
        docs = tokenizer(task.corpus(corpus_size, seed=seed), add_special_tokens=False)["input_ids"]
        data = PretrainData(pack_blocks(docs, tokenizer.eos_token_id, block_len), batch_size, seed,
                            grad_accum)
        torch.manual_seed(seed)
        model = build_model(card, init="scratch")
        result = train(model, data.micro_step, stage=ctx.name, steps=steps, lr=lr,
                       warmup_ratio=warmup_ratio, grad_accum=grad_accum, trainer_cfg=cfg.trainer,
                       work_dir=ctx.work, metrics=ctx.metrics)
        save_model(model, tokenizer, ctx.out)
        active = count_params(card)["flops_params"]
        return StageCost(tokens=result.tokens, flops=train_flops(active, result.tokens),
                         notes={"steps": result.steps, "resumed_from": result.resumed_from})

    return Stage(name=name, kind="model", inputs=inputs, build=build, arm=arm, distributed=True)


def _corpus_inputs(task_cfg) -> dict:
    t = OmegaConf.to_container(task_cfg, resolve=True)
    return {k: t[k] for k in ("name", "kind", "difficulty", "max_operand", "max_first_operand",
                              "seed", "source", "path")}


def mode_schedule(n: int, modes: tuple[str, ...], think_ratio: float | None = None) -> list[str]:
    """The mode of each of n examples: `modes` in turn, or, with `think_ratio`, "think" for that
    share of them spread evenly (example i thinks when (i * ratio) mod 1 < ratio, exactly in
    rational arithmetic) and "no_think" for the rest. Ratio 0.5 is the alternation."""
    if think_ratio is None:
        return [modes[i % len(modes)] for i in range(n)]
    if not 0.0 <= think_ratio <= 1.0:
        raise ValueError(f"think_ratio must be in [0, 1], got {think_ratio}")
    r = Fraction(think_ratio).limit_denominator(1000)
    return ["think" if (i * r.numerator) % r.denominator < r.numerator else "no_think"
            for i in range(n)]


def sft_examples(tokenizer, problems, *, modes: tuple[str, ...], max_len: int,
                 think_ratio: float | None = None) -> list[dict]:
    """Chat-formatted SFT examples from problems with verified reasoning, one per problem, its
    mode from `mode_schedule`: /think answers with the trace in the think block, /no_think
    answers with an empty block."""
    turns = [([chat.user_message(p.prompt, mode)], p.reasoning, p.answer, mode == "think")
             for p, mode in zip(problems, mode_schedule(len(problems), modes, think_ratio))]
    return chat.sft_batch(tokenizer, turns, max_len=max_len)


def pass_at_1_check(card, tokenizer, task, problems, *, target: float, samples: int, every: int,
                    after: int, seed: int, batch_size: int) -> StopCheck:
    """A StopCheck on thinking-mode Pass@1 over `problems`, sampled with the card's thinking
    settings from a generator of its own (seeded by seed and step)."""

    def measure(model, step: int) -> float:
        result = evaluate(model, tokenizer, task, problems, mode="think", n_samples=samples,
                          ks=[1], sampling=card.thinking, batch_size=batch_size,
                          seed=seed * 1_000_003 + step)
        return result["pass@1"]

    return StopCheck(name="check_pass@1", measure=measure, target=target, every=every,
                     after=after)


def sft_stage(name: str, card, task_cfg, base: str, *, steps: int, batch_size: int, lr: float,
              warmup_ratio: float, n_examples: int, max_len: int, seed: int, cfg,
              arm: str, think_ratio: float = 0.5, check=None) -> Stage:
    """SFT of the `base` stage's model on n verified traces of the task's train split in both
    modes (`think_ratio` of them /think, spread evenly), loss on the assistant turn only.

    `check` (a BootstrapCheckConfig with pass_at_1 > 0) makes the step count a budget: the
    model's thinking-mode Pass@1 on the `check.problems` train problems after the SFT examples
    is measured as it trains, training stops at the first check that reaches the target, and
    up to `check.extra_steps` more steps at the schedule's final lr follow while it fails."""
    checking = check is not None and check.pass_at_1 > 0
    inputs = {"card": card_inputs(card), "task": _corpus_inputs(task_cfg), "steps": steps,
              "batch_size": batch_size, "lr": lr, "warmup_ratio": warmup_ratio,
              "n_examples": n_examples, "max_len": max_len, "seed": seed,
              "think_ratio": think_ratio}
    if checking:
        inputs["check"] = OmegaConf.to_container(check, resolve=True)

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        task = build_task(task_cfg)
        problems = task.problems("train", n_examples)
        examples = sft_examples(tokenizer, problems, modes=("think", "no_think"), max_len=max_len,
                                think_ratio=think_ratio)
        data = SFTData(examples, batch_size, seed, tokenizer.pad_token_id)
        model = load_model(ctx.upstream[base], card, device=cfg.trainer.device, dtype="float32")
        model.train()
        stop, total = None, steps
        if checking:
            held_out = task.problems("train", n_examples + check.problems)[n_examples:]
            stop = pass_at_1_check(card, tokenizer, task, held_out, target=check.pass_at_1,
                                   samples=check.samples, every=check.every, after=check.after,
                                   seed=seed, batch_size=cfg.pipeline.eval.batch_size)
            total = steps + check.extra_steps
        result = train(model, data.micro_step, stage=ctx.name, steps=total, lr=lr,
                       warmup_ratio=warmup_ratio, grad_accum=1, trainer_cfg=cfg.trainer,
                       work_dir=ctx.work, metrics=ctx.metrics, stop=stop, schedule_steps=steps)
        save_model(model, tokenizer, ctx.out)
        active = count_params(card)["flops_params"]
        notes = {"steps": result.steps, "resumed_from": result.resumed_from}
        if checking:
            notes.update(check_target=check.pass_at_1, check_passed=result.passed,
                         checks=[list(c) for c in result.checks])
            if not result.passed:
                log.warning("stage %r: thinking-mode Pass@1 on %d held-out train problems is "
                            "%.3f after %d steps, below the target %.3f: the model is kept; "
                            "raise teacher.bootstrap.check.extra_steps or sft_steps, or change "
                            "the seed", ctx.name, check.problems, result.checks[-1][1],
                            result.steps, check.pass_at_1)
        return StageCost(tokens=result.tokens, flops=train_flops(active, result.tokens),
                         notes=notes)

    return Stage(name=name, kind="model", inputs=inputs, build=build, needs=[base], arm=arm,
                 distributed=True)
