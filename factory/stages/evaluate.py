"""The eval stage: one model, one task, one mode -> an `eval` artifact holding the per-problem
results and Pass@k (factory/evaluation.py does the work; this wires it into the pipeline).

It does not shard: in a multi-process run rank 0 evaluates alone while the other ranks wait for
its artifact (a plain, not `distributed`, Stage; factory/pipeline.py)."""

from __future__ import annotations

import functools
import json

from omegaconf import OmegaConf

from factory import chat
from factory.errors import ConfigError
from factory.evaluation import evaluate, write_eval
from factory.flops import forward_flops
from factory.ledger import StageCost
from factory.models import load_model
from factory.pipeline import Stage, StageContext
from factory.store import verify_artifact
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


def eval_stage(label: str, model_stage: str, card, mode: str, cfg, task_cfg=None,
               name: str | None = None) -> Stage:
    """Evaluate the `model_stage` model on `task_cfg` (default: the run's task) in `mode`; the
    stage is named `name` (default `eval/{label}/{mode}`)."""
    ev = cfg.pipeline.eval
    task_cfg = cfg.task if task_cfg is None else task_cfg
    sampling = sampling_for(cfg, mode)
    inputs = {"card": card_inputs(card), "task": OmegaConf.to_container(task_cfg, resolve=True),
              "mode": mode, "n_samples": ev.n_samples, "n_problems": ev.n_problems,
              "ks": list(ev.ks), "thinking_budget": ev.thinking_budget, "sampling": sampling,
              "seed": cfg.seed}

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        task = build_task(task_cfg)
        problems = task.problems("test", ev.n_problems)
        model = load_model(ctx.upstream[model_stage], card, device=cfg.trainer.device)
        result = evaluate(model, tokenizer, task, problems, mode=mode, n_samples=ev.n_samples,
                          ks=list(ev.ks), sampling=sampling, thinking_budget=ev.thinking_budget,
                          batch_size=ev.batch_size, seed=cfg.seed)
        result.update(model=label, task=task_cfg.name)
        if task_cfg.kind == "arith":  # the floor Pass@k must clear to mean anything
            from factory.tasks.arith import guess_baseline

            train = _arith_train(json.dumps(OmegaConf.to_container(task_cfg, resolve=True),
                                            sort_keys=True))
            result["guess_baseline"] = {k: guess_baseline(train, problems, k) for k in ev.ks}
        write_eval(result, ctx.out / EVAL_FILE)
        tokens = result["generated_tokens"]
        return StageCost(tokens=tokens,
                         flops=forward_flops(count_params(card)["flops_params"], tokens))

    return Stage(name=name or f"eval/{label}/{mode}", kind="eval", inputs=inputs, build=build,
                 needs=[model_stage], arm="eval")


@functools.lru_cache(maxsize=2)
def _arith_train(task_json: str) -> list:
    """The 100k training problems the guessing baseline counts answers over: ~3 s to generate,
    the same for every eval stage of a run, so made once per process."""
    return build_task(OmegaConf.create(json.loads(task_json))).problems("train", 100_000)


def read_eval(artifact) -> dict:
    """The eval artifact's results, its files checked against the manifest first."""
    verify_artifact(artifact)
    return json.loads((artifact.path / EVAL_FILE).read_text())

