"""The eval stage: one model, one task, one mode -> an `eval` artifact holding the per-problem
results and Pass@k (factory/evaluation.py does the work; this wires it into the pipeline)."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from factory import chat
from factory.errors import ConfigError
from factory.evaluation import evaluate, write_eval
from factory.flops import forward_flops
from factory.ledger import StageCost
from factory.models import load_model
from factory.pipeline import Stage, StageContext
from factory.stages.models import card_inputs, tokenizer_for
from factory.tasks.registry import build_task
from students.builders import count_params

EVAL_FILE = "eval.json"


def mode_sampling(card, mode: str) -> dict:
    """A teacher card's sampling settings for a mode ("think" | "no_think")."""
    if mode not in chat.MODES:
        raise ConfigError(f"mode {mode!r} is not one of {chat.MODES}")
    s = card.thinking if mode == "think" else card.non_thinking
    return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p,
            "max_new_tokens": s.max_new_tokens}


def sampling_for(cfg, mode: str) -> dict:
    """The pair's sampling settings for a mode (the teacher card carries Qwen3's), with the
    eval's cap on new tokens."""
    return {**mode_sampling(cfg.teacher, mode), "max_new_tokens": cfg.pipeline.eval.max_new_tokens}


def eval_stage(label: str, model_stage: str, card, mode: str, cfg) -> Stage:
    ev = cfg.pipeline.eval
    sampling = sampling_for(cfg, mode)
    inputs = {"card": card_inputs(card), "task": OmegaConf.to_container(cfg.task, resolve=True),
              "mode": mode, "n_samples": ev.n_samples, "n_problems": ev.n_problems,
              "ks": list(ev.ks), "thinking_budget": ev.thinking_budget, "sampling": sampling,
              "seed": cfg.seed}

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        task = build_task(cfg.task)
        problems = task.problems("test", ev.n_problems)
        model = load_model(ctx.upstream[model_stage], card, device=cfg.trainer.device)
        result = evaluate(model, tokenizer, task, problems, mode=mode, n_samples=ev.n_samples,
                          ks=list(ev.ks), sampling=sampling, thinking_budget=ev.thinking_budget,
                          batch_size=ev.batch_size, seed=cfg.seed)
        result.update(model=label, task=cfg.task.name)
        if cfg.task.kind == "arith":  # the floor Pass@k must clear to mean anything
            from factory.tasks.arith import guess_baseline

            train = task.problems("train", 100_000)
            result["guess_baseline"] = {k: guess_baseline(train, problems, k) for k in ev.ks}
        write_eval(result, ctx.out / EVAL_FILE)
        tokens = result["generated_tokens"]
        return StageCost(tokens=tokens,
                         flops=forward_flops(count_params(card)["flops_params"], tokens))

    return Stage(name=f"eval/{label}/{mode}", kind="eval", inputs=inputs, build=build,
                 needs=[model_stage], arm="eval")


def read_eval(artifact) -> dict:
    return json.loads((artifact.path / EVAL_FILE).read_text())

