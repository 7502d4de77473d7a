"""The one sampler: n completions per prompt from a Hugging Face causal LM, with a KV cache.

GRPO, on-policy distillation, the teacher bank (hf backend) and evaluation all call `sample`.
It is a hand-written decode loop rather than `model.generate` because it needs three things
`generate` does not give together: the prompt is prefilled once and its cache shared by its n
samples, rows leave the batch as soon as they stop (the batch shrinks instead of padding to the
longest row), and the thinking budget of the Qwen3 report (REFERENCE.md) is a per-row queue of
forced tokens.

The loop, for each wave of at most `batch_size` rows (whole groups of one prompt's samples):
  1. left-pad the wave's unique prompts, prefill them once (positions count real tokens only);
  2. gather the cache rows so each prompt's row appears once per sample (n per prompt);
  3. per step: filter and sample every row at once (no Python loop over rows), apply forced
     tokens, record, and drop finished rows from the cache when enough have finished.

Log-prob convention: `Samples.logprobs[i][t]` is the log-probability of the token sampled at
step t under the distribution it was actually drawn from, i.e. log-softmax of
logits / temperature after the top-k, top-p and min-p filters (filtered tokens get probability 0
and the rest are renormalised). At temperature 1 with no filtering (top_k=0, top_p=1, min_p=0)
that is the model's own log-prob, which is what on-policy distillation and GRPO's importance
ratios want. Greedy decoding (temperature 0) draws from a point mass: log-prob 0.0. Forced
tokens (thinking budget) were not sampled: log-prob 0.0 and `forced` True.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# The Qwen3 report's thinking-budget sentence (REFERENCE.md, section 4), force-fed verbatim.
THINKING_BUDGET_TEXT = (
    "Considering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>.\n\n"
)

# Once this share of a batch's rows has finished, the cache is compacted to the live rows.
# Compacting copies every layer's cache; keeping dead rows costs their share of each forward.
_COMPACT_FRACTION = 1 / 8


@dataclass
class Samples:
    """Completions, n per prompt, grouped in prompt order: rows [i*n, (i+1)*n) are prompt i's."""

    prompt_index: list[int]  # which prompt each row came from
    tokens: list[list[int]]  # completion ids, including the stop token when one was hit
    logprobs: list[list[float]]  # per token; see the module docstring for the convention
    forced: list[list[bool]]  # True where the token was force-fed (thinking budget)
    finished: list[bool]  # True: ended with a stop id; False: ran into max_new_tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def texts(
        self, tokenizer, *, include_stop: bool = False, skip_special_tokens: bool = False
    ) -> list[str]:
        """Decoded completions; the final stop token of a finished row is left out unless asked."""
        out = []
        for ids, done in zip(self.tokens, self.finished):
            if done and not include_stop:
                ids = ids[:-1]
            out.append(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))
        return out

    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


def token_kwargs(tokenizer) -> dict:
    """The token ids `sample` needs, from a Qwen3-style tokenizer (a real one or the tiny one).

    Stops at `<|im_end|>` (the eos) and `<|endoftext|>`, as Qwen3's generation_config does;
    pads with the tokenizer's pad id; the budget ids are THINKING_BUDGET_TEXT tokenized.
    """
    from factory import chat

    def one_id(token: str) -> int:
        ids = tokenizer.convert_tokens_to_ids([token])
        if ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token!r} token: not a Qwen3-style tokenizer")
        return ids[0]

    stop_ids = sorted({one_id(t) for t in chat.END_TOKENS} | {tokenizer.eos_token_id})
    return {
        "stop_ids": stop_ids,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
        "think_open_id": one_id(chat.THINK_OPEN),
        "think_close_id": one_id(chat.THINK_CLOSE),
        "budget_ids": chat.encode(tokenizer, THINKING_BUDGET_TEXT),
    }


def filter_logits(
    logits_bv: torch.Tensor, *, temperature: float, top_k: int, top_p: float, min_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then top-k, top-p, min-p (the order of HF's warpers), on a batch at once.

    Returns `(scores_bc, ids_bc)`: filtered, temperature-scaled logits over C candidates per row
    (removed candidates are -inf) and the vocabulary ids of those candidates, or None when the
    candidates are the whole vocabulary in order. With top-k the work happens on the k
    candidates only (torch.topk returns them sorted), so a 151k vocabulary is never sorted.
    Top-k keeps exactly k tokens (ties at the k-th value are broken by torch.topk).
    """
    scores = logits_bv.float() / temperature  # fp32: bf16 logits lose the tail of the softmax
    vocab = scores.shape[-1]
    ids = None
    if 0 < top_k < vocab:
        scores, ids = scores.topk(top_k, dim=-1)  # sorted descending
    elif top_p < 1.0:
        scores, ids = scores.sort(dim=-1, descending=True)
    if top_p < 1.0:
        # keep the smallest prefix (sorted descending) whose mass reaches top_p: a token is
        # dropped when the mass strictly before it already reaches top_p; the first always stays
        probs = scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop = mass_before >= top_p
        drop[..., 0] = False
        scores = scores.masked_fill(drop, -math.inf)
    if min_p > 0.0:
        probs = scores.softmax(-1)
        drop = probs < min_p * probs.amax(-1, keepdim=True)
        scores = scores.masked_fill(drop, -math.inf)
    return scores, ids


def _next_tokens(
    logits_bv: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under the filtered distribution (both shape [B])."""
    if temperature == 0.0:
        tokens_b = logits_bv.argmax(-1)
        return tokens_b, torch.zeros(tokens_b.shape, dtype=torch.float32, device=tokens_b.device)
    scores_bc, ids_bc = filter_logits(
        logits_bv, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
    )
    logp_bc = scores_bc.log_softmax(-1)
    # Gumbel-max: argmax(log p - log E), E ~ Exp(1), draws from p with no host sync (vLLM's way).
    # E = -log U, U ~ U[0, 1): on CPU exponential_ is a scalar loop, 5x slower than uniform_ +
    # log (39 vs 8 ms per token for 8 rows of a 151,936-token vocabulary, measured here)
    noise_bc = torch.empty_like(logp_bc).uniform_(generator=generator).log_().neg_()
    choice_b = (logp_bc - noise_bc.log_()).argmax(-1)
    logprob_b = logp_bc.gather(-1, choice_b[:, None]).squeeze(-1)
    tokens_b = choice_b if ids_bc is None else ids_bc.gather(-1, choice_b[:, None]).squeeze(-1)
    return tokens_b, logprob_b


def _plan_waves(order: list[int], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Pack (prompt, count) pieces into waves of <= batch_size rows, each prompt's rows together."""
    pieces = []
    for p in order:
        left = n
        while left > 0:
            take = min(left, batch_size)
            pieces.append((p, take))
            left -= take
    waves, current, rows = [], [], 0
    for p, take in pieces:
        if current and rows + take > batch_size:
            waves.append(current)
            current, rows = [], 0
        current.append((p, take))
        rows += take
    if current:
        waves.append(current)
    return waves


def _cache_kwarg(model) -> str:
    """transformers 5 calls the cache argument `cache`; earlier versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that appends into a buffer with spare room instead of `torch.cat`.

    DynamicLayer concatenates its [B, H, L, D] keys and values with every new token, copying the
    whole cache per step (O(L^2) traffic; 40% of the tiny student's decode time on CPU). This
    layer writes into a buffer grown by doubling, up to `max_len`, and hands attention a view.
    """

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0
        self.buf_keys = self.buf_values = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
        end = self.length + key_states.shape[-2]
        if self.buf_keys is None or end > self.buf_keys.shape[-2]:
            self._grow(max(end, min(self.max_len, 2 * end)), key_states, value_states)
        self.buf_keys[:, :, self.length:end] = key_states
        self.buf_values[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _grow(self, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        keys = key_states.new_empty((b, h, capacity, dk))
        values = value_states.new_empty((b, h, capacity, value_states.shape[-1]))
        if self.buf_keys is not None:
            keys[:, :, : self.length] = self.buf_keys[:, :, : self.length]
            values[:, :, : self.length] = self.buf_values[:, :, : self.length]
        self.buf_keys, self.buf_values = keys, values

    def _views(self) -> None:
        self.keys = self.buf_keys[:, :, : self.length]
        self.values = self.buf_values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buf_keys is not None:
            self.buf_keys, self.buf_values = self.buf_keys[indices], self.buf_values[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.buf_keys is not None:
            self.buf_keys = self.buf_keys.repeat_interleave(repeats, dim=0)
            self.buf_values = self.buf_values.repeat_interleave(repeats, dim=0)
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (DynamicLayer's convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if self.buf_keys is not None and tokens_to_remove < 0:
            self.length = max(self.length + tokens_to_remove, 0)
            self._views()

    def reset(self) -> None:
        self.length, self.buf_keys, self.buf_values = 0, None, None
        super().reset()


def _new_cache(model, max_len: int) -> DynamicCache:
    """The model's DynamicCache, its plain full-attention layers swapped for preallocated ones."""
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers: layers are created lazily, keep them
        return DynamicCache()
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_PreallocatedLayer(max_len) for _ in cache.layers]
    return cache


def _device_generator(generator: torch.Generator | None, device: torch.device):
    """A generator on the model's device, seeded from the caller's (so a CPU seed drives CUDA)."""
    if generator is None:
        return generator
    gdev = generator.device
    if gdev == device or (gdev.type == device.type and None in (gdev.index, device.index)):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev).item())
    return torch.Generator(device=device).manual_seed(seed)


def sample(
    model,
    prompts: list[list[int]],
    n: int,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    thinking_budget: int | None = None,
    budget_ids: list[int] | None = None,
    think_open_id: int | None = None,
    think_close_id: int | None = None,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Samples:
    """Sample `n` completions for each prompt (token ids, no padding).

    temperature 0 is greedy. top_k 0, top_p 1 and min_p 0 switch their filters off.
    `batch_size` caps the rows in one forward pass; a prompt's samples share one prefill.
    Thinking budget: a row still thinking after `thinking_budget` generated tokens (it has not
    produced `think_close_id`, and its prompt does not already close the think block, as the
    /no_think generation prompt does) is force-fed `budget_ids` (the tokenized closing sentence
    of REFERENCE.md, ending in `</think>` and the blank line), then samples its answer. Forced
    tokens count toward `max_new_tokens`.
    Deterministic for a given `generator` state, prompts and settings; which rows share a
    forward pass affects the random stream, so a prompt sampled alone and in a batch draw
    different (equally distributed) samples, except under greedy decoding.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (render it with the chat template)")
    if thinking_budget is not None:
        if thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0 or None, got {thinking_budget}")
        if not budget_ids or think_close_id is None:
            raise ValueError(
                "thinking_budget needs budget_ids (the tokenized closing sentence) and "
                "think_close_id"
            )
    device = next(model.parameters()).device
    run = _Decode(
        max_new_tokens=max_new_tokens,
        stop_t=torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device),
        pad_id=pad_id,
        thinking_budget=thinking_budget,
        budget_t=torch.tensor(budget_ids or [pad_id], dtype=torch.long, device=device),
        think_open_id=think_open_id,
        think_close_id=think_close_id,
        filters=dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     generator=_device_generator(generator, device)),
        cache_kw=_cache_kwarg(model),
        device=device,
    )

    # long prompts first: waves hold prompts of similar length, so less padding is computed
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    waves = _plan_waves(order, n, batch_size)
    rows_of = {p: [] for p in range(len(prompts))}  # prompt -> finished rows (in sample order)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * n, desc="sampling", unit="seq")

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for wave in waves:
                for p, row in _run_wave(model, prompts, wave, run, bar):
                    rows_of[p].append(row)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()

    out = Samples([], [], [], [], [])
    for p in range(len(prompts)):
        for tokens, logprobs, forced, finished in rows_of[p]:
            out.prompt_index.append(p)
            out.tokens.append(tokens)
            out.logprobs.append(logprobs)
            out.forced.append(forced)
            out.finished.append(finished)
    return out


@dataclass(frozen=True)
class _Decode:
    """What one `sample` call fixes for all its waves (tensors already on the model's device)."""

    max_new_tokens: int
    stop_t: torch.Tensor
    pad_id: int
    thinking_budget: int | None
    budget_t: torch.Tensor
    think_open_id: int | None
    think_close_id: int | None
    filters: dict  # _next_tokens' keyword arguments
    cache_kw: str
    device: torch.device

    def prompt_closed(self, prompt: list[int]) -> bool:
        """Whether the prompt needs no budget: no budget set, or its last think marker is
        `</think>` (the /no_think generation prompt ends with an empty think block)."""
        if self.thinking_budget is None:
            return True
        for tok in reversed(prompt):
            if tok == self.think_close_id:
                return True
            if tok == self.think_open_id:
                return False
        return False


def _run_wave(model, prompts: list[list[int]], wave: list[tuple[int, int]], run: _Decode, bar):
    """Prefill the wave's prompts once, decode all its rows; yields (prompt, row) in row order.

    Names end in their shapes: p = the wave's unique prompts, l = cache length, b = live batch
    rows (shrinks as rows finish), r = all the wave's rows, t = new tokens, v = vocabulary.
    """
    device, max_new = run.device, run.max_new_tokens
    unique = [p for p, _ in wave]
    counts = torch.tensor([c for _, c in wave], device=device)
    lens = [len(prompts[p]) for p in unique]
    width = max(lens)
    ids_pl = torch.full((len(unique), width), run.pad_id, dtype=torch.long)
    mask_pl = torch.zeros((len(unique), width), dtype=torch.long)
    for i, p in enumerate(unique):
        ids_pl[i, width - lens[i] :] = torch.tensor(prompts[p], dtype=torch.long)
        mask_pl[i, width - lens[i] :] = 1
    ids_pl, mask_pl = ids_pl.to(device), mask_pl.to(device)  # one copy, not one per prompt
    pos_pl = (mask_pl.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0

    cache = _new_cache(model, width + max_new)
    out = model(input_ids=ids_pl, attention_mask=mask_pl, position_ids=pos_pl, use_cache=True,
                logits_to_keep=1, **{run.cache_kw: cache})
    # one row per sample: gather each prompt's cache row `count` times
    expand = torch.repeat_interleave(torch.arange(len(unique), device=device), counts)
    cache.batch_select_indices(expand)
    logits_bv = out.logits[:, -1, :][expand]
    # the wave's whole mask at once (prompt part, then ones); step t passes a view of it
    mask_bl = torch.cat([mask_pl[expand], mask_pl.new_ones((len(expand), max_new))], dim=1)
    next_pos_b = torch.tensor(lens, device=device)[expand]
    closed_b = torch.tensor([run.prompt_closed(prompts[p]) for p in unique], device=device)[expand]
    n_rows = len(expand)
    row_b = torch.arange(n_rows, device=device)  # which wave row each live batch row is
    alive_b = torch.ones(n_rows, dtype=torch.bool, device=device)
    force_b = torch.full((n_rows,), -1, dtype=torch.long, device=device)  # budget queue cursor

    tokens_rt = torch.full((n_rows, max_new), run.pad_id, dtype=torch.long, device=device)
    logprobs_rt = torch.zeros((n_rows, max_new), dtype=torch.float32, device=device)
    forced_rt = torch.zeros((n_rows, max_new), dtype=torch.bool, device=device)
    length_r = torch.full((n_rows,), max_new, dtype=torch.long, device=device)
    finished_r = torch.zeros(n_rows, dtype=torch.bool, device=device)
    n_alive = n_rows

    for t in range(max_new):
        tok_b, lp_b = _next_tokens(logits_bv, **run.filters)
        if run.thinking_budget is not None:
            if t == run.thinking_budget:  # a wave's rows start together: t = tokens so far
                force_b = torch.where(closed_b, force_b, torch.zeros_like(force_b))
            forcing_b = force_b >= 0
            tok_b = torch.where(forcing_b, run.budget_t[force_b.clamp(min=0)], tok_b)
            lp_b = lp_b.masked_fill(forcing_b, 0.0)
            forced_rt[row_b, t] = forcing_b
            force_b = torch.where(forcing_b, force_b + 1, force_b)
            force_b = force_b.masked_fill(force_b >= run.budget_t.numel(), -1)
            closed_b = closed_b | (tok_b == run.think_close_id)
        # finished rows not yet compacted away write here too, past their length: cut at the end
        tokens_rt[row_b, t] = tok_b
        logprobs_rt[row_b, t] = lp_b

        stopped_b = alive_b & torch.isin(tok_b, run.stop_t)
        finished_r[row_b] |= stopped_b
        length_r[row_b] = torch.where(stopped_b, t + 1, length_r[row_b])
        alive_b = alive_b & ~stopped_b
        now_alive = int(alive_b.sum())  # the one host sync per step
        if bar is not None:
            bar.update(n_alive - now_alive)
        n_alive = now_alive
        if n_alive == 0 or t + 1 == max_new:
            break
        if n_alive <= (1 - _COMPACT_FRACTION) * alive_b.numel():
            keep = alive_b.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            tok_b, mask_bl, next_pos_b = tok_b[keep], mask_bl[keep], next_pos_b[keep]
            closed_b, force_b, row_b, alive_b = (
                closed_b[keep], force_b[keep], row_b[keep], alive_b[keep])

        out = model(input_ids=tok_b[:, None], attention_mask=mask_bl[:, : width + t + 1],
                    position_ids=next_pos_b[:, None], use_cache=True, logits_to_keep=1,
                    **{run.cache_kw: cache})
        logits_bv = out.logits[:, -1, :]
        next_pos_b = next_pos_b + 1
    if bar is not None:
        bar.update(n_alive)

    # to the host once; each row sliced to its length before becoming Python lists
    lengths, finished = length_r.tolist(), finished_r.tolist()
    tokens_rt, logprobs_rt, forced_rt = tokens_rt.cpu(), logprobs_rt.cpu(), forced_rt.cpu()
    r = 0
    for p, count in wave:
        for _ in range(count):
            k = lengths[r]
            yield p, (tokens_rt[r, :k].tolist(), logprobs_rt[r, :k].tolist(),
                      forced_rt[r, :k].tolist(), finished[r])
            r += 1
