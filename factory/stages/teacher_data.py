"""The teacher bank's two data stages: generate the off-policy set, record the logit cache.

* `generate` (kind "dataset"): the teacher answers the task's training prompts in each mode,
  n times per prompt, with the card's sampling settings for that mode (Qwen3's by default),
  optionally keeping only responses the task's verifier accepts (rejection sampling). The
  artifact holds `data/` (a `datasets.Dataset` saved with `save_to_disk`: Arrow, memory-mapped
  when read) and `provenance.json` (teacher, task, settings, seed, counts).
* `record` (kind "cache"): the teacher scores its own responses and the artifact directory *is*
  the logit cache (teachers/cache.py), one row per response token, the sequence id being the
  set's `row`. Written shard by shard, so its size never has to fit in memory.

Both are teacher-side cost: the ledger charges them to the arm that reads them and a report can
amortise them over the runs that share them (DESIGN.md "Cost ledger").

Neither shards: in a multi-process run rank 0 generates and records alone while the other ranks
wait for its artifact (plain, not `distributed`, Stages; factory/pipeline.py).
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from factory import chat
from factory.errors import ConfigError
from factory.flops import forward_flops
from factory.ledger import StageCost
from factory.pipeline import Stage, StageContext
from factory.stages.distill import OFFPOLICY_DATA, load_offpolicy_set
from factory.stages.evaluate import mode_sampling
from factory.stages.models import card_inputs, tokenizer_for
from factory.tasks.registry import build_task
from students.builders import count_params
from teachers.bank import make_backend
from teachers.cache import CacheSpec, CacheWriter

PROVENANCE = "provenance.json"
_SCORE_CHUNK = 256  # sequences scored per backend call: bounds the rows held before writing


def _task_inputs(task_cfg) -> dict:
    return OmegaConf.to_container(task_cfg, resolve=True)


def generate_stage(name: str, card, task_cfg, *, model: str, gen_cfg, seed: int, cfg,
                   arm: str = "distill") -> Stage:
    """The off-policy set: `gen_cfg.n_per_prompt` responses per prompt and mode from the
    `model` stage's teacher, for the first `gen_cfg.n_prompts` training prompts."""
    modes = list(gen_cfg.modes)
    if not modes or len(set(modes)) != len(modes):
        raise ConfigError(f"pipeline.generate.modes must name distinct modes from {chat.MODES}, "
                          f"got {modes}")
    sampling = {mode: mode_sampling(card, mode) for mode in modes}
    inputs = {"teacher": card_inputs(card), "task": _task_inputs(task_cfg),
              "n_prompts": gen_cfg.n_prompts, "n_per_prompt": gen_cfg.n_per_prompt,
              "modes": modes, "rejection_sampling": gen_cfg.rejection_sampling,
              "sampling": sampling, "backend": cfg.backend.name, "seed": seed}

    def build(ctx: StageContext) -> StageCost:
        import datasets

        tokenizer = tokenizer_for(card)
        task = build_task(task_cfg)
        problems = task.problems("train", gen_cfg.n_prompts)
        teacher = make_backend(cfg.backend, card, ctx.upstream[model], tokenizer,
                               device=cfg.trainer.device, batch_size=cfg.pipeline.cache.batch_size)
        n = gen_cfg.n_per_prompt
        columns: dict[str, list] = {c: [] for c in ("row", "problem_id", "mode", "prompt_ids",
                                                    "response_ids", "response_text", "correct")}
        counts, prompt_tokens, generated = {}, 0, 0
        for m, mode in enumerate(modes):
            prompts = [chat.prompt_ids(tokenizer, [chat.user_message(p.prompt, mode)],
                                       enable_thinking=(mode == "think")) for p in problems]
            samples = teacher.generate(prompts, n, sampling[mode], seed=seed * 1_000 + m,
                                       batch_size=gen_cfg.batch_size)
            texts = samples.texts(tokenizer)
            prompt_tokens += sum(len(p) for p in prompts)  # prefilled once per prompt
            kept = correct_total = 0
            for r, (tokens, text, finished) in enumerate(zip(samples.tokens, texts,
                                                             samples.finished)):
                problem = problems[samples.prompt_index[r]]
                correct = finished and task.grade(problem, chat.split_response(text)[1])
                correct_total += correct
                generated += len(tokens)
                if gen_cfg.rejection_sampling and not correct:
                    continue
                columns["row"].append(len(columns["row"]))
                columns["problem_id"].append(problem.id)
                columns["mode"].append(mode)
                columns["prompt_ids"].append(prompts[samples.prompt_index[r]])
                columns["response_ids"].append(tokens)
                columns["response_text"].append(text)
                columns["correct"].append(bool(correct))
                kept += 1
            counts[mode] = {"generated": len(samples), "correct": correct_total, "kept": kept,
                            "accuracy": correct_total / max(len(samples), 1)}
        if not columns["row"]:
            raise ConfigError(
                f"the teacher kept no response out of {sum(c['generated'] for c in counts.values())}"
                f" (rejection sampling: none was verified correct); check the teacher, or set "
                f"pipeline.generate.rejection_sampling=false")
        features = datasets.Features({
            "row": datasets.Value("int64"), "problem_id": datasets.Value("string"),
            "mode": datasets.Value("string"),
            "prompt_ids": datasets.Sequence(datasets.Value("int32")),
            "response_ids": datasets.Sequence(datasets.Value("int32")),
            "response_text": datasets.Value("string"), "correct": datasets.Value("bool")})
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(
            str(ctx.out / OFFPOLICY_DATA))
        (ctx.out / PROVENANCE).write_text(json.dumps({
            "teacher": card.name, "task": task_cfg.name, "sampling": sampling,
            "n_prompts": len(problems), "n_per_prompt": n,
            "rejection_sampling": gen_cfg.rejection_sampling, "seed": seed,
            "backend": cfg.backend.name, "counts": counts, "rows": len(columns["row"]),
            "response_tokens": sum(len(t) for t in columns["response_ids"])}, indent=1))
        active = count_params(card)["flops_params"]
        return StageCost(tokens=generated, flops=forward_flops(active, generated + prompt_tokens),
                         notes={"counts": counts, "prompt_tokens": prompt_tokens})

    return Stage(name=name, kind="dataset", inputs=inputs, build=build, needs=[model], arm=arm,
                 teacher_side=True)


def record_stage(name: str, card, *, model: str, offpolicy_set: str, cache_cfg, seed: int, cfg,
                 arm: str = "distill") -> Stage:
    """The logit cache over the off-policy set: the `model` stage's teacher scores every
    response token (top-k or sampled rows at temperature 1, with the tail mass)."""
    inputs = {"teacher": card_inputs(card), "k": cache_cfg.k, "mode": cache_cfg.mode,
              "encoding": cache_cfg.encoding, "logprob_bits": cache_cfg.logprob_bits,
              "shard_tokens": cache_cfg.shard_tokens, "backend": cfg.backend.name, "seed": seed}

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        data = load_offpolicy_set(ctx.upstream[offpolicy_set])
        provenance = json.loads((ctx.upstream[offpolicy_set].path / PROVENANCE).read_text())
        spec = CacheSpec(k=cache_cfg.k, mode=cache_cfg.mode, encoding=cache_cfg.encoding,
                         vocab_size=card.arch.vocab_size, teacher=card.name,
                         sampling=provenance["sampling"], logprob_bits=cache_cfg.logprob_bits)
        teacher = make_backend(cfg.backend, card, ctx.upstream[model], tokenizer,
                               device=cfg.trainer.device, batch_size=cache_cfg.batch_size)
        scored = 0
        # written into the store's temporary directory: the cache is published with the artifact
        with CacheWriter(ctx.out, spec, shard_tokens=cache_cfg.shard_tokens) as writer:
            for a in range(0, len(data), _SCORE_CHUNK):
                rows = data[a:a + _SCORE_CHUNK]
                sequences = [list(p) + list(r) for p, r in zip(rows["prompt_ids"],
                                                               rows["response_ids"])]
                starts = [len(p) for p in rows["prompt_ids"]]
                for row, s, seq in zip(rows["row"], teacher.score(
                        sequences, starts, k=cache_cfg.k, mode=cache_cfg.mode,
                        seed=seed * 1_000_003 + a), sequences):
                    writer.add(int(row), s.ids_tk, s.logprobs_tk, s.tail_t)
                    scored += len(seq)
        active = count_params(card)["flops_params"]
        return StageCost(tokens=writer.tokens, flops=forward_flops(active, scored),
                         notes={"sequences": len(data),
                                "bytes_per_token": spec.row_bytes})

    return Stage(name=name, kind="cache", inputs=inputs, build=build,
                 needs=[model, offpolicy_set], arm=arm, teacher_side=True)
