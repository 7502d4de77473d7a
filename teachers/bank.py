"""The teacher bank's backends: who samples the teacher's responses and who scores sequences.

Two verbs (`TeacherBackend`), three backends, picked by `make_backend` from `backend.name`:

* `HFBackend` (`hf`) -- transformers in-process; the default and the one every test runs.
  `generate` is `factory.sampling.sample`. `score` runs batched, right-padded forwards of the
  decoder over sequences of similar length and turns only the scored positions' hidden states
  into logits, ~64 MiB of them at a time, through `teachers.cache.scored_rows`: no [B, T, V]
  logits tensor ever exists, even for one batch.
* `VLLMBackend` (`vllm`) -- an in-process `vllm.LLM` over the model artifact's directory.
* `VLLMServerBackend` (`vllm_server`) -- a running OpenAI-compatible vLLM server
  (`/v1/completions` with token-id prompts), for a teacher on other nodes; stdlib HTTP only.

Score rows (`ScoredRows`) follow the logit cache's convention (teachers/cache.py): top-k ids
sorted by log-prob, or k draws with replacement (`sampled`); log-probs of the full-vocabulary
softmax at temperature 1, never renormalised; the tail log(1 - sum p) over the row's distinct
ids; and the log-prob of the realised token. Row t of sequence i is the distribution of token
`starts[i] + t` given the tokens before it.

The two vLLM backends share everything but the engine call, as pure functions tested on CPU:
request building (`build_generate_request`, `build_score_request`), the thinking-budget
protocol (`generate_in_phases`), and turning what vLLM returns into rows
(`rows_from_prompt_logprobs`, `rows_from_completion_outputs`, `rows_from_completion_choices`).
vLLM is imported only when a `VLLMBackend` is built: importing this module never needs it.

Where the vLLM backends differ from `hf`, because of what vLLM returns:

* vLLM returns the top `prompt_logprobs` entries per position (plus the realised token's), not
  the distribution. The tail is therefore computed from the k kept log-probs,
  log(1 - sum exp(kept)) in fp64: exact up to the fp32 rounding of the returned values (the
  `hf` tail is a log-sum-exp over the other ids, exact however small). Where the kept mass
  rounds to 1 or more, the tail is `LOGPROB_FLOOR` (finite: no NaN reaches a loss).
* `sampled` mode draws from the full distribution, which vLLM does not return: `hf` only.
* Sample log-probs (`Samples.logprobs`) are vLLM's: the raw temperature-1 log-probs of the
  sampled tokens (vLLM v1's default `logprobs_mode`), not the filtered distribution's that
  `factory.sampling` records; the two agree at temperature 1 with no top-k/top-p/min-p filter.
* vLLM cannot force tokens mid-generation, so a thinking budget runs in phases (Qwen3's recipe,
  and `factory.sampling.sample`'s semantics): sample up to the budget; a row still inside its
  think block gets the budget sentence appended (forced, log-prob 0.0) and is resumed from
  prompt + tokens for the rest of `max_new_tokens`.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import torch

from factory.errors import ConfigError, FactoryError
from factory.models import SOURCE, load_model
from factory.sampling import Samples, sample, token_kwargs
from teachers.cache import (
    _LOGIT_CHUNK_ELEMENTS,
    LOGPROB_FLOOR,
    MODES,
    scored_rows,
    tail_from_logprobs,
)

BACKENDS = ("hf", "vllm", "vllm_server")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens")
INSTALL_VLLM = "pip install 'compact-factory[vllm]'"
# Exponential backoff between retries of a transient HTTP failure is capped at this many seconds.
_MAX_BACKOFF_S = 60.0


@dataclass
class ScoredRows:
    """The teacher's distribution at each scored position of one sequence (T rows)."""

    ids_tk: torch.Tensor  # int64 [T, k]: top-k ids (log-prob descending), or k draws ("sampled")
    logprobs_tk: torch.Tensor  # fp32 [T, k]: full-vocabulary log-softmax at T=1, not renormalised
    tail_t: torch.Tensor  # fp32 [T]: log(1 - sum p over the row's distinct ids)
    token_logprob_t: torch.Tensor  # fp32 [T]: log-prob (T=1) of the realised token

    def __len__(self) -> int:
        return self.ids_tk.shape[0]


class TeacherBackend(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: Mapping, *, seed: int,
                 thinking_budget: int | None = None, batch_size: int = 512) -> Samples:
        """n completions per prompt, grouped in prompt order (as `factory.sampling.sample`).
        `sampling` holds exactly SAMPLING_KEYS."""
        ...

    def score(self, sequences: list[list[int]], starts: list[int], *, k: int, mode: str = "topk",
              seed: int = 0) -> list[ScoredRows]:
        """Rows for tokens sequences[i][starts[i]:], each given all tokens before it."""
        ...


# ----------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------


def _sampling_args(sampling: Mapping) -> dict:
    """The five sampling settings, typed; any key missing or unknown is a config error."""
    keys = set(sampling)
    if keys != set(SAMPLING_KEYS):
        raise ConfigError(
            f"sampling settings need exactly {list(SAMPLING_KEYS)}: missing "
            f"{sorted(set(SAMPLING_KEYS) - keys)}, unknown {sorted(keys - set(SAMPLING_KEYS))}"
        )
    return {
        "temperature": float(sampling["temperature"]),
        "top_p": float(sampling["top_p"]),
        "top_k": int(sampling["top_k"]),
        "min_p": float(sampling["min_p"]),
        "max_new_tokens": int(sampling["max_new_tokens"]),
    }


def _check_score_args(sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int,
                      mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"score mode {mode!r} is not one of {MODES}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(starts) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start <= len(seq):
            raise ValueError(
                f"sequence {i}: start {start} must be in [1, {len(seq)}] (its length): the first "
                f"token has no context to be scored in"
            )


def _empty_rows(k: int) -> ScoredRows:
    return ScoredRows(torch.empty(0, k, dtype=torch.long), torch.empty(0, k), torch.empty(0),
                      torch.empty(0))


def _derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for one random stream (a sequence, a prompt, a resumed row) from the call's
    seed, so a stream's draws do not depend on which other streams share its batch or request."""
    digest = hashlib.sha256(repr((int(seed), *map(int, path))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------
# transformers in-process
# ----------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _rows_from_hidden(hidden_td: torch.Tensor, target_t: torch.Tensor, lm_head, k: int, mode: str,
                      generator: torch.Generator | None) -> ScoredRows:
    """One sequence's rows from the final hidden states at its scored positions (the state at
    position p predicts token p + 1), a chunk of ~64 MiB of fp32 logits at a time."""
    T = hidden_td.shape[0]
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // lm_head.weight.shape[0])
    parts = [scored_rows(lm_head(hidden_td[a:a + rows]), k, mode, generator,
                         target_t[a:a + rows])
             for a in range(0, T, rows)]
    ids_tk, logprobs_tk, tail_t, token_logprob_t = (torch.cat(p) for p in zip(*parts))
    return ScoredRows(ids_tk, logprobs_tk, tail_t, token_logprob_t)


class HFBackend:
    """A transformers causal LM in this process: samples with `factory.sampling.sample`, scores
    with batched forwards (`batch_size` sequences per forward)."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.token_ids = token_kwargs(tokenizer)

    def generate(self, prompts: list[list[int]], n: int, sampling: Mapping, *, seed: int,
                 thinking_budget: int | None = None, batch_size: int = 512) -> Samples:
        return sample(self.model, prompts, n, **_sampling_args(sampling),
                      thinking_budget=thinking_budget, batch_size=batch_size,
                      generator=torch.Generator().manual_seed(seed), **self.token_ids)

    def score(self, sequences: list[list[int]], starts: list[int], *, k: int, mode: str = "topk",
              seed: int = 0) -> list[ScoredRows]:
        """Sampled rows draw from a generator per sequence, seeded from (seed, its index), so
        they do not depend on `batch_size` or on which sequences share a batch."""
        _check_score_args(sequences, starts, k, mode)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if mode == "topk" and k > vocab:
            raise ValueError(f"k={k} is more than the teacher's vocabulary ({vocab})")
        out: list[ScoredRows | None] = [None] * len(sequences)
        todo = []
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            if start == len(seq):
                out[i] = _empty_rows(k)
            else:
                todo.append(i)
        # longest first: a batch holds sequences of similar length, so little padding is computed
        todo.sort(key=lambda i: -len(sequences[i]))
        with _eval_mode(self.model), torch.inference_mode():
            for a in range(0, len(todo), self.batch_size):
                batch = todo[a:a + self.batch_size]
                rows = self._score_batch(sequences, starts, batch, k, mode, seed)
                for i, r in zip(batch, rows):
                    out[i] = r
        return out

    def _score_batch(self, sequences, starts, batch: list[int], k: int, mode: str,
                     seed: int) -> list[ScoredRows]:
        device = next(self.model.parameters()).device
        inputs = [sequences[i][:-1] for i in batch]  # the last token predicts nothing scored
        width = max(len(ids) for ids in inputs)
        ids_bt = torch.full((len(batch), width), self.token_ids["pad_id"], dtype=torch.long)
        mask_bt = torch.zeros((len(batch), width), dtype=torch.long)
        for b, ids in enumerate(inputs):
            ids_bt[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask_bt[b, :len(ids)] = 1
        # right padding: under causal attention no real position sees the pads after it, and
        # positions count from 0 as in an unpadded forward
        hidden_btd = self.model.get_decoder()(
            input_ids=ids_bt.to(device), attention_mask=mask_bt.to(device), use_cache=False
        ).last_hidden_state
        lm_head = self.model.get_output_embeddings()
        out = []
        for b, i in enumerate(batch):
            seq, start = sequences[i], starts[i]
            target_t = torch.tensor(seq[start:], dtype=torch.long, device=device)
            generator = None
            if mode == "sampled":
                generator = torch.Generator(device=device).manual_seed(_derive_seed(seed, i))
            out.append(_rows_from_hidden(hidden_btd[b, start - 1:len(seq) - 1], target_t, lm_head,
                                         k, mode, generator))
        return out


# ----------------------------------------------------------------------------------------------
# vLLM, shared: requests, the thinking-budget phases, log-probs -> rows
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    """One engine request: `n` completions of `prompt`, at most `max_tokens` each, drawn with
    `seed`."""

    prompt: list[int]
    n: int
    max_tokens: int
    seed: int


class Completion(NamedTuple):
    tokens: list[int]  # including the stop token when one was hit
    logprobs: list[float]  # per token
    finished: bool  # True: ended at a stop token; False: ran into max_tokens


def build_generate_request(request: CompletionRequest, sampling: Mapping,
                           stop_ids: Sequence[int]) -> dict:
    """vLLM's sampling fields for one generate request: `SamplingParams` keyword arguments, and
    the same fields of an OpenAI-compatible `/v1/completions` body."""
    s = _sampling_args(sampling)
    return {
        "n": request.n,
        "temperature": s["temperature"],
        "top_p": s["top_p"],
        "top_k": s["top_k"] if s["top_k"] > 0 else -1,  # -1 switches top-k off in every version
        "min_p": s["min_p"],
        "max_tokens": request.max_tokens,
        "seed": request.seed,
        "logprobs": 1,  # the sampled token's log-prob (and the top-1)
        "stop_token_ids": list(stop_ids),  # Qwen3 stops at <|im_end|> and <|endoftext|>
    }


def build_score_request(k: int) -> dict:
    """vLLM's fields for scoring a sequence sent as the prompt: the top-k log-probs at every
    prompt position (the realised token's added when outside them), one throwaway sampled token.

    Temperature 1 and no filters: vLLM v1 computes prompt log-probs from the raw logits anyway,
    but the V0 engine applied the request's temperature and filters first."""
    return {"max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
            "min_p": 0.0}


def _logprob_value(entry: Any) -> float:
    """The log-prob of one vLLM log-prob entry: a `Logprob` (`.logprob`), its JSON form (a dict
    with "logprob"), or a bare number."""
    if hasattr(entry, "logprob"):
        return float(entry.logprob)
    if isinstance(entry, Mapping):
        return float(entry["logprob"])
    return float(entry)


def rows_from_prompt_logprobs(position_dicts: Sequence[Mapping | None], sequence: Sequence[int],
                              start: int, k: int) -> ScoredRows:
    """ScoredRows (mode topk) from vLLM's prompt log-probs of one sequence.

    `position_dicts[p]` maps token id (an int, or its string in the server's JSON) to a log-prob
    entry for the distribution of sequence[p]; position 0 is None (no context). vLLM returns the
    top-k entries plus the realised token's when it is not among them (k + 1 entries). Kept: the
    k largest, sorted descending. Tail: log(1 - sum exp(kept)) from those k log-probs alone
    (vLLM does not return the full distribution), `LOGPROB_FLOOR` where the kept mass rounds
    to 1. The realised token's log-prob comes from its own entry.
    """
    if len(position_dicts) != len(sequence):
        raise FactoryError(f"vLLM returned prompt log-probs for {len(position_dicts)} positions of "
                           f"a {len(sequence)}-token sequence")
    if not 1 <= start <= len(sequence):
        raise ValueError(f"start {start} must be in [1, {len(sequence)}]")
    T = len(sequence) - start
    if T == 0:
        return _empty_rows(k)
    ids_rows, lp_rows, realised = [], [], []
    for p in range(start, len(sequence)):
        entries = position_dicts[p]
        if entries is None:
            raise FactoryError(f"vLLM returned no prompt log-probs at position {p}")
        if len(entries) < k:
            raise FactoryError(
                f"vLLM returned {len(entries)} log-probs at position {p}, fewer than k={k}: raise "
                f"the engine's max_logprobs (backend.max_logprobs, or the server's --max-logprobs)"
            )
        by_id = {int(tid): _logprob_value(v) for tid, v in entries.items()}
        if sequence[p] not in by_id:
            raise FactoryError(f"vLLM's prompt log-probs at position {p} lack the realised token "
                               f"{sequence[p]}: the response does not belong to this sequence")
        realised.append(by_id[sequence[p]])
        ids_rows.append(list(by_id))
        lp_rows.append(list(by_id.values()))
    width = max(len(r) for r in ids_rows)
    ids_tm = torch.tensor([r + [-1] * (width - len(r)) for r in ids_rows], dtype=torch.long)
    lp_tm = torch.tensor([r + [float("-inf")] * (width - len(r)) for r in lp_rows])
    logprobs_tk, order_tk = lp_tm.topk(k, dim=-1, sorted=True)
    ids_tk = ids_tm.gather(-1, order_tk)
    tail_t = tail_from_logprobs(ids_tk, logprobs_tk).clamp_min(LOGPROB_FLOOR)
    return ScoredRows(ids_tk, logprobs_tk, tail_t, torch.tensor(realised, dtype=torch.float32))


def rows_from_completion_outputs(outputs: Sequence) -> list[Completion]:
    """The completions of one vLLM `RequestOutput` (its `.outputs`: `token_ids`, `logprobs` (a
    {token id: Logprob} per token), `finish_reason`, `index`), in index order."""
    rows = []
    for out in sorted(outputs, key=lambda o: o.index):
        tokens = list(out.token_ids)
        if out.logprobs is None or len(out.logprobs) != len(tokens):
            raise FactoryError("vLLM returned a completion without a log-prob per token")
        logprobs = [_logprob_value(entries[tok]) for entries, tok in zip(out.logprobs, tokens)]
        rows.append(Completion(tokens, logprobs, out.finish_reason == "stop"))
    return rows


def _token_id(token: str) -> int:
    prefix = "token_id:"
    if not token.startswith(prefix):
        raise FactoryError(f"the server returned the token {token!r}, not 'token_id:<id>': it "
                           f"ignored return_tokens_as_token_ids (vLLM too old?)")
    return int(token[len(prefix):])


def rows_from_completion_choices(choices: Sequence[Mapping]) -> list[Completion]:
    """The completions of one `/v1/completions` response (asked with logprobs=1 and
    return_tokens_as_token_ids, so `logprobs.tokens` are "token_id:<id>"), in index order."""
    rows = []
    for choice in sorted(choices, key=lambda c: c["index"]):
        lp = choice["logprobs"]
        if lp is None:
            raise FactoryError("the server returned a completion without log-probs")
        tokens = [_token_id(t) for t in lp["tokens"]]
        logprobs = [float(x) for x in lp["token_logprobs"]]
        rows.append(Completion(tokens, logprobs, choice["finish_reason"] == "stop"))
    return rows


def _prompt_closed(prompt: Sequence[int], think_open_id: int, think_close_id: int) -> bool:
    """Whether the prompt's last think marker is `</think>` (the /no_think generation prompt
    ends with an empty think block): such a prompt's rows are never forced."""
    for tok in reversed(prompt):
        if tok == think_close_id:
            return True
        if tok == think_open_id:
            return False
    return False


def _complete_all(complete, requests: list[CompletionRequest]) -> list[list[Completion]]:
    """`complete` on the requests that may produce a token (vLLM refuses max_tokens=0)."""
    live = [r for r in requests if r.max_tokens > 0]
    results = iter(complete(live) if live else [])
    out = []
    for r in requests:
        rows = next(results) if r.max_tokens > 0 else [Completion([], [], False)] * r.n
        if len(rows) != r.n:
            raise FactoryError(f"the engine returned {len(rows)} completions for a request of "
                               f"{r.n}")
        out.append(rows)
    return out


def generate_in_phases(complete: Callable[[list[CompletionRequest]], list[list[Completion]]],
                       prompts: list[list[int]], n: int, max_new_tokens: int, *, seed: int,
                       thinking_budget: int | None, token_ids: Mapping) -> Samples:
    """`factory.sampling.sample`'s thinking budget on an engine that cannot force tokens.

    Phase 1 samples every prompt's n rows, rows of a prompt still inside a think block capped at
    `thinking_budget` tokens. Phase 2 resumes each capped row that neither stopped nor reached
    `max_new_tokens`: if it has not closed its think block (no `</think>` yet), the budget
    sentence is appended first (forced, log-prob 0.0), then it continues from prompt + tokens
    for what is left of `max_new_tokens`. `complete` runs a list of requests and returns each
    one's n completions; `token_ids` is `factory.sampling.token_kwargs(tokenizer)`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (render it with the chat template)")
    if thinking_budget is not None and thinking_budget < 0:
        raise ValueError(f"thinking_budget must be >= 0 or None, got {thinking_budget}")
    open_id, close_id = token_ids["think_open_id"], token_ids["think_close_id"]
    budgeted = [thinking_budget is not None and not _prompt_closed(p, open_id, close_id)
                for p in prompts]
    first = [CompletionRequest(list(p), n, min(thinking_budget, max_new_tokens) if b
                               else max_new_tokens, _derive_seed(seed, i))
             for i, (p, b) in enumerate(zip(prompts, budgeted))]
    rows = []  # [prompt index, tokens, logprobs, forced, finished]
    resume = []  # (row index, request)
    for i, (req, completions) in enumerate(zip(first, _complete_all(complete, first))):
        for j, c in enumerate(completions):
            tokens, logprobs, forced = list(c.tokens), list(c.logprobs), [False] * len(c.tokens)
            rows.append([i, tokens, logprobs, forced, c.finished])
            # only a row that ran into the budget cap (not into max_new_tokens) goes on
            capped = req.max_tokens < max_new_tokens and len(tokens) == req.max_tokens
            if not budgeted[i] or c.finished or not capped:
                continue
            if close_id not in tokens:
                budget = list(token_ids["budget_ids"])[: max_new_tokens - len(tokens)]
                tokens += budget
                logprobs += [0.0] * len(budget)
                forced += [True] * len(budget)
            if len(tokens) < max_new_tokens:
                resume.append((len(rows) - 1, CompletionRequest(
                    list(prompts[i]) + tokens, 1, max_new_tokens - len(tokens),
                    _derive_seed(seed, i, j))))
    for (r, _), (c,) in zip(resume, _complete_all(complete, [req for _, req in resume])):
        _, tokens, logprobs, forced, _ = rows[r]
        tokens += c.tokens
        logprobs += c.logprobs
        forced += [False] * len(c.tokens)
        rows[r][4] = c.finished
    return Samples(prompt_index=[r[0] for r in rows], tokens=[r[1] for r in rows],
                   logprobs=[r[2] for r in rows], forced=[r[3] for r in rows],
                   finished=[r[4] for r in rows])


def _check_vllm_score(k: int, mode: str, max_logprobs: int, fix: str) -> None:
    if mode == "sampled":
        raise ConfigError(
            "score mode 'sampled' draws from the teacher's full distribution, which vLLM does not "
            "return (only its top max_logprobs): use backend=hf for cache.mode=sampled"
        )
    if k > max_logprobs:
        raise ConfigError(f"k={k} log-probs per position is more than max_logprobs="
                          f"{max_logprobs}: {fix}")


# ----------------------------------------------------------------------------------------------
# vLLM in-process
# ----------------------------------------------------------------------------------------------


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"backend=vllm needs vLLM, which is not installed here: "
                          f"{INSTALL_VLLM} (on a CUDA machine), or use backend=hf")


class VLLMBackend:
    """An in-process vLLM engine (`vllm.LLM`) over a Hugging Face model directory or hub id.

    `max_logprobs` is the engine's cap on log-probs per position, so it bounds score's k;
    `batch_size` sequences go to the engine per `score` call, which bounds the Python objects
    of prompt log-probs alive at once (vLLM schedules within the call)."""

    def __init__(self, model: str, tokenizer, *, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, gpu_memory_utilization: float = 0.85,
                 max_logprobs: int = 64, dtype: str = "auto", quantization: str | None = None,
                 batch_size: int = 64):
        _require_vllm()
        import vllm
        from vllm.inputs import TokensPrompt

        engine_args = dict(model=str(model), tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization,
                           max_logprobs=max_logprobs, dtype=dtype)
        if enable_expert_parallel:
            engine_args["enable_expert_parallel"] = True
        if quantization is not None:
            engine_args["quantization"] = quantization
        self.llm = vllm.LLM(**engine_args)
        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = TokensPrompt
        self.max_logprobs = max_logprobs
        self.batch_size = batch_size
        self.token_ids = token_kwargs(tokenizer)

    def _run(self, prompts: list[list[int]], params: list[dict]):
        # detokenize=False: only ids are read, and decoding every returned log-prob's token costs
        return self.llm.generate(
            [self._tokens_prompt(prompt_token_ids=p) for p in prompts],
            [self._sampling_params(**p, detokenize=False) for p in params],
            use_tqdm=False,
        )

    def generate(self, prompts: list[list[int]], n: int, sampling: Mapping, *, seed: int,
                 thinking_budget: int | None = None, batch_size: int = 512) -> Samples:
        """`batch_size` is unused: the engine schedules its own batches."""
        stop_ids = self.token_ids["stop_ids"]

        def complete(requests: list[CompletionRequest]) -> list[list[Completion]]:
            outs = self._run([r.prompt for r in requests],
                             [build_generate_request(r, sampling, stop_ids) for r in requests])
            return [rows_from_completion_outputs(o.outputs) for o in outs]

        return generate_in_phases(complete, prompts, n, _sampling_args(sampling)["max_new_tokens"],
                                  seed=seed, thinking_budget=thinking_budget,
                                  token_ids=self.token_ids)

    def score(self, sequences: list[list[int]], starts: list[int], *, k: int, mode: str = "topk",
              seed: int = 0) -> list[ScoredRows]:
        """Top-k rows from the engine's prompt log-probs; `seed` is unused (nothing is drawn)."""
        _check_score_args(sequences, starts, k, mode)
        _check_vllm_score(k, mode, self.max_logprobs, f"set backend.max_logprobs={k}")
        out = []
        params = build_score_request(k)
        for a in range(0, len(sequences), self.batch_size):
            seqs, sts = sequences[a:a + self.batch_size], starts[a:a + self.batch_size]
            outs = self._run(seqs, [params] * len(seqs))
            out += [rows_from_prompt_logprobs(o.prompt_logprobs, seq, start, k)
                    for o, seq, start in zip(outs, seqs, sts)]
        return out


# ----------------------------------------------------------------------------------------------
# vLLM server (OpenAI-compatible HTTP, stdlib only)
# ----------------------------------------------------------------------------------------------


def _http_error_detail(err: urllib.error.HTTPError) -> str:
    """The server's own message for an HTTP error (vLLM answers {"message": ...})."""
    try:
        body = err.read().decode("utf-8", errors="replace")
    except OSError:
        return err.reason or ""
    try:
        return str(json.loads(body).get("message", body))[:500]
    except (ValueError, AttributeError):
        return body[:500]


def request_json(url: str, body: dict | None = None, *, max_retries: int, backoff_s: float,
                 timeout_s: float) -> dict:
    """POST `body` (GET when None) as JSON and return the decoded answer.

    Transient failures -- connection refused or reset, timeouts, HTTP 429 and 5xx (a server
    starting up or overloaded) -- are retried up to `max_retries` times after backoff_s, 2
    backoff_s, 4 backoff_s, ... (at most 60 s); any other HTTP error fails at once with the
    server's message. Raises FactoryError naming the URL and the fix.
    """
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        req = urllib.request.Request(url, data=data, headers=headers,
                                     method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:  # before URLError: it is one
            detail = _http_error_detail(err)
            if err.code == 429 or err.code >= 500:
                last = f"HTTP {err.code}: {detail}"
                continue
            raise FactoryError(
                f"the vLLM server at {url} refused the request (HTTP {err.code}): {detail}. If it "
                f"names max_logprobs, restart the server with --max-logprobs >= the cache's k"
            ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError,
                http.client.HTTPException) as err:
            last = str(getattr(err, "reason", None) or err) or type(err).__name__
            continue
        try:
            return json.loads(payload)
        except ValueError:
            raise FactoryError(f"the server at {url} answered with something that is not JSON: "
                               f"is backend.url a vLLM server's /v1 address?") from None
    raise FactoryError(
        f"the vLLM server at {url} did not answer after {max_retries + 1} attempts (last: "
        f"{last}). Fix: start it (vllm serve <checkpoint> --max-logprobs <k>) or point "
        f"backend.url at a running one (backend.url=http://host:8000/v1); backend.max_retries="
        f"{max_retries} sets how long to wait for it"
    )


class VLLMServerBackend:
    """A running OpenAI-compatible vLLM server at `url` (its /v1 address).

    Each request carries one prompt or sequence; at most `request_batch_size` are in flight at
    once (the server batches concurrent requests itself), each retried on its own. `model` is
    the served model's name; None: the first one the server lists at /models. `max_logprobs`
    mirrors the server's --max-logprobs, so a too-large k fails before any request."""

    def __init__(self, url: str, tokenizer, *, model: str | None = None, max_logprobs: int = 64,
                 request_batch_size: int = 64, max_retries: int = 5, backoff_s: float = 1.0,
                 timeout_s: float = 600.0):
        if request_batch_size < 1:
            raise ValueError(f"request_batch_size must be >= 1, got {request_batch_size}")
        self.url = url.rstrip("/")
        self.model = model
        self.max_logprobs = max_logprobs
        self.request_batch_size = request_batch_size
        self.retry = dict(max_retries=max_retries, backoff_s=backoff_s, timeout_s=timeout_s)
        self.token_ids = token_kwargs(tokenizer)

    def _model_name(self) -> str:
        if self.model is None:
            listing = request_json(f"{self.url}/models", **self.retry)
            try:
                self.model = listing["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise FactoryError(f"the server at {self.url}/models lists no model: is "
                                   f"backend.url a vLLM server's /v1 address?") from None
        return self.model

    def _post(self, body: dict) -> dict:
        return request_json(f"{self.url}/completions", {"model": self._model_name(), **body},
                            **self.retry)

    def _map(self, fn, items: list) -> list:
        """fn over items with at most request_batch_size calls in flight, results in order."""
        if not items:
            return []
        self._model_name()  # once, before the threads
        with ThreadPoolExecutor(max_workers=min(self.request_batch_size, len(items))) as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def generate(self, prompts: list[list[int]], n: int, sampling: Mapping, *, seed: int,
                 thinking_budget: int | None = None, batch_size: int = 512) -> Samples:
        """`batch_size` is unused: `request_batch_size` bounds the requests in flight."""
        stop_ids = self.token_ids["stop_ids"]

        def one(request: CompletionRequest) -> list[Completion]:
            body = {"prompt": request.prompt, **build_generate_request(request, sampling, stop_ids),
                    "return_tokens_as_token_ids": True}
            return rows_from_completion_choices(self._post(body)["choices"])

        return generate_in_phases(lambda requests: self._map(one, requests), prompts, n,
                                  _sampling_args(sampling)["max_new_tokens"], seed=seed,
                                  thinking_budget=thinking_budget, token_ids=self.token_ids)

    def score(self, sequences: list[list[int]], starts: list[int], *, k: int, mode: str = "topk",
              seed: int = 0) -> list[ScoredRows]:
        """Top-k rows from the server's prompt log-probs (a vLLM extension of the completions
        API, keyed by token id; `echo`'s OpenAI log-probs are keyed by decoded text, which does
        not map back to ids). `seed` is unused (nothing is drawn)."""
        _check_score_args(sequences, starts, k, mode)
        _check_vllm_score(k, mode, self.max_logprobs,
                          f"restart the server with --max-logprobs {k} and set "
                          f"backend.max_logprobs={k}")
        params = build_score_request(k)

        def one(i: int) -> ScoredRows:
            if starts[i] == len(sequences[i]):
                return _empty_rows(k)
            choices = self._post({"prompt": sequences[i], **params})["choices"]
            return rows_from_prompt_logprobs(choices[0]["prompt_logprobs"], sequences[i],
                                             starts[i], k)

        return self._map(one, list(range(len(sequences))))


# ----------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------


def _vllm_quantization(card) -> str | None:
    if card.quantization is None:
        return None
    if card.quantization == "4bit":
        return "bitsandbytes"  # vLLM's in-flight bitsandbytes quantization is 4-bit
    raise ConfigError(
        f"teacher.quantization={card.quantization!r}: vLLM quantizes in flight to 4 bits only "
        f"(bitsandbytes). Use teacher.quantization=4bit, a pre-quantized checkpoint, or "
        f"backend=hf"
    )


def make_backend(backend_cfg, card, model_artifact, tokenizer, *, device: str = "cpu",
                 batch_size: int = 64) -> TeacherBackend:
    """The backend `backend_cfg.name` names, over the teacher of `card` stored as
    `model_artifact` (a model artifact: a Hugging Face directory, or a source.json naming
    published weights). `device` and `batch_size` (sequences per scoring forward or engine
    call) apply to in-process backends. A missing optional dependency fails here, not later."""
    name = backend_cfg.name
    if name == "hf":
        return HFBackend(load_model(model_artifact, card, device=device), tokenizer,
                         batch_size=batch_size)
    if name == "vllm":
        _require_vllm()
        published = (model_artifact.path / SOURCE).exists()
        return VLLMBackend(
            str(card.pretrained) if published else str(model_artifact.path), tokenizer,
            tensor_parallel_size=card.tensor_parallel,
            enable_expert_parallel=card.expert_parallel > 1,
            gpu_memory_utilization=backend_cfg.gpu_memory_utilization,
            max_logprobs=backend_cfg.max_logprobs, dtype=card.dtype,
            quantization=_vllm_quantization(card), batch_size=batch_size,
        )
    if name == "vllm_server":
        if not backend_cfg.url:
            raise ConfigError("backend=vllm_server needs the server's address: "
                              "backend.url=http://host:8000/v1")
        return VLLMServerBackend(backend_cfg.url, tokenizer, max_logprobs=backend_cfg.max_logprobs,
                                 request_batch_size=backend_cfg.request_batch_size,
                                 max_retries=backend_cfg.max_retries)
    raise ConfigError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
