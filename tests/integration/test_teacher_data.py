"""The teacher bank's data stages on a real tiny teacher: the off-policy set (Arrow, both modes,
provenance, rejection sampling) and the logit cache recorded over it."""

from __future__ import annotations

import json

import pytest
import torch

from factory import chat
from factory.inspect import compose
from factory.ledger import StageCost
from factory.models import load_model
from factory.loop import save_model
from factory.pipeline import Pipeline, Stage
from factory.stages.distill import load_offpolicy_set
from factory.stages.models import card_inputs, sft_stage, tokenizer_for
from factory.stages.teacher_data import PROVENANCE, generate_stage, record_stage
from factory.store import Store
from factory.tasks.registry import build_task
from students.builders import build_model
from teachers.cache import CacheReader

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

# products of 1..3 by a digit: a one-layer teacher learns many of them in 60 SFT steps
EASY = ["task.difficulty=1", "task.max_first_operand=3", "task.n_test=3",
        "teacher.arch.num_hidden_layers=1",
        "teacher.thinking.max_new_tokens=40", "teacher.non_thinking.max_new_tokens=16",
        "pipeline.generate.n_prompts=12", "pipeline.generate.n_per_prompt=3",
        "pipeline.generate.batch_size=64", "pipeline.cache.k=8", "pipeline.cache.batch_size=5",
        "pipeline.cache.shard_tokens=100", "trainer.progress=false", "trainer.num_threads=1"]


def scratch(card) -> Stage:
    def build(ctx) -> StageCost:
        torch.manual_seed(0)
        save_model(build_model(card, init="scratch"), tokenizer_for(card), ctx.out)
        return StageCost()

    return Stage("teacher/scratch", "model", {"card": card_inputs(card)}, build, arm="teacher")


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A briefly trained tiny teacher, its unfiltered off-policy set and its cache."""
    root = tmp_path_factory.mktemp("bank")
    cfg = compose(EASY + ["pipeline.generate.rejection_sampling=false"])
    pipe = Pipeline(Store(root / "store"), root / "run")
    pipe.run(scratch(cfg.teacher))
    pipe.run(sft_stage("teacher/sft", cfg.teacher, cfg.task, "teacher/scratch", steps=60,
                       batch_size=16, lr=3e-3, warmup_ratio=0.05, n_examples=400, max_len=96,
                       seed=0, cfg=cfg, arm="teacher"))
    pipe.run(generate_stage("teacher/generate", cfg.teacher, cfg.task, model="teacher/sft",
                            gen_cfg=cfg.pipeline.generate, seed=0, cfg=cfg))
    pipe.run(record_stage("teacher/record", cfg.teacher, model="teacher/sft",
                          offpolicy_set="teacher/generate", cache_cfg=cfg.pipeline.cache, seed=0,
                          cfg=cfg))
    return cfg, pipe, root


def test_offpolicy_set_has_both_modes_graded_rows_and_provenance(bank):
    cfg, pipe, _ = bank
    data = load_offpolicy_set(pipe.artifacts["teacher/generate"])
    assert len(data) == 12 * 3 * 2 and list(data["row"]) == list(range(len(data)))
    assert data.features["prompt_ids"].feature.dtype == "int32"
    tok = tokenizer_for(cfg.teacher)
    task = build_task(cfg.task)
    problems = {p.id: p for p in task.problems("train", 12)}
    for row in data:
        p = problems[row["problem_id"]]
        assert row["prompt_ids"] == chat.prompt_ids(
            tok, [chat.user_message(p.prompt, row["mode"])],
            enable_thinking=(row["mode"] == "think"))
        assert tok.decode(row["response_ids"]).startswith(row["response_text"])
        finished = row["response_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert row["correct"] == (finished and task.grade(
            p, chat.split_response(row["response_text"])[1]))
    assert {m: sum(1 for x in data["mode"] if x == m) for m in ("think", "no_think")} == \
        {"think": 36, "no_think": 36}
    provenance = json.loads((pipe.artifacts["teacher/generate"].path / PROVENANCE).read_text())
    assert provenance["teacher"] == "tiny-moe" and provenance["seed"] == 0
    assert provenance["sampling"]["think"]["temperature"] == cfg.teacher.thinking.temperature
    assert provenance["counts"]["think"]["correct"] == sum(
        r["correct"] for r in data if r["mode"] == "think")
    assert 0 < sum(data["correct"]) < len(data)  # the filter below has something to do


def test_rejection_sampling_keeps_exactly_the_verified_rows(bank, tmp_path):
    cfg, pipe, root = bank
    unfiltered = load_offpolicy_set(pipe.artifacts["teacher/generate"])
    filtered_cfg = compose(EASY + ["pipeline.generate.rejection_sampling=true"])
    stage = generate_stage("teacher/generate", filtered_cfg.teacher, filtered_cfg.task,
                           model="teacher/sft", gen_cfg=filtered_cfg.pipeline.generate, seed=0,
                           cfg=filtered_cfg)
    own = Pipeline(Store(root / "store"), tmp_path / "run")  # the module's pipeline stays as is
    own.artifacts["teacher/sft"] = pipe.artifacts["teacher/sft"]
    kept = load_offpolicy_set(own.run(stage))
    assert all(kept["correct"])
    # same seed and settings: the kept rows are the unfiltered set's correct rows, in order
    assert kept["response_text"] == [r["response_text"] for r in unfiltered if r["correct"]]
    assert list(kept["row"]) == list(range(len(kept)))


def test_cache_rows_are_the_teachers_distribution_at_each_response_token(bank):
    cfg, pipe, _ = bank
    data = load_offpolicy_set(pipe.artifacts["teacher/generate"])
    reader = CacheReader(pipe.artifacts["teacher/record"].path,
                         expect={"k": 8, "mode": "topk", "encoding": "compact"})
    assert len(reader) == len(data) and len(reader.manifest["shards"]) > 1
    assert reader.tokens == sum(len(r) for r in data["response_ids"])
    model = load_model(pipe.artifacts["teacher/sft"], cfg.teacher)
    for i in (0, 7, len(data) - 1):
        row = data[i]
        seq = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        P = len(row["prompt_ids"])
        with torch.no_grad():
            logp_tv = model(seq).logits[0, P - 1:-1].float().log_softmax(-1)
        assert reader.index_of(row["row"]) == i
        ids_tk, logprobs_tk, tail_t = reader.get(i)
        assert ids_tk.shape == (len(row["response_ids"]), 8)
        top_tk = logp_tv.topk(8, -1).values
        # compact encoding: 8-bit log-scale quantisation of the middle slots, fp16 ends
        assert torch.allclose(logprobs_tk.sort(-1, descending=True).values, top_tk, atol=0.05)
        assert torch.allclose(logp_tv.gather(-1, ids_tk), logprobs_tk, atol=0.05)
        mass = logprobs_tk.exp().sum(-1) + tail_t.exp()
        assert torch.allclose(mass, torch.ones_like(mass), atol=0.02)
