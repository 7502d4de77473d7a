"""The four-stage baseline on the tiny world at the smallest sizes: the four stages through the
pipeline and the store (metrics logged, costs charged, artifacts reused on a rerun), and GRPO
resumed in the middle of a sampled batch ending exactly where an uninterrupted run ends."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from factory import rl
from factory.config import FourStageConfig, GRPOConfig
from factory.inspect import compose
from factory.ledger import StageCost
from factory.loop import save_model, train
from factory.metrics import MetricsLogger
from factory.pipeline import Pipeline, Stage
from factory.stages import four_stage as fs
from factory.stages.models import card_inputs, tokenizer_for
from factory.store import Store
from factory.tasks.registry import build_task
from students.builders import build_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

# products of 1..3: a scratch student learns the format and some answers in a few dozen steps,
# so the fusion stage finds verified /think samples to keep
EASY = ["student=tiny", "task.difficulty=1", "task.max_first_operand=3", "task.n_test=3",
        "trainer.progress=false", "trainer.log_every=1", "trainer.num_threads=1"]
RL = dict(steps=4, prompts_per_batch=4, group_size=4, passes=2, max_new_tokens=32, n_prompts=32)
RL_KEYS = {"reward", "accuracy", "entropy", "entropy_coef", "clip_frac", "response_length",
           "kl_old", "pg_loss", "loss", "grad_norm"}


def tiny_four_stage() -> FourStageConfig:
    cfg = OmegaConf.structured(FourStageConfig)
    cfg.cold_start.update(n_examples=64, steps=30, batch_size=16, lr=3e-3, max_len=96)
    cfg.reasoning_rl.update(RL, kl_coef=0.01)
    cfg.fusion.update(n_prompts=16, samples_per_prompt=8, n_examples=32, steps=3, batch_size=8,
                      max_len=96)
    cfg.fusion.sampling.max_new_tokens = 32
    cfg.general_rl.update(RL, multi_turn_ratio=0.5, no_think_target_tokens=12)
    return cfg


def scratch_base(card) -> Stage:
    """The base student from random weights: the stage the tiny world's pretraining replaces."""

    def build(ctx) -> StageCost:
        torch.manual_seed(0)
        save_model(build_model(card, init="scratch"), tokenizer_for(card), ctx.out)
        return StageCost()

    return Stage("student/base", "model", {"card": card_inputs(card), "init": "scratch"}, build,
                 arm="base")


def run_pipeline(cfg, four, root: Path, run: str) -> Pipeline:
    with MetricsLogger(root / run, cfg.logger) as metrics:
        pipeline = Pipeline(Store(root / "store"), root / run, metrics)
        for stage in [scratch_base(cfg.student)] + fs.four_stage_stages(
                cfg, four, card=cfg.student, base="student/base"):
            pipeline.run(stage)
    return pipeline


def test_the_four_stages_run_log_charge_and_are_reused(tmp_path):
    cfg, four = compose(EASY), tiny_four_stage()
    first = run_pipeline(cfg, four, tmp_path, "run1")
    names = [f"four_stage/{s}" for s in fs.STAGE_NAMES]
    assert set(names) <= set(first.artifacts)

    lines = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    by_stage = {n: [m for m in lines if m["stage"] == n] for n in names}
    assert [m["step"] for m in by_stage["four_stage/cold_start"]] == list(range(1, 31))
    assert by_stage["four_stage/cold_start"][-1]["ce"] < by_stage["four_stage/cold_start"][0]["ce"]
    for rl_stage in ("four_stage/reasoning_rl", "four_stage/general_rl"):
        steps = by_stage[rl_stage]
        assert [m["step"] for m in steps] == [1, 2, 3, 4]
        assert all(RL_KEYS <= set(m) for m in steps)
        # the first pass over a batch is on-policy: ratio exactly 1, nothing clipped
        assert [m["pass"] for m in steps] == [0, 1, 0, 1]
        assert all(m["clip_frac"] == 0 and m["ratio"] == 1.0 for m in steps if m["pass"] == 0)
        assert steps[0]["reward"] == steps[1]["reward"]  # the second pass reuses the batch
    # kl_coef > 0: a frozen copy of the starting model, which the first batch's policy equals
    reasoning = by_stage["four_stage/reasoning_rl"]
    assert reasoning[0]["kl"] == 0.0 and all(m["kl"] >= 0 for m in reasoning)
    general = by_stage["four_stage/general_rl"][0]
    assert {"reward_format", "reward_follow", "reward_length"} <= set(general)
    assert [m["step"] for m in by_stage["four_stage/fusion"]] == [1, 2, 3]

    ledger = {e["stage"]: e for e in
              json.loads((tmp_path / "run1" / "ledger.json").read_text())["stages"]}
    for n in names:
        assert ledger[n]["arm"] == "four_stage" and not ledger[n]["reused"]
        assert ledger[n]["tokens"] > 0 and ledger[n]["flops"] > 0
    filtered = ledger["four_stage/cold_start"]["notes"]["filter"]
    assert filtered["kept"] + sum(filtered[r] for r in fs.FILTER_REASONS) == 64
    mix = ledger["four_stage/fusion"]["notes"]["mix"]
    assert mix["verified_prompts"] > 0 and mix["think"] + mix["no_think"] == 32
    assert ledger["four_stage/reasoning_rl"]["notes"]["sampled_tokens"] > 0

    final = AutoModelForCausalLM.from_pretrained(first.artifacts["four_stage/general_rl"].path)
    assert final.config.vocab_size == cfg.student.arch.vocab_size

    second = run_pipeline(cfg, four, tmp_path, "run2")
    assert {n: second.artifacts[n].key for n in names} == {n: first.artifacts[n].key for n in names}
    ledger2 = json.loads((tmp_path / "run2" / "ledger.json").read_text())["stages"]
    assert all(e["reused"] for e in ledger2)
    assert not (tmp_path / "run2" / "metrics.jsonl").read_text()  # nothing trained


# ----------------------------------------------------------------------------- GRPO resume

class Interrupted(Exception):
    pass


def grpo_trainer(cfg, stage_cfg, ref=None):
    task = build_task(cfg.task)
    tokenizer = tokenizer_for(cfg.student)

    def reward(query, text, n_tokens, finished):  # varies across samples: every group learns
        length = rl.length_reward(n_tokens, 4, 1.0)
        return {"reward": length, "correct": rl.correct_reward(
            lambda a: task.grade(query.problem, a), text)}

    trainer = fs.GRPOTrainer(tokenizer=tokenizer, pool=task.problems("train", 16),
                             stage_cfg=stage_cfg, reward=reward, seed=0, soft_switch=False,
                             ref_model=ref)
    rollouts = []
    rollout = trainer.rollout
    trainer.rollout = lambda model, b: rollouts.append(b) or rollout(model, b)
    return trainer, rollouts


def run_grpo(cfg, stage_cfg, work: Path, stop_at: int | None = None):
    torch.manual_seed(0)
    model = build_model(cfg.student, init="scratch")
    trainer, rollouts = grpo_trainer(cfg, stage_cfg)
    step_fn = trainer.micro_step
    if stop_at is not None:
        def step_fn(model, step, micro):
            if step == stop_at:
                raise Interrupted
            return trainer.micro_step(model, step, micro)
    train(model, step_fn, stage="grpo", steps=stage_cfg.steps, lr=stage_cfg.lr,
          warmup_ratio=0.0, grad_accum=stage_cfg.grad_accum, trainer_cfg=cfg.trainer,
          work_dir=work, extra_state=trainer)
    return model, trainer, rollouts


def test_grpo_resumed_mid_batch_ends_as_the_uninterrupted_run(tmp_path):
    cfg = compose(EASY + ["trainer.checkpoint_every=1"])
    stage_cfg = OmegaConf.structured(GRPOConfig(
        steps=5, lr=3e-3, prompts_per_batch=2, group_size=4, passes=3, grad_accum=2,
        max_new_tokens=12, temperature=1.0))
    # a band above the scratch model's entropy: the coefficient rises every step
    stage_cfg.entropy.update(target_low=10.0, target_high=20.0, rate=0.01, max_coef=1.0)

    model_a, trainer_a, rollouts_a = run_grpo(cfg, stage_cfg, tmp_path / "a")
    assert rollouts_a == [0, 1]  # 5 steps, 3 passes per batch
    assert trainer_a.controller.coef == pytest.approx(0.05)

    with pytest.raises(Interrupted):  # killed at step 3, the last pass over batch 0
        run_grpo(cfg, stage_cfg, tmp_path / "b", stop_at=3)
    model_b, trainer_b, rollouts_b = run_grpo(cfg, stage_cfg, tmp_path / "b")
    assert rollouts_b == [1]  # batch 0 came back from the checkpoint, not from a new sample
    assert trainer_b.controller.coef == pytest.approx(trainer_a.controller.coef)
    assert trainer_b.sampled_tokens == trainer_a.sampled_tokens
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    init = build_model(cfg.student, init="scratch").state_dict()
    assert any(not torch.equal(init[k], v) for k, v in model_a.state_dict().items())
