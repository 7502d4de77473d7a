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
from factory.stages.distill import off_policy_stage, on_policy_stage
from factory.stages.evaluate import eval_stage
from factory.stages.four_stage import STAGE_NAMES, four_stage_stages
from factory.stages.models import pretrain_stage, sft_stage, source_stage
from factory.stages.teacher_data import generate_stage, record_stage


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
        arm="teacher", think_ratio=boot.think_ratio, check=boot.check))
    plan.models["teacher"] = ("teacher/sft", card)
    if boot.four_stage:  # the bank's full recipe: the four stages after the bootstrap SFT
        stages = four_stage_stages(cfg, cfg.pipeline.four_stage, card=card, base="teacher/sft",
                                   task_cfg=corpus_task(cfg), prefix="teacher", arm="teacher")
        plan.stages.extend(stages)
        plan.models["teacher"] = (stages[-1].name, card)


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


def distill_group(cfg, plan: Plan) -> None:
    """The distillation arm (DESIGN.md): the teacher answers the training prompts (the
    off-policy set) and its distributions are recorded (the logit cache); the base student
    learns them off-policy, then on-policy from that checkpoint with the teacher scoring its
    samples. The student sees the prompts and the teacher, never the answers."""
    if "teacher" not in plan.models:
        raise ConfigError(f"pipeline {cfg.pipeline.name!r}: the distill group needs the teacher "
                          f"group before it in pipeline.stages")
    p, teacher = cfg.pipeline, plan.models["teacher"][0]
    plan.stages.append(generate_stage("teacher/generate", cfg.teacher, cfg.task, model=teacher,
                                      gen_cfg=p.generate, seed=cfg.seed, cfg=cfg))
    plan.stages.append(record_stage("teacher/record", cfg.teacher, model=teacher,
                                    offpolicy_set="teacher/generate", cache_cfg=p.cache,
                                    seed=cfg.seed, cfg=cfg))
    common = dict(offpolicy_set="teacher/generate", cache="teacher/record", loss_cfg=cfg.loss,
                  cache_cfg=p.cache, seed=cfg.seed, cfg=cfg)
    plan.stages.append(off_policy_stage("distill/off_policy", cfg.student, base="student/base",
                                        stage_cfg=p.off_policy, **common))
    plan.models["off_policy"] = ("distill/off_policy", cfg.student)
    if p.on_policy.steps > 0:
        plan.stages.append(on_policy_stage(
            "distill/on_policy", cfg.student, cfg.teacher, init="distill/off_policy",
            teacher_model=teacher, stage_cfg=p.on_policy, task_cfg=cfg.task, **common))
        plan.models["on_policy"] = ("distill/on_policy", cfg.student)


def four_stage_group(cfg, plan: Plan) -> None:
    """The four-stage baseline (DESIGN.md) on the same base student."""
    stages = four_stage_stages(cfg, cfg.pipeline.four_stage, card=cfg.student,
                               base="student/base")
    plan.stages.extend(stages)
    for label, stage in zip(STAGE_NAMES, stages):
        plan.models[label] = (stage.name, cfg.student)


def eval_tasks(cfg) -> list:
    """The tasks every model is evaluated on: the run's task, then `pipeline.eval.tasks` (extra
    task cards an overlay composes in, e.g. AIME'24 and HumanEval next to MATH-500)."""
    tasks = [cfg.task]
    for key, task_cfg in cfg.pipeline.eval.tasks.items():
        if task_cfg.name in {t.name for t in tasks}:
            raise ConfigError(f"pipeline.eval.tasks.{key} is task {task_cfg.name!r}, which is "
                              f"already evaluated (the run's task is {cfg.task.name!r}): drop "
                              f"one of them")
        tasks.append(task_cfg)
    return tasks


def eval_group(cfg, plan: Plan) -> None:
    """Every model of the plan, in every mode, on every eval task. The run's own task keeps
    the stage names `eval/{label}/{mode}`; an extra task's are `eval/{label}/{task}/{mode}`."""
    extra = eval_tasks(cfg)[1:]
    for label, (stage_name, card) in plan.models.items():
        for mode in cfg.pipeline.eval.modes:
            plan.stages.append(eval_stage(label, stage_name, card, mode, cfg))
            for task_cfg in extra:
                plan.stages.append(eval_stage(label, stage_name, card, mode, cfg, task_cfg,
                                              name=f"eval/{label}/{task_cfg.name}/{mode}"))


GROUPS = {"teacher": teacher_group, "base_student": base_student_group,
          "distill": distill_group, "four_stage": four_stage_group, "eval": eval_group}


def build_plan(cfg) -> Plan:
    plan = Plan()
    for name in cfg.pipeline.stages:
        if name not in GROUPS:
            raise ConfigError(f"pipeline {cfg.pipeline.name!r} names stage group {name!r}; "
                              f"valid groups: {', '.join(GROUPS)}")
        GROUPS[name](cfg, plan)
    return plan
