"""From a composed config to the list of stages a run executes.

`pipeline.stages` names groups of stages; each group adds its stages and the models it makes to
the plan. Later groups read what earlier ones made (by stage name), so the order in the pipeline
file is the order of the flow in DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from factory.config import TaskConfig
from factory.errors import ConfigError
from factory.pipeline import Stage
from factory.stages.evaluate import eval_stage
from factory.stages.models import pretrain_stage, sft_stage, source_stage


@dataclass
class Plan:
    stages: list[Stage] = field(default_factory=list)
    # label -> (stage name of the model artifact, its card): what the eval group evaluates
    models: dict[str, tuple[str, object]] = field(default_factory=dict)


def corpus_task(cfg):
    """The task whose corpus pretrains the tiny world's base models: the run's task when it has
    a corpus (arith), else the default arith card (a tiny student pointed at MATH-500 is still
    the tiny world's base model)."""
    if cfg.task.kind == "arith":
        return cfg.task
    return OmegaConf.structured(TaskConfig(name="arith", kind="arith"))


def teacher_group(cfg, plan: Plan) -> None:
    card, boot = cfg.teacher, cfg.teacher.bootstrap
    if not boot.enabled:
        plan.stages.append(source_stage("teacher/source", card, arm="teacher"))
        plan.models["teacher"] = ("teacher/source", card)
        return
    pre = cfg.pipeline.pretrain
    plan.stages.append(pretrain_stage(
        "teacher/pretrain", card, corpus_task(cfg), steps=boot.pretrain_steps, batch_size=boot.batch_size,
        lr=boot.lr, warmup_ratio=pre.warmup_ratio, block_len=pre.max_len,
        corpus_size=cfg.pipeline.pretrain_corpus_size, seed=cfg.seed, cfg=cfg, arm="teacher"))
    plan.stages.append(sft_stage(
        "teacher/sft", card, corpus_task(cfg), "teacher/pretrain", steps=boot.sft_steps,
        batch_size=boot.batch_size, lr=boot.lr, warmup_ratio=pre.warmup_ratio,
        n_examples=boot.sft_examples, max_len=cfg.pipeline.sft.max_len, seed=cfg.seed, cfg=cfg,
        arm="teacher"))
    plan.models["teacher"] = ("teacher/sft", card)


def base_student_group(cfg, plan: Plan) -> None:
    card = cfg.student
    if card.pretrained is not None:
        plan.stages.append(source_stage("student/base", card, arm="base"))
    else:
        pre = cfg.pipeline.pretrain
        plan.stages.append(pretrain_stage(
            "student/base", card, corpus_task(cfg), steps=pre.steps, batch_size=pre.batch_size,
            lr=pre.lr, warmup_ratio=pre.warmup_ratio, block_len=pre.max_len,
            corpus_size=cfg.pipeline.pretrain_corpus_size, seed=cfg.seed, cfg=cfg, arm="base",
            grad_accum=pre.grad_accum))
    plan.models["base"] = ("student/base", card)


def eval_group(cfg, plan: Plan) -> None:
    for label, (stage_name, card) in plan.models.items():
        for mode in cfg.pipeline.eval.modes:
            plan.stages.append(eval_stage(label, stage_name, card, mode, cfg))


GROUPS = {"teacher": teacher_group, "base_student": base_student_group, "eval": eval_group}


def build_plan(cfg) -> Plan:
    plan = Plan()
    for name in cfg.pipeline.stages:
        if name not in GROUPS:
            raise ConfigError(f"pipeline {cfg.pipeline.name!r} names stage group {name!r}; "
                              f"valid groups: {', '.join(GROUPS)}")
        GROUPS[name](cfg, plan)
    return plan
