"""The four-stage baseline (DESIGN.md "Four-stage baseline", the Qwen3 report's section 4):

    cold start     SFT on a few hundred filtered, verified chain-of-thought solutions
    reasoning RL   GRPO on query-answer pairs (no traces), reward = the task's verifier
    fusion         SFT on a per-instance mix of /think (rejection-sampled from the stage-2 model)
                   and /no_think examples, some of them two-turn chats whose last flag decides
    general RL     GRPO on a weighted sum of rule rewards: correct, format, mode flag, length

Each builder returns a `Stage` that reads its upstream model artifact and writes a model
artifact; `four_stage_stages` chains the four. The RL and fusion stages draw their queries from
the task's train split after the cold start's candidates, so RL never sees a cold-start query
(the report's rule). RL's equations live in factory/rl.py; this module turns them into a
deterministic `micro_step` for the one training loop (factory/loop.py).

Multi-process runs (factory/processes.py): the SFT stages (cold start, fusion) shard their
batches like every SFT; fusion's rejection sampling runs on rank 0 and its verified solutions are
broadcast, so every rank builds the same mix. GRPO does not shard yet: every rank samples, scores
and trains on the same rows (identical weights and seeds give identical samples on CPU), so the
averaged gradient is the one-process gradient and the extra ranks add nothing but cost.

GRPO and the loop: a sampled batch serves `passes` consecutive optimizer steps (off-policy
reuse). Step s works on batch b = (s - 1) // passes; the batch is sampled at its first pass from
the model as it is then, with a generator seeded by (seed, b). Its old log-probs are recorded
once, by the first pass's own forward (the model that sampled is the model of the first pass, so
that pass is exactly on-policy: ratio 1), and the frozen reference's once at sampling time. The
current batch, the entropy coefficient and the token counters are the loop's `extra_state`: a
run resumed in the middle of a batch continues on the very batch the killed one was using, and
ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import logging
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from factory import chat, rl
from factory.errors import ConfigError
from factory.flops import forward_flops, train_flops
from factory.ledger import StageCost
from factory.loop import StepOutput, current_device, save_model, train
from factory.processes import broadcast, current_rank
from factory.models import load_model
from factory.pipeline import Stage, StageContext
from factory.sampling import sample, token_kwargs
from factory.stages.lm import SFTData, step_generator
from factory.stages.models import card_inputs, sft_examples, tokenizer_for
from factory.store import file_sha256
from factory.tasks import Problem, Task
from factory.tasks.registry import build_task
from students.builders import count_params

log = logging.getLogger(__name__)

COLD_START_SOURCES = ("task", "jsonl")


def _container(node) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(node), resolve=True)


def _active_params(card) -> int:
    return count_params(card)["flops_params"]


# ============================================================================ cold start data

def _grades(task: Task, problem: Problem, text: str) -> bool:
    """task.grade that reads a malformed gold (a non-integer for arith) as "not correct"."""
    try:
        return bool(task.grade(problem, text))
    except ValueError:
        return False


def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed: what the near-duplicate filter compares."""
    return " ".join(text.lower().split())


def char_ngrams(text: str, n: int) -> set[str]:
    """The character n-grams of the normalised text (the whole text when shorter than n)."""
    t = normalise(text)
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


class NearDuplicateIndex:
    """Jaccard similarity of character n-gram sets against a fixed collection (the test split),
    through an inverted index: a query touches only the items that share an n-gram with it."""

    def __init__(self, texts: Sequence[str], n: int):
        if n < 1:
            raise ConfigError(f"near-duplicate n-gram length must be >= 1, got {n}")
        self.n = n
        self.sizes: list[int] = []
        self.index: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            grams = char_ngrams(text, n)
            self.sizes.append(len(grams))
            for g in grams:
                self.index.setdefault(g, []).append(i)

    def max_similarity(self, text: str) -> float:
        grams = char_ngrams(text, self.n)
        shared = Counter(i for g in grams for i in self.index.get(g, ()))
        return max((c / (len(grams) + self.sizes[i] - c) for i, c in shared.items()), default=0.0)


def is_repetitive(text: str, max_repeats: int) -> bool:
    """Whether any non-empty line occurs more than `max_repeats` times (a looping trace)."""
    lines = Counter(line.strip() for line in text.splitlines() if line.strip())
    return bool(lines) and lines.most_common(1)[0][1] > max_repeats


@dataclass(frozen=True)
class Candidate:
    problem: Problem  # with the gold answer
    reasoning: str | None
    answer: str  # the solution's own final answer


FILTER_REASONS = ("no_trace", "wrong", "repetitive", "mismatch", "near_duplicate")


def filter_cold_start(task: Task, candidates: Sequence[Candidate], test_problems: Sequence[Problem],
                      *, max_line_repeats: int, ngram: int, threshold: float
                      ) -> tuple[list[Problem], dict[str, int]]:
    """The Qwen3 report's cold-start filters that apply to a verifiable task, in this order
    (a candidate is counted under the first it fails):

    no_trace        no chain of thought to learn from
    wrong           the final answer does not pass the task's verifier against the gold
    repetitive      a line of the trace repeats more than `max_line_repeats` times
    mismatch        the trace concludes something else than the answer (think/summary mismatch:
                    the verifier, run on the trace with the answer as gold, rejects it)
    near_duplicate  the problem is within `threshold` Jaccard similarity (character n-grams) of
                    a test problem

    Returns the kept problems (their reasoning and answer replaced by the candidate's) and the
    count per reason, plus "kept".
    """
    index = NearDuplicateIndex([p.prompt for p in test_problems], ngram)
    counts = dict.fromkeys(FILTER_REASONS, 0)
    kept = []
    for c in candidates:
        reasoning = (c.reasoning or "").strip()
        if not reasoning:
            reason = "no_trace"
        elif not _grades(task, c.problem, c.answer):
            reason = "wrong"
        elif is_repetitive(reasoning, max_line_repeats):
            reason = "repetitive"
        elif not _grades(task, replace(c.problem, answer=c.answer), reasoning):
            reason = "mismatch"
        elif index.max_similarity(c.problem.prompt) >= threshold:
            reason = "near_duplicate"
        else:
            kept.append(replace(c.problem, reasoning=reasoning, answer=c.answer))
            continue
        counts[reason] += 1
    counts["kept"] = len(kept)
    return kept, counts


def cold_start_candidates(task: Task, stage_cfg) -> list[Candidate]:
    """The first `n_examples` solutions of the configured source: the task's own verified
    traces (the train split's first problems) or a local jsonl of
    {problem, reasoning, answer[, gold]} (gold defaults to the answer: then only the filters
    that need no gold can reject)."""
    n = stage_cfg.n_examples
    if stage_cfg.source == "task":
        return [Candidate(p, p.reasoning, p.answer) for p in task.problems("train", n)]
    rows = [json.loads(line) for line in Path(stage_cfg.path).read_text().splitlines()
            if line.strip()][:n]
    out = []
    for i, row in enumerate(rows):
        missing = {"problem", "reasoning", "answer"} - set(row)
        if missing:
            raise ConfigError(f"cold start jsonl {stage_cfg.path}, row {i + 1}: missing "
                              f"{sorted(missing)}; rows need problem, reasoning, answer")
        gold = str(row["gold"]) if "gold" in row else str(row["answer"])
        out.append(Candidate(Problem(id=f"cold-start-{i}", prompt=row["problem"], answer=gold),
                             row["reasoning"], str(row["answer"])))
    return out


def _cold_start_source_inputs(stage_cfg) -> dict:
    """What identifies the cold start's data: the source, and a jsonl file's checksum (so an
    edited file makes a new artifact). Fails at planning time, before any compute."""
    if stage_cfg.source not in COLD_START_SOURCES:
        raise ConfigError(f"cold_start.source must be one of {COLD_START_SOURCES}, got "
                          f"{stage_cfg.source!r}")
    if stage_cfg.source == "task":
        return {}
    if stage_cfg.path is None or not Path(stage_cfg.path).is_file():
        raise ConfigError(f"cold_start.source=jsonl needs cold_start.path, a jsonl file of "
                          f"{{problem, reasoning, answer}} rows; got {stage_cfg.path!r}")
    return {"jsonl_sha256": file_sha256(Path(stage_cfg.path))}


# ============================================================================ queries and chats

def rl_pool(task: Task, skip: int, n: int) -> list[Problem]:
    """Train-split queries for RL and fusion: the n after the first `skip` (the cold start's
    candidates), or all after them when n is 0."""
    problems = task.problems("train", skip + n if n else 0)[skip:]
    if not problems:
        raise ConfigError(f"task {getattr(task, 'name', '?')!r} has no training queries after "
                          f"the cold start's {skip}; RL needs query-answer pairs (task.n_train, "
                          f"task.train_path or task.train_split)")
    return problems


def other_mode(mode: str) -> str:
    return "no_think" if mode == "think" else "think"


def conversation(problem: Problem, mode: str, earlier: Problem | None = None) -> list[dict]:
    """The messages up to the user turn that asks `problem` with the flag `mode`. With `earlier`,
    a two-turn chat: `earlier` asked with the other flag and answered first (its reasoning is
    not rendered: the template drops earlier turns' thinking), so the latest flag decides."""
    messages = []
    if earlier is not None:
        first = other_mode(mode)
        messages += [chat.user_message(earlier.prompt, first),
                     chat.assistant_message(None, earlier.answer, thinking=first == "think")]
    messages.append(chat.user_message(problem.prompt, mode))
    return messages


@dataclass(frozen=True)
class Query:
    problem: Problem
    mode: str  # the latest flag
    messages: list[dict]


def answer_extractor(task_kind: str) -> Callable[[str], Any]:
    """The task's "is there a final answer" parser for the format reward: arith the last
    integer, math the boxed / final-answer extraction, code a fenced block that compiles."""
    if task_kind == "arith":
        from factory.tasks.arith import last_integer

        return last_integer
    if task_kind == "math":
        from factory.tasks.math import extract_answer

        return extract_answer
    if task_kind == "code":
        from factory.tasks.benchmarks import extract_code

        def compiles(text: str):
            code = extract_code(text)
            try:
                compile(code, "<answer>", "exec")
            except (SyntaxError, ValueError):
                return None
            return code

        return compiles
    raise ConfigError(f"no answer parser for task kind {task_kind!r}")


# ============================================================================ GRPO

RewardFn = Callable[[Query, str, int, bool], dict[str, float]]


def reasoning_reward(task: Task) -> RewardFn:
    """Stage 2: the verifier's verdict on the answer part, 1 or 0."""

    def reward(query: Query, text: str, n_tokens: int, finished: bool) -> dict[str, float]:
        correct = rl.correct_reward(lambda answer: _grades(task, query.problem, answer), text)
        return {"reward": correct, "correct": correct}

    return reward


def general_reward(task: Task, task_kind: str, stage_cfg) -> RewardFn:
    """Stage 4: weighted sum of the rule rewards (factory/rl.py), the length target by mode."""
    extract = answer_extractor(task_kind)
    weights = {"correct": stage_cfg.reward_correct, "format": stage_cfg.reward_format,
               "follow": stage_cfg.reward_follow, "length": stage_cfg.reward_length}
    targets = {"think": stage_cfg.think_target_tokens,
               "no_think": stage_cfg.no_think_target_tokens}
    tolerance = stage_cfg.length_tolerance

    def reward(query: Query, text: str, n_tokens: int, finished: bool) -> dict[str, float]:
        parts = {
            "correct": rl.correct_reward(lambda a: _grades(task, query.problem, a), text),
            "format": rl.format_reward(text, finished, extract),
            "follow": rl.follow_reward(text, query.mode),
            "length": rl.length_reward(n_tokens, targets[query.mode], tolerance),
        }
        return {"reward": rl.weighted_reward(parts, weights), **parts}

    return reward


def entropy_controller(e) -> rl.EntropyController:
    """The controller an EntropyControlConfig describes; a bad setting is a ConfigError."""
    try:
        return rl.EntropyController(
            coef=e.init_coef, target_low=e.target_low, target_high=e.target_high, rate=e.rate,
            rule=e.rule, min_coef=e.min_coef, max_coef=e.max_coef, enabled=e.enabled)
    except ValueError as err:
        raise ConfigError(f"entropy control: {err}") from None


def check_grpo_config(c) -> None:
    """Fail at planning time, before any stage runs, on a GRPO config that cannot work."""
    rows = c.prompts_per_batch * c.group_size
    if c.group_size < 2:
        raise ConfigError(f"GRPO needs group_size >= 2 (a group of one has no baseline), "
                          f"got {c.group_size}")
    if c.passes < 1 or c.grad_accum < 1 or rows % c.grad_accum:
        raise ConfigError(f"GRPO: passes and grad_accum must be >= 1 and grad_accum must "
                          f"divide prompts_per_batch x group_size = {rows}; got "
                          f"passes={c.passes}, grad_accum={c.grad_accum}")
    bad = set(c.modes) - set(chat.MODES)
    if bad or not c.modes:
        raise ConfigError(f"GRPO modes must be a non-empty subset of {chat.MODES}, "
                          f"got {list(c.modes)}")
    if c.temperature <= 0:
        raise ConfigError(f"GRPO samples from the policy: temperature must be > 0, "
                          f"got {c.temperature}")
    entropy_controller(c.entropy)


class GRPOTrainer:
    """GRPO's `micro_step` and its checkpointed state (module docstring).

    A batch is `prompts_per_batch` queries x `group_size` samples; its rows are split evenly
    into `grad_accum` micro-batches. `soft_switch`: prompts are rendered with the default
    (thinking) generation prompt whatever the flag, so the model itself must honour /no_think
    (general RL); otherwise the prompt follows the flag as evaluation renders it (reasoning RL).
    Every process samples and trains the same rows: the rows are not sharded across ranks.
    """

    def __init__(self, *, tokenizer, pool: Sequence[Problem], stage_cfg, reward: RewardFn,
                 seed: int, soft_switch: bool, multi_turn_ratio: float = 0.0, ref_model=None):
        c = stage_cfg
        self.cfg, self.tokenizer, self.pool = c, tokenizer, list(pool)
        self.reward, self.seed, self.soft_switch = reward, seed, soft_switch
        self.multi_turn_ratio, self.ref_model = multi_turn_ratio, ref_model
        self.rows = c.prompts_per_batch * c.group_size
        check_grpo_config(c)
        if len(self.pool) < c.prompts_per_batch:
            raise ConfigError(f"GRPO: {len(self.pool)} queries in the pool, fewer than "
                              f"prompts_per_batch={c.prompts_per_batch}")
        self.controller = entropy_controller(c.entropy)
        self.batch: dict | None = None
        self.sampled_tokens = 0  # prompt (once per query) + generated tokens
        self.scored_tokens = 0  # tokens of the reference's no-grad forwards
        self._entropy = [0.0, 0]  # this step's entropy sum and token count, over micro-batches
        self._token_kw = token_kwargs(tokenizer)

    # -- checkpointed state (factory.loop.Stateful)
    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "batch": self.batch,
                "sampled_tokens": self.sampled_tokens, "scored_tokens": self.scored_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.batch = state["batch"]
        self.sampled_tokens, self.scored_tokens = state["sampled_tokens"], state["scored_tokens"]

    # -- batches
    def queries(self, b: int) -> list[Query]:
        """Batch b's queries: distinct pool problems, a flag each, some as a second turn."""
        rng = random.Random(f"grpo/{self.seed}/{b}")
        out = []
        for i in rng.sample(range(len(self.pool)), self.cfg.prompts_per_batch):
            mode = rng.choice(list(self.cfg.modes))
            two_turn = rng.random() < self.multi_turn_ratio
            earlier = self.pool[rng.randrange(len(self.pool))] if two_turn else None
            out.append(Query(self.pool[i], mode, conversation(self.pool[i], mode, earlier)))
        return out

    def _micro_rows(self, micro: int) -> range:
        per = self.rows // self.cfg.grad_accum
        return range(micro * per, (micro + 1) * per)

    def _pack(self, batch: dict, rows: range, device):
        """Right-padded ids and mask of `rows`, the positions predicting a response token
        (`[B, T-1]`) and those tokens (`[N]`, row-major: each response in order)."""
        seqs = [batch["ids"][r] for r in rows]
        width = max(len(s) for s in seqs)
        ids_bt = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask_bt = torch.zeros((len(seqs), width), dtype=torch.long)
        pred_bt = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
        for i, (seq, r) in enumerate(zip(seqs, rows)):
            ids_bt[i, :len(seq)] = torch.tensor(seq)
            mask_bt[i, :len(seq)] = 1
            pred_bt[i, batch["prompt_lens"][r] - 1:len(seq) - 1] = True
        targets_n = ids_bt[:, 1:][pred_bt]
        return ids_bt.to(device), mask_bt.to(device), pred_bt.to(device), targets_n.to(device)

    def _logprobs(self, model, batch: dict, rows: range, device):
        ids_bt, mask_bt, pred_bt, targets_n = self._pack(batch, rows, device)
        hidden_bth, weight_vh = rl.final_hidden_states(model, ids_bt, mask_bt)
        logp_n, entropy_n = rl.token_logprobs_and_entropy(
            hidden_bth[:, :-1][pred_bt], weight_vh, targets_n,
            temperature=self.cfg.temperature, chunk_size=self.cfg.chunk_size)
        return logp_n, entropy_n, int(mask_bt.sum())

    def _score(self, model, batch: dict, device) -> list[list[float]]:
        """Per-row response log-probs under `model`, no grad, one micro-batch at a time."""
        out: list[list[float]] = []
        with torch.no_grad():
            for micro in range(self.cfg.grad_accum):
                rows = self._micro_rows(micro)
                logp_n, _, tokens = self._logprobs(model, batch, rows, device)
                self.scored_tokens += tokens
                lengths = [len(batch["ids"][r]) - batch["prompt_lens"][r] for r in rows]
                out += [t.tolist() for t in logp_n.float().cpu().split(lengths)]
        return out

    def rollout(self, model, b: int) -> dict:
        """Sample batch b with `model`, grade it, and record what its passes reuse."""
        c, device = self.cfg, current_device()
        queries = self.queries(b)
        prompts = [chat.prompt_ids(self.tokenizer, q.messages,
                                   enable_thinking=self.soft_switch or q.mode == "think")
                   for q in queries]
        samples = sample(getattr(model, "module", model), prompts, c.group_size,
                         temperature=c.temperature, max_new_tokens=c.max_new_tokens,
                         batch_size=c.sample_batch_size,
                         generator=step_generator(self.seed, b, 0), **self._token_kw)
        texts = samples.texts(self.tokenizer)
        parts = [self.reward(queries[i], text, len(tokens), done) for i, text, tokens, done in
                 zip(samples.prompt_index, texts, samples.tokens, samples.finished)]
        rewards_pg = torch.tensor([p["reward"] for p in parts], dtype=torch.float64)
        rewards_pg = rewards_pg.view(c.prompts_per_batch, c.group_size)
        adv_pg = rl.group_advantages(rewards_pg, normalize_std=c.normalize_std)
        lengths = samples.lengths()
        batch = {
            "index": b,
            "ids": [prompts[i] + t for i, t in zip(samples.prompt_index, samples.tokens)],
            "prompt_lens": [len(prompts[i]) for i in samples.prompt_index],
            "adv": adv_pg.flatten().tolist(),
            "n_tokens": sum(lengths),
        }
        batch["old"] = [None] * len(lengths)  # recorded by the first pass (micro_step)
        batch["ref"] = None if self.ref_model is None else self._score(self.ref_model, batch,
                                                                       device)
        metrics = {"reward": float(rewards_pg.mean()),
                   "accuracy": sum(p["correct"] for p in parts) / len(parts),
                   "response_length": sum(lengths) / len(lengths),
                   "truncated": 1.0 - sum(samples.finished) / len(parts),
                   "signal_groups": float((rewards_pg.std(-1, unbiased=False) > 0)
                                          .float().mean())}
        for key in parts[0]:
            if key not in ("reward", "correct"):
                metrics[f"reward_{key}"] = sum(p[key] for p in parts) / len(parts)
        batch["metrics"] = metrics
        self.sampled_tokens += sum(len(p) for p in prompts) + sum(lengths)
        return batch

    def micro_step(self, model, step: int, micro: int) -> StepOutput:
        c, device = self.cfg, current_device()
        b, pass_ = divmod(step - 1, c.passes)
        if self.batch is None or self.batch["index"] != b:
            if pass_ != 0 or micro != 0:
                raise RuntimeError(f"GRPO step {step} (pass {pass_} of batch {b}) found no "
                                   f"batch {b} in its state: the checkpoint lacks it")
            self.batch = self.rollout(model, b)
        batch, rows = self.batch, self._micro_rows(micro)
        logp_n, entropy_n, tokens = self._logprobs(model, batch, rows, device)
        lengths = [len(batch["ids"][r]) - batch["prompt_lens"][r] for r in rows]
        if pass_ == 0:  # the policy that sampled the batch: its log-probs are the old ones
            old_n = logp_n.detach()
            for r, old in zip(rows, old_n.cpu().split(lengths)):
                batch["old"][r] = old.tolist()
        else:
            old_n = torch.tensor([x for r in rows for x in batch["old"][r]], device=device)
        ref_n = None if batch["ref"] is None else torch.tensor(
            [x for r in rows for x in batch["ref"][r]], device=device)
        adv_n = torch.tensor([batch["adv"][r] for r in rows],
                             dtype=torch.float32).repeat_interleave(torch.tensor(lengths))
        adv_n = adv_n.to(device)
        coef = self.controller.coef
        loss, metrics = rl.grpo_loss(
            logp_n, old_n, adv_n, eps_low=c.eps_low, eps_high=c.eps_high,
            num_tokens=batch["n_tokens"], ref_logp_n=ref_n, kl_coef=c.kl_coef,
            entropy_n=entropy_n, entropy_coef=coef)
        if micro == 0:
            self._entropy = [0.0, 0]
        self._entropy[0] += float(entropy_n.detach().sum())
        self._entropy[1] += entropy_n.numel()
        if micro == c.grad_accum - 1:  # once per optimizer step, on the step's whole entropy
            self.controller.update(self._entropy[0] / max(self._entropy[1], 1))
        return StepOutput(loss=loss, tokens=tokens, metrics={
            **batch["metrics"], **metrics, "entropy_coef": coef, "pass": float(pass_)})


# ============================================================================ fusion data

def check_ratios(stage: str, **ratios: float) -> None:
    bad = {k: v for k, v in ratios.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ConfigError(f"{stage}: {', '.join(f'{k}={v}' for k, v in bad.items())}: "
                          f"ratios must be in [0, 1]")


def rejection_sample(model, tokenizer, task: Task, problems: Sequence[Problem], *, n: int,
                     sampling, batch_size: int, seed: int
                     ) -> tuple[dict[int, tuple[str, str]], int]:
    """n /think samples per problem from `model`; per problem the first that finished, has a
    non-empty think block and a verified answer. Returns {problem index: (reasoning, answer)}
    and the tokens processed (prompts once + generated)."""
    prompts = [chat.prompt_ids(tokenizer, conversation(p, "think"), enable_thinking=True)
               for p in problems]
    samples = sample(model, prompts, n, temperature=sampling.temperature, top_p=sampling.top_p,
                     top_k=sampling.top_k, min_p=sampling.min_p,
                     max_new_tokens=sampling.max_new_tokens, batch_size=batch_size,
                     generator=torch.Generator().manual_seed(seed), **token_kwargs(tokenizer))
    verified: dict[int, tuple[str, str]] = {}
    for i, text, done in zip(samples.prompt_index, samples.texts(tokenizer), samples.finished):
        if i in verified or not done:
            continue
        reasoning, answer = chat.split_response(text)
        if reasoning and answer and _grades(task, problems[i], answer):
            verified[i] = (reasoning, answer)
    return verified, sum(map(len, prompts)) + sum(samples.lengths())


def fusion_examples(tokenizer, problems: Sequence[Problem], verified: dict[int, tuple[str, str]],
                    *, n_examples: int, think_ratio: float, multi_turn_ratio: float, max_len: int,
                    seed: int) -> tuple[list[dict], dict[str, int]]:
    """`n_examples` SFT examples, each drawn independently: /think with probability
    `think_ratio` (a verified stage-2 sample: its reasoning in the think block), else /no_think
    (the gold answer after an empty think block); with probability `multi_turn_ratio` asked as
    the second turn after a problem under the other flag. Every prompt uses the default
    (thinking) generation prompt, so the flag alone decides whether the block gets content."""
    check_ratios("fusion", think_ratio=think_ratio, multi_turn_ratio=multi_turn_ratio)
    think_pool = sorted(verified)
    if think_ratio > 0 and not think_pool:
        # a weak stage-2 model is a result to report, not a reason to lose the run's other arm
        log.warning("fusion: the stage-2 model solved none of %d queries in /think mode, so the "
                    "mix has no thinking data (every example is /no_think); raise "
                    "fusion.n_prompts or fusion.samples_per_prompt, or train the earlier stages "
                    "longer", len(problems))
        think_ratio = 0.0
    rng = random.Random(f"fusion/{seed}")
    counts = {"think": 0, "no_think": 0, "multi_turn": 0, "verified_prompts": len(think_pool)}
    examples = []
    for _ in range(n_examples):
        mode = "think" if rng.random() < think_ratio else "no_think"
        if mode == "think":
            i = rng.choice(think_pool)
            reasoning, answer = verified[i]
        else:
            i = rng.randrange(len(problems))
            reasoning, answer = None, problems[i].answer
        earlier = problems[rng.randrange(len(problems))] if rng.random() < multi_turn_ratio \
            else None
        messages = conversation(problems[i], mode, earlier)
        examples.append(chat.sft_example(tokenizer, messages, reasoning, answer, thinking=True,
                                         max_len=max_len))
        counts[mode] += 1
        counts["multi_turn"] += earlier is not None
    return examples, counts


# ============================================================================ stage builders

def _sft_train(ctx: StageContext, model, tokenizer, examples, stage_cfg, cfg):
    data = SFTData(examples, stage_cfg.batch_size, cfg.seed, tokenizer.pad_token_id,
                   stage_cfg.grad_accum)
    model.train()
    return train(model, data.micro_step, stage=ctx.name, steps=stage_cfg.steps, lr=stage_cfg.lr,
                 warmup_ratio=stage_cfg.warmup_ratio, grad_accum=stage_cfg.grad_accum,
                 trainer_cfg=cfg.trainer, work_dir=ctx.work, metrics=ctx.metrics)


def _inputs(card, task_cfg, stage_cfg, cfg, **extra) -> dict:
    return {"card": card_inputs(card), "task": OmegaConf.to_container(task_cfg, resolve=True),
            "stage": _container(stage_cfg), "seed": cfg.seed, **extra}


def cold_start_stage(name: str, card, task_cfg, *, base: str, stage_cfg, cfg,
                     arm: str = "four_stage") -> Stage:
    """Stage 1: SFT of `base`'s model on the filtered cold-start set (`filter_cold_start`),
    each kept solution rendered once per mode in `stage_cfg.modes` order (alternating)."""
    inputs = _inputs(card, task_cfg, stage_cfg, cfg, source=_cold_start_source_inputs(stage_cfg))

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        task = build_task(task_cfg)
        kept, counts = filter_cold_start(
            task, cold_start_candidates(task, stage_cfg), task.problems("test"),
            max_line_repeats=stage_cfg.max_line_repeats, ngram=stage_cfg.dedup_ngram,
            threshold=stage_cfg.dedup_threshold)
        if not kept:
            raise ConfigError(f"cold start: every one of {stage_cfg.n_examples} candidates was "
                              f"filtered out ({counts}); check the source or the filters")
        examples = sft_examples(tokenizer, kept, modes=tuple(stage_cfg.modes),
                                max_len=stage_cfg.max_len)
        model = load_model(ctx.upstream[base], card, device=cfg.trainer.device, dtype="float32")
        result = _sft_train(ctx, model, tokenizer, examples, stage_cfg, cfg)
        save_model(model, tokenizer, ctx.out)
        return StageCost(tokens=result.tokens,
                         flops=train_flops(_active_params(card), result.tokens),
                         notes={"steps": result.steps, "resumed_from": result.resumed_from,
                                "filter": counts})

    return Stage(name=name, kind="model", inputs=inputs, build=build, needs=[base], arm=arm,
                 distributed=True)


def _rl_stage(name: str, card, task_cfg, *, base: str, stage_cfg, cfg, skip: int, arm: str,
              general: bool) -> Stage:
    check_grpo_config(stage_cfg)
    if general:
        check_ratios("general_rl", multi_turn_ratio=stage_cfg.multi_turn_ratio)
    inputs = _inputs(card, task_cfg, stage_cfg, cfg, skip=skip, general=general)

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        task = build_task(task_cfg)
        pool = rl_pool(task, skip, stage_cfg.n_prompts)
        model = load_model(ctx.upstream[base], card, device=cfg.trainer.device, dtype="float32")
        ref = None
        if stage_cfg.kl_coef > 0:  # the frozen starting point
            ref = load_model(ctx.upstream[base], card, device=cfg.trainer.device,
                             dtype="float32").requires_grad_(False)
        if general:
            reward = general_reward(task, task_cfg.kind, stage_cfg)
            trainer = GRPOTrainer(tokenizer=tokenizer, pool=pool, stage_cfg=stage_cfg,
                                  reward=reward, seed=cfg.seed, soft_switch=True,
                                  multi_turn_ratio=stage_cfg.multi_turn_ratio, ref_model=ref)
        else:
            trainer = GRPOTrainer(tokenizer=tokenizer, pool=pool, stage_cfg=stage_cfg,
                                  reward=reasoning_reward(task), seed=cfg.seed, soft_switch=False,
                                  ref_model=ref)
        model.train()
        result = train(model, trainer.micro_step, stage=ctx.name, steps=stage_cfg.steps,
                       lr=stage_cfg.lr, warmup_ratio=stage_cfg.warmup_ratio,
                       grad_accum=stage_cfg.grad_accum, trainer_cfg=cfg.trainer,
                       work_dir=ctx.work, metrics=ctx.metrics, extra_state=trainer)
        save_model(model, tokenizer, ctx.out)
        n = _active_params(card)
        forward_tokens = trainer.sampled_tokens + trainer.scored_tokens
        return StageCost(
            tokens=result.tokens + forward_tokens,
            flops=train_flops(n, result.tokens) + forward_flops(n, forward_tokens),
            notes={"steps": result.steps, "resumed_from": result.resumed_from,
                   "trained_tokens": result.tokens, "sampled_tokens": trainer.sampled_tokens,
                   "scored_tokens": trainer.scored_tokens,
                   "entropy_coef": trainer.controller.coef})

    return Stage(name=name, kind="model", inputs=inputs, build=build, needs=[base], arm=arm,
                 distributed=True)


def grpo_stage(name: str, card, task_cfg, *, base: str, stage_cfg, cfg, skip: int = 0,
               arm: str = "four_stage") -> Stage:
    """Stage 2, reasoning RL: GRPO with the verifier's reward on queries after the first `skip`
    of the train split, prompts rendered per flag as evaluation renders them."""
    return _rl_stage(name, card, task_cfg, base=base, stage_cfg=stage_cfg, cfg=cfg, skip=skip,
                     arm=arm, general=False)


def general_rl_stage(name: str, card, task_cfg, *, base: str, stage_cfg, cfg, skip: int = 0,
                     arm: str = "four_stage") -> Stage:
    """Stage 4, general RL: GRPO on the weighted rule rewards, both flags, the soft switch
    (the model must honour /no_think itself), some queries as the second turn of a chat."""
    return _rl_stage(name, card, task_cfg, base=base, stage_cfg=stage_cfg, cfg=cfg, skip=skip,
                     arm=arm, general=True)


def fusion_stage(name: str, card, task_cfg, *, base: str, stage_cfg, cfg, skip: int = 0,
                 arm: str = "four_stage") -> Stage:
    """Stage 3, thinking-mode fusion: rejection-sample /think solutions from `base` (the
    stage-2 model) on `n_prompts` queries, mix them with /no_think answers (`fusion_examples`)
    and continue SFT of the same model on the mix."""
    check_ratios("fusion", think_ratio=stage_cfg.think_ratio,
                 multi_turn_ratio=stage_cfg.multi_turn_ratio)
    inputs = _inputs(card, task_cfg, stage_cfg, cfg, skip=skip)

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        task = build_task(task_cfg)
        problems = rl_pool(task, skip, stage_cfg.n_prompts)
        model = load_model(ctx.upstream[base], card, device=cfg.trainer.device, dtype="float32")
        verified, sampled = {}, 0
        if current_rank().main:  # rank 0 samples; every rank trains on the same mix
            verified, sampled = rejection_sample(
                model, tokenizer, task, problems, n=stage_cfg.samples_per_prompt,
                sampling=stage_cfg.sampling, batch_size=stage_cfg.sample_batch_size,
                seed=cfg.seed)
        verified, sampled = broadcast((verified, sampled))
        examples, counts = fusion_examples(
            tokenizer, problems, verified, n_examples=stage_cfg.n_examples,
            think_ratio=stage_cfg.think_ratio, multi_turn_ratio=stage_cfg.multi_turn_ratio,
            max_len=stage_cfg.max_len, seed=cfg.seed)
        result = _sft_train(ctx, model, tokenizer, examples, stage_cfg, cfg)
        save_model(model, tokenizer, ctx.out)
        n = _active_params(card)
        return StageCost(tokens=result.tokens + sampled,
                         flops=train_flops(n, result.tokens) + forward_flops(n, sampled),
                         notes={"steps": result.steps, "resumed_from": result.resumed_from,
                                "sampled_tokens": sampled, "mix": counts})

    return Stage(name=name, kind="model", inputs=inputs, build=build, needs=[base], arm=arm,
                 distributed=True)


STAGE_NAMES = ("cold_start", "reasoning_rl", "fusion", "general_rl")


def four_stage_stages(cfg, four_stage_cfg, *, card, base: str, task_cfg=None,
                      prefix: str = "four_stage", arm: str = "four_stage") -> list[Stage]:
    """The four stages after `base` (a model stage's name) on `task_cfg` (default the run's
    task), named `{prefix}/{STAGE_NAMES[i]}`; `cfg` gives the seed and the trainer. RL and
    fusion queries start after the cold start's candidates when both come from the task's train
    split. The teacher bootstrap can chain them too (card=cfg.teacher, prefix="teacher")."""
    fs = four_stage_cfg
    skip = fs.cold_start.n_examples if fs.cold_start.source == "task" else 0
    names = [f"{prefix}/{s}" for s in STAGE_NAMES]
    common = dict(card=card, task_cfg=cfg.task if task_cfg is None else task_cfg, cfg=cfg,
                  arm=arm)
    return [
        cold_start_stage(names[0], base=base, stage_cfg=fs.cold_start, **common),
        grpo_stage(names[1], base=names[0], stage_cfg=fs.reasoning_rl, skip=skip, **common),
        fusion_stage(names[2], base=names[1], stage_cfg=fs.fusion, skip=skip, **common),
        general_rl_stage(names[3], base=names[2], stage_cfg=fs.general_rl, skip=skip, **common),
    ]
