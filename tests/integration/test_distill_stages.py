"""Off-policy and on-policy distillation through the pipeline, on real tiny artifacts: an
off-policy set of arith problems whose gold traces stand in for the teacher's responses, a logit
cache recorded from a real tiny-moe teacher's logits, and the tiny student.

Each test runs its stage through `factory.pipeline.Pipeline` on one shared store; the upstream
artifacts are built once for the module and reused by every test's pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from factory import chat
from factory.config import LoggerConfig
from factory.errors import ArtifactError, ConfigError
from factory.inspect import compose
from factory.ledger import StageCost
from factory.loop import save_model
from factory.metrics import MetricsLogger
from factory.models import load_model
from factory.pipeline import Pipeline, Stage, StageContext
from factory.stages.distill import (
    OFFPOLICY_DATA,
    CacheReplay,
    is_on_policy,
    off_policy_stage,
    on_policy_stage,
)
from factory.stages.lm import IGNORE, causal_lm_loss
from factory.stages.models import tokenizer_for
from factory.store import Store
from factory.tasks.registry import build_task
from students.builders import build_model
from teachers.cache import CacheSpec, CacheWriter, from_logits

pytestmark = pytest.mark.integration

N_PROBLEMS = 12  # x 2 modes = 24 rows in the off-policy set
K = 8
SMALL = [
    "trainer.num_threads=1", "trainer.progress=false", "trainer.log_every=1",
    "trainer.checkpoint_every=2", "pipeline.cache.k=8",
    "pipeline.off_policy.steps=6", "pipeline.off_policy.batch_size=4",
    "pipeline.off_policy.grad_accum=2", "pipeline.off_policy.lr=3e-3",
    "pipeline.off_policy.warmup_ratio=0", "pipeline.off_policy.max_len=96",
    "pipeline.on_policy.steps=4", "pipeline.on_policy.batch_size=2",
    "pipeline.on_policy.n_per_prompt=2", "pipeline.on_policy.grad_accum=2",
    "pipeline.on_policy.max_new_tokens=12", "pipeline.on_policy.max_len=96",
    "pipeline.on_policy.lr=3e-3", "pipeline.on_policy.warmup_ratio=0", "task.n_train=64",
]


# ----------------------------------------------------------------------------------------------
# Upstream artifacts (real stages of this test: scratch models, a gold-trace set, a real cache)
# ----------------------------------------------------------------------------------------------


def scratch_model_stage(name: str, card, seed: int) -> Stage:
    def build(ctx: StageContext) -> StageCost:
        torch.manual_seed(seed)
        save_model(build_model(card, init="scratch"), tokenizer_for(card), ctx.out)
        return StageCost()

    return Stage(name=name, kind="model", inputs={"card": card.name, "seed": seed}, build=build)


def offpolicy_set_stage(cfg) -> Stage:
    """Contract (a): one row per (problem, mode), the gold trace as the teacher's response."""

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(cfg.student)
        problems = build_task(cfg.task).problems("train", N_PROBLEMS)
        rows = []
        for p in problems:
            for mode in ("think", "no_think"):
                thinking = mode == "think"
                text = chat.assistant_text(p.reasoning, p.answer, thinking)
                rows.append({
                    "row": len(rows), "problem_id": p.id, "mode": mode,
                    "prompt_ids": chat.prompt_ids(tokenizer, [chat.user_message(p.prompt, mode)],
                                                  enable_thinking=thinking),
                    "response_ids": chat.encode(tokenizer, text), "response_text": text,
                    "correct": True})
        datasets.Dataset.from_list(rows).save_to_disk(str(ctx.out / OFFPOLICY_DATA))
        (ctx.out / "provenance.json").write_text(json.dumps({"teacher": "gold", "task": "arith"}))
        return StageCost()

    return Stage(name="teacher/generate", kind="dataset", inputs={"n": N_PROBLEMS}, build=build)


def record_stage(name: str, model_stage: str, card, cache_cfg) -> Stage:
    """Contract (b): the model's distribution at every response token, sequence id = row."""

    def build(ctx: StageContext) -> StageCost:
        model = load_model(ctx.upstream[model_stage], card)
        data = datasets.load_from_disk(str(ctx.upstream["teacher/generate"].path / OFFPOLICY_DATA))
        spec = CacheSpec(k=cache_cfg.k, mode=cache_cfg.mode, encoding=cache_cfg.encoding,
                         vocab_size=card.arch.vocab_size, teacher=card.name,
                         logprob_bits=cache_cfg.logprob_bits)
        with CacheWriter(ctx.out, spec, shard_tokens=500) as writer, torch.no_grad():
            for row in data:
                prompt, response = row["prompt_ids"], row["response_ids"]
                logits_lv = model(input_ids=torch.tensor([prompt + response])).logits[0]
                start = len(prompt)
                rows_tv = logits_lv[start - 1 : start - 1 + len(response)]
                writer.add(row["row"], *from_logits(rows_tv, cache_cfg.k, cache_cfg.mode))
        return StageCost()

    return Stage(name=name, kind="cache",
                 inputs={"model": model_stage, "k": cache_cfg.k, "mode": cache_cfg.mode},
                 build=build, needs=[model_stage, "teacher/generate"])


def upstream_stages(cfg) -> list[Stage]:
    return [
        scratch_model_stage("student/base", cfg.student, seed=0),
        scratch_model_stage("teacher/sft", cfg.teacher, seed=1),
        offpolicy_set_stage(cfg),
        record_stage("teacher/record", "teacher/sft", cfg.teacher, cfg.pipeline.cache),
        record_stage("student/record", "student/base", cfg.student, cfg.pipeline.cache),
        record_stage("teacher/record_sampled", "teacher/sft", cfg.teacher,
                     compose(SMALL + ["pipeline.cache.mode=sampled"]).pipeline.cache),
    ]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("store")
    pipeline_for(root, tmp_path_factory.mktemp("upstream"), compose(SMALL))
    yield root
    torch.set_num_threads(threads)


def pipeline_for(root: Path, run_dir: Path, cfg, metrics=None) -> Pipeline:
    """A pipeline on the shared store with the upstream artifacts in place (reused)."""
    pipeline = Pipeline(Store(root), run_dir,
                        metrics=metrics or MetricsLogger(run_dir, LoggerConfig(mode="disabled")))
    for stage in upstream_stages(cfg):
        pipeline.run(stage)
    return pipeline


def off_policy(cfg, cache: str = "teacher/record"):
    return off_policy_stage(
        "distill/off_policy", cfg.student, base="student/base", offpolicy_set="teacher/generate",
        cache=cache, stage_cfg=cfg.pipeline.off_policy, loss_cfg=cfg.loss,
        cache_cfg=cfg.pipeline.cache, seed=cfg.seed, cfg=cfg)


def on_policy(cfg, *, init: str = "student/base", teacher: str = "teacher/sft", teacher_card=None):
    return on_policy_stage(
        "distill/on_policy", cfg.student, teacher_card or cfg.teacher, init=init,
        teacher_model=teacher, offpolicy_set="teacher/generate", cache="teacher/record",
        stage_cfg=cfg.pipeline.on_policy, loss_cfg=cfg.loss, cache_cfg=cfg.pipeline.cache,
        task_cfg=cfg.task, seed=cfg.seed, cfg=cfg)


def replay(pipeline: Pipeline, cfg, cache: str = "teacher/record") -> CacheReplay:
    tokenizer = tokenizer_for(cfg.student)
    return CacheReplay.open(
        pipeline.artifacts["teacher/generate"], pipeline.artifacts[cache], cfg.pipeline.cache,
        loss_cfg=cfg.loss, max_len=cfg.pipeline.off_policy.max_len,
        pad_id=tokenizer.pad_token_id, seed=cfg.seed, rows_per_micro=[4],
        vocab_size=cfg.student.arch.vocab_size)


def full_set_loss(pipeline, cfg, model, cache: str = "teacher/record") -> tuple[float, float]:
    """(divergence, ce) per token over every row of the off-policy set: a fixed batch."""
    data = replay(pipeline, cfg, cache)
    rows = data.eligible
    with torch.no_grad():
        out = data.batch_loss(model, rows, num_tokens=1)
    n = int(data.kept[rows].sum())
    return out.divergence_sum / n, out.ce_sum / n


def weights(artifact) -> dict[str, torch.Tensor]:
    return load_file(artifact.path / "model.safetensors")


def stage_metrics(run_dir: Path, stage: str) -> dict[int, dict]:
    """The last logged line per step of `stage` (a resumed run logs some steps twice)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if m["stage"] == stage}


class Killed(RuntimeError):
    pass


class KilledAfter(MetricsLogger):
    """A metrics logger that kills the stage right after logging step `step`."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(run_dir, LoggerConfig(mode="disabled"))
        self.step = step

    def log(self, stage: str, step: int, metrics: dict) -> None:
        super().log(stage, step, metrics)
        if step == self.step:
            raise Killed(f"killed after step {step}")


def kill_then_resume(root: Path, tmp_path: Path, cfg, make_stage, kill_after: int):
    """Build the stage uninterrupted, drop its artifact, build it again killed after step
    `kill_after` and rerun: returns (reference artifact weights and manifest, resumed ones)."""
    pipeline = pipeline_for(root, tmp_path / "reference", cfg)
    reference = pipeline.run(make_stage(cfg))
    want, want_manifest = weights(reference), reference.manifest
    shutil.rmtree(reference.path)

    killed = pipeline_for(root, tmp_path / "killed", cfg, metrics=KilledAfter(tmp_path, kill_after))
    with pytest.raises(Killed):
        killed.run(make_stage(cfg))
    resumed = pipeline_for(root, tmp_path / "resumed", cfg).run(make_stage(cfg))
    assert resumed.path == reference.path
    return (want, want_manifest), (weights(resumed), resumed.manifest)


# ----------------------------------------------------------------------------------------------
# Off-policy
# ----------------------------------------------------------------------------------------------


def test_cached_rows_line_up_with_the_students_predictions(store_root, tmp_path):
    """Against a cache recorded from the student itself the divergence is ~0 (the compact
    encoding's rounding only), and the ce term is the plain causal-LM loss on the responses."""
    cfg = compose(SMALL)
    pipeline = pipeline_for(store_root, tmp_path, cfg)
    student = load_model(pipeline.artifacts["student/base"], cfg.student)
    self_div, self_ce = full_set_loss(pipeline, cfg, student, cache="student/record")
    teacher_div, teacher_ce = full_set_loss(pipeline, cfg, student)
    assert self_div < 1e-5 and teacher_div > 1e-3
    assert self_ce == pytest.approx(teacher_ce, rel=1e-6)  # ce reads the tokens, not the cache

    data = replay(pipeline, cfg)
    rows = data.eligible
    examples = data.dataset[[int(r) for r in rows]]
    ce_sum, n_tokens = 0.0, 0
    for prompt, response in zip(examples["prompt_ids"], examples["response_ids"]):
        ids = torch.tensor([(prompt + response)[: data.max_len]])
        labels = ids.clone()
        labels[0, : len(prompt)] = IGNORE
        with torch.no_grad():
            loss, n = causal_lm_loss(student, ids, labels)
        ce_sum, n_tokens = ce_sum + loss.item(), n_tokens + n
    assert n_tokens == int(data.kept[rows].sum())
    assert self_ce == pytest.approx(ce_sum / n_tokens, rel=1e-5)


def test_micro_batches_add_up_to_one_batch_in_value_and_gradient(store_root, tmp_path):
    cfg = compose(SMALL + ["loss.ce_weight=0.5", "loss.kind=jsd"])
    pipeline = pipeline_for(store_root, tmp_path, cfg)
    data = replay(pipeline, cfg)
    model = load_model(pipeline.artifacts["student/base"], cfg.student)
    rows = data.eligible[[0, 5, 9, 17]]  # think and no_think rows of different lengths
    total = int(data.kept[rows].sum())

    def loss_and_grads(parts):
        model.zero_grad()
        loss = sum(data.batch_loss(model, part, total).loss for part in parts)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = loss_and_grads([rows])
    split, split_grads = loss_and_grads([rows[:1], rows[1:]])
    assert split == pytest.approx(whole, rel=1e-6)
    for a, b in zip(split_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_off_policy_stage_learns_the_cache_logs_and_is_reused(store_root, tmp_path):
    cfg = compose(SMALL)
    pipeline = pipeline_for(store_root, tmp_path / "run1", cfg)
    artifact = pipeline.run(off_policy(cfg))

    base = load_model(pipeline.artifacts["student/base"], cfg.student)
    trained = load_model(artifact, cfg.student)
    before, after = full_set_loss(pipeline, cfg, base), full_set_loss(pipeline, cfg, trained)
    assert after[0] < 0.5 * before[0]  # the divergence to the teacher, on every row
    init, got = weights(pipeline.artifacts["student/base"]), weights(artifact)
    assert got.keys() == init.keys() and any(not torch.equal(got[n], init[n]) for n in init)

    logged = stage_metrics(tmp_path / "run1", "distill/off_policy")
    assert sorted(logged) == list(range(1, 7))
    for m in logged.values():
        assert m["loss"] == pytest.approx(m["divergence"], rel=1e-5)  # ce_weight 0
        assert m["response_tokens"] > 0 and m["response_length"] > 0
        assert 0 < m["entropy"] <= np.log(cfg.student.arch.vocab_size)  # nats per token
    assert artifact.manifest["cost"]["notes"]["steps"] == 6
    assert artifact.manifest["cost"]["tokens"] > 0

    again = pipeline_for(store_root, tmp_path / "run2", cfg).run(off_policy(cfg))
    assert again.path == artifact.path
    entry = json.loads((tmp_path / "run2" / "ledger.json").read_text())["stages"][-1]
    assert entry["stage"] == "distill/off_policy" and entry["reused"]
    assert "distill/off_policy" not in {json.loads(x)["stage"] for x in
                                        (tmp_path / "run2" / "metrics.jsonl").read_text().split()}


def test_a_killed_off_policy_stage_with_ce_resumes_to_the_uninterrupted_weights(
        store_root, tmp_path):
    cfg = compose(SMALL + ["pipeline.off_policy.steps=5", "seed=3", "loss.ce_weight=0.5"])
    (want, _), (got, manifest) = kill_then_resume(store_root, tmp_path, cfg, off_policy,
                                                  kill_after=3)
    logged = stage_metrics(tmp_path / "reference", "distill/off_policy")
    assert sorted(logged) == list(range(1, 6))
    for m in logged.values():
        # the loss is the per-token divergence plus ce_weight times the per-token ce of the step
        assert m["loss"] == pytest.approx(m["divergence"] + 0.5 * m["ce"], rel=1e-5)
    assert manifest["cost"]["notes"]["resumed_from"] == 2  # the checkpoint before the kill
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_sampled_cache_trains_forward_kl_and_refuses_other_divergences(store_root, tmp_path):
    cfg = compose(SMALL + ["pipeline.cache.mode=sampled"])
    pipeline = pipeline_for(store_root, tmp_path, compose(SMALL))
    data = replay(pipeline, cfg, cache="teacher/record_sampled")
    model = load_model(pipeline.artifacts["student/base"], cfg.student)
    rows = data.eligible[:6]
    out = data.batch_loss(model, rows, int(data.kept[rows].sum()))
    out.loss.backward()
    assert np.isfinite(out.divergence_sum)
    assert out.loss.item() == pytest.approx(out.divergence_sum / data.kept[rows].sum())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ConfigError, match="forward KL only"):
        replay(pipeline, compose(SMALL + ["pipeline.cache.mode=sampled", "loss=rkl"]),
               cache="teacher/record_sampled")


def test_a_cache_of_another_k_is_refused(store_root, tmp_path):
    cfg = compose(SMALL + ["pipeline.cache.k=4"])
    pipeline = pipeline_for(store_root, tmp_path, compose(SMALL))
    with pytest.raises(ArtifactError, match="k: the cache has 8, the run asks for 4"):
        pipeline.run(off_policy(cfg))


# ----------------------------------------------------------------------------------------------
# On-policy
# ----------------------------------------------------------------------------------------------


def mixed_seed(steps: int) -> int:
    """A seed whose first `steps` steps at lambda 0.5 hold both kinds, starting on-policy."""
    return next(s for s in range(100)
                if is_on_policy(s, 1, 0.5) and 0 < sum(is_on_policy(s, t, 0.5)
                                                       for t in range(1, steps + 1)) < steps)


def test_on_policy_topk_interleaves_steps_as_gkd_lambda_says(store_root, tmp_path):
    seed = mixed_seed(4)
    cfg = compose(SMALL + ["pipeline.on_policy.gkd_lambda=0.5", f"seed={seed}"])
    pipeline = pipeline_for(store_root, tmp_path, cfg)
    artifact = pipeline.run(on_policy(cfg))

    logged = stage_metrics(tmp_path, "distill/on_policy")
    kinds = [bool(logged[s]["on_policy"]) for s in range(1, 5)]
    assert kinds == [is_on_policy(seed, s, 0.5) for s in range(1, 5)]
    for m in logged.values():
        if m["on_policy"]:
            assert m["divergence"] >= 0 and np.isfinite(m["rkl"])
            assert m["loss"] == pytest.approx(m["divergence"], rel=1e-5)
            assert 1 <= m["response_length"] <= 12 and 0 <= m["sample_correct"] <= 1
            assert 0 < m["entropy"] <= np.log(cfg.student.arch.vocab_size)
        else:  # a replay of the cache with the stage's divergence
            assert m["loss"] == pytest.approx(m["divergence"], rel=1e-5) and "rkl" not in m
    notes = artifact.manifest["cost"]["notes"]
    assert notes["on_policy_steps"] == sum(kinds)
    assert notes["sampled_tokens"] > 0 and notes["teacher_scored_tokens"] > notes["sampled_tokens"]
    assert notes["teacher_flops"] > 0

    init, got = weights(pipeline.artifacts["student/base"]), weights(artifact)
    assert got.keys() == init.keys() and any(not torch.equal(got[n], init[n]) for n in init)


def test_on_policy_against_the_student_itself_has_zero_reverse_kl(store_root, tmp_path):
    """The teacher scores exactly the sampled tokens at the student's positions: with the student
    as its own teacher both estimates of the reverse KL are 0 at the first step."""
    cfg = compose(SMALL + ["pipeline.on_policy.steps=1", "pipeline.on_policy.grad_accum=1"])
    pipeline = pipeline_for(store_root, tmp_path, cfg)
    pipeline.run(on_policy(cfg, teacher="student/base", teacher_card=cfg.student))
    first = stage_metrics(tmp_path, "distill/on_policy")[1]
    assert first["on_policy"] == 1
    assert abs(first["rkl"]) < 1e-5 and first["divergence"] < 1e-6


def test_on_policy_sampled_token_from_the_off_policy_checkpoint_resumes_exactly(
        store_root, tmp_path):
    cfg = compose(SMALL + ["pipeline.on_policy.estimator=sampled_token",
                           "pipeline.off_policy.steps=2", "seed=5"])
    pipeline_for(store_root, tmp_path / "init", cfg).run(off_policy(cfg))

    def stage(c):
        return on_policy(c, init="distill/off_policy")

    def with_init(run_dir, metrics=None):
        p = pipeline_for(store_root, run_dir, cfg, metrics)
        p.run(off_policy(cfg))  # reused: the on-policy stage starts from its checkpoint
        return p

    reference = with_init(tmp_path / "reference").run(stage(cfg))
    want, want_notes = weights(reference), reference.manifest["cost"]["notes"]
    logged = stage_metrics(tmp_path / "reference", "distill/on_policy")
    assert all(m["on_policy"] == 1 and "divergence" not in m for m in logged.values())
    assert want_notes["on_policy_steps"] == 4
    shutil.rmtree(reference.path)

    with pytest.raises(Killed):
        with_init(tmp_path / "killed", KilledAfter(tmp_path, 3)).run(stage(cfg))
    resumed = with_init(tmp_path / "resumed").run(stage(cfg))
    notes = resumed.manifest["cost"]["notes"]
    assert notes["resumed_from"] == 2
    # the counters came back with the checkpoint: the same totals as the uninterrupted run
    for key in ("on_policy_steps", "sampled_tokens", "teacher_scored_tokens"):
        assert notes[key] == want_notes[key], key
    got = weights(resumed)
    for name in want:
        assert torch.equal(got[name], want[name]), name
