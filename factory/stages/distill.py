"""Distillation stages: off-policy (the student learns the teacher's cached distributions on the
teacher's own responses) and on-policy (the student samples, the teacher scores those exact
tokens, the student minimises the per-token reverse KL), both through the one training loop.

Inputs (DESIGN.md "Teacher bank", "Logit cache"):

* the off-policy set (stage "teacher/generate", kind "dataset"): ``data/`` saved by
  ``datasets.Dataset.save_to_disk`` with columns ``row`` (the row index, and the sequence id in
  the cache), ``problem_id``, ``mode``, ``prompt_ids`` (the rendered generation prompt),
  ``response_ids`` (the teacher's completion, its stop id included), ``response_text``,
  ``correct``;
* the logit cache (stage "teacher/record", kind "cache"): one row per response token,
  ``teachers.cache.CacheReader`` over the artifact directory;
* for on-policy steps, a teacher backend (``teachers.bank.make_backend``, loaded at the first
  on-policy step) whose ``score`` returns rows in the cache's format for sequences it did not
  write.

Alignment. A sequence is ``prompt + response`` with the prompt of length P. Response token t
(absolute position P + t) is predicted by the student's hidden state at position P + t - 1, and
row t of the sequence's teacher rows (cache or ``score``) is the teacher's distribution for that
same token, given ``prompt + response[:t]``.

The student's [B, L, V] logits are never materialised: the loop's model returns its last hidden
states, and every loss walks the loss tokens through the LM head in chunks
(``factory.losses.fused_sparse_divergence``, ``factory.rl.token_logprobs_and_entropy``).

Normalisation (factory/loop.py): a micro-batch's loss is its sum over loss tokens divided by the
loss-token count of the whole optimizer step on all ranks, times the world size (DDP averages the
ranks' gradients), so micro-batches and shards of different lengths add up to the per-token mean
of the global step. Logged per-token metrics are exact means over the step (each micro-batch
reports its sum times grad_accum x world / step tokens; the loop averages them over micro-batches
and ranks).

Multi-process runs (factory/processes.py): both stages shard. Off-policy, every rank draws the
step's global rows and trains on rows ``rank::world``, so N processes give exactly the update of
one with the same batch_size. On-policy, every rank draws the step's global prompts, samples and
has the teacher score its share ``rank::world`` with its own random stream, and the step's
loss-token count is summed over ranks: the same global batch, but not the same samples as one
process (the streams differ).

Determinism: every random draw is a pure function of (seed, step, micro, rank), and on-policy
samples come from the weights at the start of the step, which a checkpoint restores exactly; so
a killed run that resumes draws the same batches and the same samples as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import torch
from omegaconf import OmegaConf
from torch.utils.checkpoint import checkpoint

from factory import chat
from factory.errors import ArtifactError, ConfigError
from factory.flops import forward_flops, train_flops
from factory.ledger import StageCost
from factory.loop import StepOutput, current_device, current_rank, save_model, train
from factory.processes import all_sum, check_shardable, shard
from factory.losses import KINDS, chunk_rows, fused_sparse_divergence, sampled_forward_kl
from factory.models import load_model
from factory.pipeline import Stage, StageContext
from factory.rl import final_hidden_states, token_logprobs_and_entropy
from factory.sampling import sample, token_kwargs
from factory.stages.lm import step_generator
from factory.stages.models import card_inputs, tokenizer_for
from factory.store import Artifact
from factory.tasks.registry import build_task
from students.builders import count_params
from teachers.bank import ScoredRows, make_backend
from teachers.cache import CacheReader

OFFPOLICY_DATA = "data"  # the off-policy set's datasets.save_to_disk directory in its artifact
ESTIMATORS = ("topk", "sampled_token")
# independent random streams of one optimizer step (step_stream's `stream`)
_COIN, _PROMPTS, _SAMPLES, _SCORES = range(4)


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def step_stream(seed: int, step: int, stream: int, rank: int = 0) -> torch.Generator:
    """A generator for one purpose (`stream`) of one optimizer step on one rank.

    Seeded through numpy's SeedSequence, which hashes the whole tuple: streams never collide with
    each other, across steps, or with `step_generator`'s micro-batch draws.
    """
    state = np.random.SeedSequence([seed, step, stream, rank]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def is_on_policy(seed: int, step: int, gkd_lambda: float) -> bool:
    """Whether optimizer step `step` is on-policy: a uniform draw u from (seed, step) is below
    `gkd_lambda` (GKD's lambda, arXiv 2306.13649). lambda 0: never; 1: always. The same on every
    rank and on a resumed run."""
    u = torch.rand((), generator=step_stream(seed, step, _COIN)).item()
    return u < gkd_lambda


def micro_sizes(total: int, parts: int) -> list[int]:
    """`total` items split into `parts` contiguous micro-batches of sizes differing by at most 1."""
    return [(m + 1) * total // parts - m * total // parts for m in range(parts)]


# ----------------------------------------------------------------------------------------------
# Batches: sequences -> one student forward (packed rows) and the tokens that take loss
# ----------------------------------------------------------------------------------------------


@dataclass
class Packed:
    """Sequences laid into rows for one student forward, and the tokens that take loss (n of them).

    A row holds one right-padded sequence, or several back to back (``pack``). Loss token j is
    ``input_ids_bl[row_n[j], pos_n[j] + 1] == target_n[j]``, predicted by the hidden state at
    ``(row_n[j], pos_n[j])``. ``position_ids_bl`` is set only when some row holds two or more
    sequences: positions restart at 0 at each sequence, and the forward then gets no attention
    mask, from which transformers builds a block-causal one (no sequence sees another).
    """

    input_ids_bl: torch.Tensor
    attention_mask_bl: torch.Tensor  # 1 at real tokens, 0 at the padding that ends a row
    row_n: torch.Tensor
    pos_n: torch.Tensor
    target_n: torch.Tensor
    position_ids_bl: torch.Tensor | None = None

    def to(self, device) -> "Packed":
        return Packed(*(None if (t := getattr(self, f.name)) is None else t.to(device)
                        for f in fields(self)))


def pack(sequences: list[list[int]], starts: list[int], offsets: list[list[int]],
         pad_id: int) -> Packed:
    """Lay `sequences` into right-padded rows and list their loss tokens (in sequence order).

    `offsets[i]` holds the response offsets t of sequence i that take loss: the token
    ``sequences[i][starts[i] + t]``, predicted at position ``starts[i] + t - 1``. Every start must
    be >= 1 (a rendered prompt has at least one token).

    Rows are filled first-fit in order of decreasing length, none longer than the longest
    sequence: the forward never computes a wider row (nor a larger attention block) than plain
    right padding, and sequences of varied lengths (teacher responses, on-policy samples that
    stop early) share rows instead of padding to the longest. When no two sequences fit one row
    this is plain right padding, sequence i in row i with positions 0..len-1.
    """
    for i, start in enumerate(starts):
        if start < 1:
            raise ValueError(f"sequence {i}: the response must follow at least one prompt token")
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    row_of, col_of, fill = [0] * len(sequences), [0] * len(sequences), []
    for i in sorted(range(len(sequences)), key=lambda i: -lengths[i]):  # stable: ties keep order
        r = next((r for r, used in enumerate(fill) if used + lengths[i] <= width), len(fill))
        if r == len(fill):
            fill.append(0)
        row_of[i], col_of[i] = r, fill[r]
        fill[r] += lengths[i]
    packed = len(fill) < len(sequences)
    if not packed:
        row_of, col_of = list(range(len(sequences))), [0] * len(sequences)
    n_rows = len(fill) if packed else len(sequences)
    ids_bl = torch.full((n_rows, width), pad_id, dtype=torch.long)
    mask_bl = torch.zeros_like(ids_bl)
    pos_bl = torch.zeros_like(ids_bl) if packed else None
    rows, positions = [], []
    for i, (seq, start, offs) in enumerate(zip(sequences, starts, offsets)):
        r, a, n = row_of[i], col_of[i], lengths[i]
        ids_bl[r, a:a + n] = torch.tensor(seq, dtype=torch.long)
        mask_bl[r, a:a + n] = 1
        if packed:
            # positions restart per sequence; the row's padding continues its last sequence's
            # count, so it forms no sequence of its own (and, being last, no real token sees it)
            tail = width if a + n == fill[r] else a + n
            pos_bl[r, a:tail] = torch.arange(tail - a)
        rows.extend([r] * len(offs))
        positions.extend(a + start + t - 1 for t in offs)
    row_n = torch.tensor(rows, dtype=torch.long)
    pos_n = torch.tensor(positions, dtype=torch.long)
    return Packed(ids_bl, mask_bl, row_n, pos_n, ids_bl[row_n, pos_n + 1], pos_bl)


def _unwrap(model):
    """The transformers model inside a DDP/FSDP wrapper (the loop's prepared model), or itself."""
    return getattr(model, "module", model)


def response_hidden(model, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's final hidden states at the loss tokens [n, H], and its LM-head weight [V, H]
    (``factory.rl.final_hidden_states``: the forward goes through the prepared model, so a
    DDP/FSDP wrapper and accelerate's autocast see it, and the head computes one position per
    row). The hidden states are cast to the head's dtype for the chunked losses."""
    if packed.position_ids_bl is None:
        hidden_blh, weight_vh = final_hidden_states(model, packed.input_ids_bl,
                                                    packed.attention_mask_bl)
    else:  # several sequences per row: the mask comes from the restarting positions
        hidden_blh, weight_vh = final_hidden_states(model, packed.input_ids_bl, None,
                                                    position_ids_bt=packed.position_ids_bl)
    return hidden_blh[packed.row_n, packed.pos_n].to(weight_vh.dtype), weight_vh


# ----------------------------------------------------------------------------------------------
# Loss pieces (pure functions of tensors)
# ----------------------------------------------------------------------------------------------


def _chunked(fn: Callable, chunk_size: int, hidden_nh, weight_vh, *rows) -> list[torch.Tensor]:
    """fn(hidden chunk, weight, *row chunks) over chunks of `chunk_size` rows. Each chunk is
    checkpointed when a gradient is needed: the forward keeps only its output, the backward
    recomputes that chunk's [chunk, V] logits, so no [n, V] tensor ever exists."""
    grad = torch.is_grad_enabled() and (hidden_nh.requires_grad or weight_vh.requires_grad)
    out = []
    for a in range(0, hidden_nh.shape[0], chunk_size):
        args = (hidden_nh[a : a + chunk_size], weight_vh, *(r[a : a + chunk_size] for r in rows))
        out.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return out


def sampled_token_loss(logp_student_n: torch.Tensor, logp_sampled_n: torch.Tensor,
                       logp_teacher_n: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-token reverse KL as a policy gradient on the sampled tokens (Thinking Machines'
    on-policy distillation; discount 0, importance-weighted).

    For the sampled token x_t of each loss position, with the student's current log-prob
    ``log p_s(x_t)`` (``logp_student_n``, on the graph), the log-prob it was sampled with
    ``log q(x_t)`` (the sampler's, at its temperature) and the teacher's ``log p_t(x_t)``::

        A_t = -(log p_s(x_t) - log p_t(x_t))          advantage, detached
        w_t = exp(log p_s(x_t) - log q(x_t))          importance weight, detached
        loss = -sum_t w_t A_t log p_s(x_t) / num_tokens

    The gradient is ``-sum_t w_t A_t grad log p_s(x_t) / num_tokens``; since
    ``E_{x~q}[w(x) grad log p_s(x)] = 0``, its expectation over x_t ~ q is the gradient of
    ``sum_t KL(p_s || p_t)`` at each position (with p_t held fixed) divided by num_tokens.
    """
    logp_now_n = logp_student_n.detach()
    advantage_n = -(logp_now_n - logp_teacher_n.to(logp_now_n.dtype))
    weight_n = torch.exp(logp_now_n - logp_sampled_n.to(logp_now_n.dtype))
    return -(weight_n * advantage_n * logp_student_n).sum() / max(num_tokens, 1)


def topk_reverse_kl(hidden_nh: torch.Tensor, weight_vh: torch.Tensor, ids_nk: torch.Tensor,
                    logprobs_nk: torch.Tensor, tail_n: torch.Tensor, num_tokens: int,
                    chunk_size: int = 0, targets_n: torch.Tensor | None = None):
    """Exact reverse KL per token on the teacher's coarsened top-k support, summed / num_tokens.

    ``sum_t KL(q_t || p_t) / num_tokens`` over the k + 1 outcomes {the teacher's k ids, the rest},
    q the student's softmax(W h) lumped the same way, p the teacher's log-probs and tail (T = 1):
    ``factory.losses.sparse_divergence(hidden @ W.T, ids, logprobs, kind="rkl",
    teacher_tail_logprob=tail)`` through the fused chunked kernel. With `targets_n`, also the
    student's log-prob of each target and its entropy (no gradient), from the same logits.
    """
    return fused_sparse_divergence(
        hidden_nh, weight_vh, ids_nk, logprobs_nk, kind="rkl", chunk_size=chunk_size,
        teacher_tail_logprob=tail_n, num_tokens=num_tokens, targets=targets_n)


def _sampled_chunk(hidden_ch, weight_vh, ids_ck, logprobs_ck, temperature):
    return sampled_forward_kl(hidden_ch @ weight_vh.t(), ids_ck, logprobs_ck,
                              temperature=temperature, reduction="sum")


def cache_divergence(hidden_nh: torch.Tensor, weight_vh: torch.Tensor, ids_nk: torch.Tensor,
                     logprobs_nk: torch.Tensor, tail_n: torch.Tensor, *, cache_mode: str,
                     loss_cfg, num_tokens: int, targets_n: torch.Tensor | None = None):
    """The off-policy divergence to the cached teacher rows, summed over tokens / num_tokens.

    ``topk`` cache: ``loss_cfg.kind`` (fkl, rkl, jsd with beta, skew_* with alpha, tvd) on the
    coarsened distributions {k ids, tail} at ``loss_cfg.temperature`` (scaled by T**2), through
    ``fused_sparse_divergence``. ``sampled`` cache: the unbiased Monte-Carlo forward KL of Sparse
    Logit Sampling (``sampled_forward_kl``; kind must be fkl), `chunk_size` rows of logits at a
    time, each chunk recomputed in the backward. With `targets_n` (topk only) it returns
    ``(loss, target_logprob_n, entropy_n)``, the metrics read from the loss's own chunks.
    """
    if cache_mode == "topk":
        return fused_sparse_divergence(
            hidden_nh, weight_vh, ids_nk, logprobs_nk, kind=loss_cfg.kind,
            temperature=loss_cfg.temperature, beta=loss_cfg.beta, alpha=loss_cfg.alpha,
            chunk_size=loss_cfg.chunk_size, teacher_tail_logprob=tail_n, num_tokens=num_tokens,
            targets=targets_n)
    if targets_n is not None:
        raise ValueError("cache_divergence returns token metrics for a topk cache only")
    if hidden_nh.shape[0] == 0:
        return hidden_nh.sum() * 0.0
    sums = _chunked(partial(_sampled_chunk, temperature=loss_cfg.temperature),
                    chunk_rows(loss_cfg.chunk_size, weight_vh.shape[0]), hidden_nh, weight_vh,
                    ids_nk, logprobs_nk)
    return torch.stack(sums).sum() / max(num_tokens, 1)


# ----------------------------------------------------------------------------------------------
# Off-policy batches: the teacher's responses and their cached rows
# ----------------------------------------------------------------------------------------------


def cache_expect(cache_cfg) -> dict:
    """What the run asks of the logit cache; `CacheReader` refuses a cache that differs."""
    return {"k": cache_cfg.k, "mode": cache_cfg.mode, "encoding": cache_cfg.encoding,
            "logprob_bits": cache_cfg.logprob_bits}


def load_offpolicy_set(artifact: Artifact):
    """The off-policy set's rows (a memory-mapped `datasets.Dataset`)."""
    import datasets

    return datasets.load_from_disk(str(Path(artifact.path) / OFFPOLICY_DATA))


def _list_lengths(table, column: str) -> np.ndarray:
    lengths = pc.list_value_length(table.column(column))
    return lengths.to_numpy(zero_copy_only=False).astype(np.int64)


def check_loss_cfg(loss_cfg, cache_mode: str) -> None:
    """Refuse a loss config the cache cannot serve, naming the key (before any compute)."""
    if loss_cfg.kind not in KINDS:
        raise ConfigError(f"loss.kind={loss_cfg.kind!r} is not one of {', '.join(KINDS)}")
    if cache_mode == "sampled" and loss_cfg.kind != "fkl":
        raise ConfigError(
            f"a sampled logit cache (pipeline.cache.mode=sampled) estimates forward KL only "
            f"(Sparse Logit Sampling), but loss.kind={loss_cfg.kind!r}: use loss=fkl, or record "
            f"a top-k cache (pipeline.cache.mode=topk) for the other divergences")
    if loss_cfg.ce_weight < 0 or loss_cfg.chunk_size < 0:
        raise ConfigError(f"loss.ce_weight must be >= 0 and loss.chunk_size >= 0 (0: auto), got "
                          f"{loss_cfg.ce_weight} and {loss_cfg.chunk_size}")


class CacheReplay:
    """Off-policy micro-batches: rows of the off-policy set with the teacher's cached rows.

    Micro-batch `micro` of step `step` holds ``rows_per_micro[micro]`` rows drawn uniformly (with
    replacement) by ``step_generator(seed, step, micro)``: a pure function of the step, so a
    resumed run replays the same batches. That is the global micro-batch, drawn the same on
    every rank; each rank trains on its rows ``rank::world``. A row's sequence is cut to
    `max_len` tokens; its response tokens inside the cut take loss, and rows whose prompt leaves
    no room are never drawn.

    Loss per micro-batch on each rank (module docstring for the normalisation)::

        world * (sum_tokens D(teacher || student) + ce_weight * sum_tokens -log q(x_t))
              / step_tokens

    the sums over this rank's rows, step_tokens over the global step.

    D from ``cache_divergence``, x_t the teacher's token. Metrics: ``divergence``, ``ce`` and
    ``entropy`` (the student's; per-token means over the step), ``response_tokens`` (the step's
    loss tokens) and ``response_length`` (mean loss tokens per sequence).
    """

    def __init__(self, dataset, reader: CacheReader, *, loss_cfg, max_len: int, pad_id: int,
                 seed: int, rows_per_micro: list[int], vocab_size: int):
        check_loss_cfg(loss_cfg, reader.spec.mode)
        if not rows_per_micro or min(rows_per_micro) < 1:
            raise ConfigError(f"every micro-batch needs at least one row, got {rows_per_micro}")
        check_shardable("the off-policy batch", min(rows_per_micro))
        if reader.spec.vocab_size > vocab_size:
            raise ArtifactError(
                f"logit cache {reader.path} holds ids of a {reader.spec.vocab_size}-token "
                f"vocabulary; the student has {vocab_size}: the pair does not share a vocabulary")
        self.dataset, self.reader, self.loss_cfg = dataset, reader, loss_cfg
        self.max_len, self.pad_id, self.seed = max_len, pad_id, seed
        self.rows_per_micro = list(rows_per_micro)
        table = dataset.with_format("arrow")[:]
        n_rows = table.num_rows
        if not np.array_equal(table.column("row").to_numpy(), np.arange(n_rows)):
            raise ArtifactError(f"the off-policy set's column `row` must equal the row index "
                                f"0..{n_rows - 1} (the sequence ids of its logit cache)")
        prompt_len = _list_lengths(table, "prompt_ids")
        response_len = _list_lengths(table, "response_ids")
        seq_ids = np.asarray(reader.seq_ids, dtype=np.int64)
        if not np.array_equal(np.sort(seq_ids), np.arange(n_rows)):
            raise ArtifactError(
                f"logit cache {reader.path} holds {len(seq_ids)} sequences, not exactly the "
                f"off-policy set's rows 0..{n_rows - 1}: it was recorded over another set; rerun "
                f"the record stage")
        self.position = np.empty(n_rows, dtype=np.int64)  # row (= sequence id) -> cache position
        self.position[seq_ids] = np.arange(n_rows)
        cached_len = reader.lengths[self.position]
        bad = np.nonzero(cached_len != response_len)[0]
        if len(bad):
            r = int(bad[0])
            raise ArtifactError(
                f"logit cache {reader.path} holds {int(cached_len[r])} rows for sequence {r}, "
                f"whose response has {int(response_len[r])} tokens: the cache was recorded over "
                f"another off-policy set; rerun the record stage")
        self.kept = np.clip(np.minimum(response_len, max_len - prompt_len), 0, None)
        self.eligible = np.nonzero(self.kept > 0)[0]
        if len(self.eligible) == 0:
            raise ConfigError(
                f"max_len={max_len} leaves no response token of the off-policy set inside the "
                f"cut (shortest prompt: {int(prompt_len.min())} tokens): raise the stage's max_len")

    @classmethod
    def open(cls, offpolicy: Artifact, cache: Artifact, cache_cfg, **kwargs) -> "CacheReplay":
        reader = CacheReader(Path(cache.path), expect=cache_expect(cache_cfg))
        return cls(load_offpolicy_set(offpolicy), reader, **kwargs)

    @property
    def skipped_rows(self) -> int:
        """Rows never drawn: their prompt fills max_len."""
        return len(self.kept) - len(self.eligible)

    def rows(self, step: int, micro: int) -> np.ndarray:
        """The off-policy set rows of a global micro-batch (every rank draws the same)."""
        g = step_generator(self.seed, step, micro)
        picks = torch.randint(0, len(self.eligible), (self.rows_per_micro[micro],), generator=g)
        return self.eligible[picks.numpy()]

    def step_tokens(self, step: int) -> int:
        """Loss tokens of the whole global optimizer step (every micro-batch, every rank)."""
        micros = range(len(self.rows_per_micro))
        return int(sum(self.kept[self.rows(step, m)].sum() for m in micros))

    def teacher_rows(self, rows: np.ndarray):
        """The cached rows of the kept response tokens of `rows`, concatenated in order:
        (ids [n, k] int64, logprobs [n, k] fp32, tail [n] fp32)."""
        ids_nk, logprobs_nk, tail_n, lengths_b = self.reader.batch_flat(self.position[rows])
        starts_b = np.cumsum(lengths_b.numpy()) - lengths_b.numpy()
        kept_b = self.kept[rows]
        take_n = torch.from_numpy(np.concatenate(
            [s + np.arange(k, dtype=np.int64) for s, k in zip(starts_b, kept_b)]))
        return ids_nk[take_n], logprobs_nk[take_n], tail_n[take_n]

    def batch_loss(self, model, rows: np.ndarray, num_tokens: int) -> "BatchLoss":
        """The loss of `rows` normalised by `num_tokens` (unscaled by the world size), and its
        parts summed over tokens."""
        data = self.dataset[[int(r) for r in rows]]
        kept = self.kept[rows]
        sequences = [(prompt + response)[: self.max_len]
                     for prompt, response in zip(data["prompt_ids"], data["response_ids"])]
        starts = [len(p) for p in data["prompt_ids"]]
        packed = pack(sequences, starts, [range(int(k)) for k in kept], self.pad_id)
        device = current_device()
        packed = packed.to(device)
        hidden_nh, weight_vh = response_hidden(model, packed)
        ids_nk, logprobs_nk, tail_n = (t.to(device) for t in self.teacher_rows(rows))
        ce_weight = self.loss_cfg.ce_weight
        # without a CE term the metrics need no gradient: a topk loss reads them from its chunks
        folded = self.reader.spec.mode == "topk" and ce_weight == 0
        out = cache_divergence(hidden_nh, weight_vh, ids_nk, logprobs_nk, tail_n,
                               cache_mode=self.reader.spec.mode, loss_cfg=self.loss_cfg,
                               num_tokens=num_tokens,
                               targets_n=packed.target_n if folded else None)
        if folded:
            loss, logp_n, entropy_n = out
        else:
            loss = out
            with torch.set_grad_enabled(torch.is_grad_enabled() and ce_weight > 0):
                logp_n, entropy_n = token_logprobs_and_entropy(
                    hidden_nh, weight_vh, packed.target_n, chunk_size=self.loss_cfg.chunk_size)
        div_sum = loss.detach() * max(num_tokens, 1)
        ce_sum = -logp_n.sum()
        if ce_weight > 0:
            loss = loss + ce_weight * ce_sum / max(num_tokens, 1)
        return BatchLoss(loss, int(packed.attention_mask_bl.sum()), float(div_sum),
                         float(ce_sum.detach()), float(entropy_n.detach().sum()))

    def micro_step(self, model, step: int, micro: int) -> StepOutput:
        world = current_rank().world
        step_tokens = self.step_tokens(step)
        out = self.batch_loss(model, shard(self.rows(step, micro)), step_tokens)
        # the loop averages micro-batches and ranks
        scale = len(self.rows_per_micro) * world / max(step_tokens, 1)
        return StepOutput(loss=out.loss * world, tokens=out.tokens, metrics={
            "divergence": out.divergence_sum * scale, "ce": out.ce_sum * scale,
            "entropy": out.entropy_sum * scale, "response_tokens": float(step_tokens),
            "response_length": step_tokens / sum(self.rows_per_micro)})


@dataclass
class BatchLoss:
    loss: torch.Tensor  # normalised by the step's tokens, on the graph
    tokens: int  # tokens forwarded (prompt and response, no padding)
    divergence_sum: float  # summed over the loss tokens
    ce_sum: float  # -log q(teacher's token), summed
    entropy_sum: float  # the student's entropy at the loss tokens, summed


# ----------------------------------------------------------------------------------------------
# On-policy batches: the student's samples, scored by the teacher
# ----------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    problem_id: str
    mode: str
    ids: list[int]


def prompt_pools(dataset, modes: list[str], n_prompts: int,
                 max_len: int) -> dict[str, list[Prompt]]:
    """The on-policy prompts: the off-policy set's distinct (problem_id, mode) generation
    prompts (no answers), for the first `n_prompts` distinct problems (0: all), per mode."""
    problem_ids, row_modes = list(dataset["problem_id"]), list(dataset["mode"])
    keep_problems: dict[str, None] = {}
    first_row: dict[tuple[str, str], int] = {}
    for r, (pid, mode) in enumerate(zip(problem_ids, row_modes)):
        if pid not in keep_problems:
            if n_prompts and len(keep_problems) == n_prompts:
                continue
            keep_problems[pid] = None
        if mode in modes:
            first_row.setdefault((pid, mode), r)
    rows = sorted(first_row.values())
    ids = dataset[rows]["prompt_ids"] if rows else []
    pools: dict[str, list[Prompt]] = {mode: [] for mode in modes}
    for r, prompt in zip(rows, ids):
        pools[row_modes[r]].append(Prompt(problem_ids[r], row_modes[r], prompt))
    for mode, pool in pools.items():
        if not pool:
            raise ConfigError(f"the off-policy set has no {mode!r} prompts; drop {mode} from "
                              f"pipeline.on_policy.modes or generate responses in that mode")
        longest = max(len(p.ids) for p in pool)
        if longest >= max_len:
            raise ConfigError(f"pipeline.on_policy.max_len={max_len} leaves no room for a "
                              f"response after the longest {mode} prompt ({longest} tokens): "
                              f"raise max_len")
    return pools


@dataclass
class Rollout:
    """One on-policy step's samples on this rank, scored by the teacher; the counts are the
    step's over every rank."""

    sequences: list[list[int]]  # prompt + completion, cut to max_len
    starts: list[int]  # prompt lengths: completion token t sits at starts[i] + t
    offsets: list[list[int]]  # completion offsets that take loss (not forced by a budget)
    sampled_logprob: list[torch.Tensor]  # [T_i] log-prob each token was sampled with
    scored: list[ScoredRows]  # the teacher's rows per sequence, T_i each
    loss_tokens: int  # loss tokens of the whole step, all ranks
    response_length: float  # mean sampled completion length on this rank (before the cut)
    correct: float  # share of this rank's samples the verifier accepts (monitoring only)
    sampled_tokens: int  # tokens the student generated, all ranks
    teacher_tokens: int  # tokens the teacher read to score them, all ranks


@dataclass
class OnPolicyCounters:
    """Work counted across a resumed run (checkpointed with the loop as its extra_state)."""

    on_policy_steps: int = 0
    sampled_tokens: int = 0
    teacher_tokens: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


def check_on_policy_cfg(stage_cfg) -> None:
    """Refuse an OnPolicyConfig that cannot run, naming the key (before any compute)."""
    if stage_cfg.estimator not in ESTIMATORS:
        raise ConfigError(f"pipeline.on_policy.estimator={stage_cfg.estimator!r} is not one "
                          f"of {ESTIMATORS}")
    if not 0.0 <= stage_cfg.gkd_lambda <= 1.0:
        raise ConfigError(f"pipeline.on_policy.gkd_lambda must be in [0, 1], got "
                          f"{stage_cfg.gkd_lambda}")
    if not stage_cfg.temperature > 0:
        raise ConfigError(f"pipeline.on_policy.temperature must be > 0 (the student samples "
                          f"its own distribution), got {stage_cfg.temperature}")
    if stage_cfg.batch_size * stage_cfg.n_per_prompt < stage_cfg.grad_accum:
        raise ConfigError(
            f"pipeline.on_policy: batch_size x n_per_prompt = "
            f"{stage_cfg.batch_size * stage_cfg.n_per_prompt} samples per step cannot fill "
            f"grad_accum={stage_cfg.grad_accum} micro-batches")
    if not stage_cfg.modes:
        raise ConfigError("pipeline.on_policy.modes is empty: name think, no_think or both")
    for mode in stage_cfg.modes:
        if mode not in chat.MODES:
            raise ConfigError(f"pipeline.on_policy.modes holds {mode!r}; valid: {chat.MODES}")


class OnPolicyData:
    """On-policy distillation micro-batches, interleaved with cache replays (GKD's lambda).

    Step s is on-policy when ``is_on_policy(seed, s, gkd_lambda)``; otherwise it is an off-policy
    step from `replay`, with the stage's divergence (``CacheReplay``). An on-policy step, at its
    first micro-batch:

    1. draws `batch_size` prompts, prompt i in mode ``modes[i % len(modes)]`` from that mode's
       pool (``prompt_pools``), and samples `n_per_prompt` completions each with
       ``factory.sampling.sample`` at `temperature` (top-p 1, top-k 0: the student's own
       distribution, tempered), from the weights at the start of the step;
    2. cuts each sequence to `max_len` and has the teacher score exactly those tokens
       (``backend.score(..., k, mode="topk")``);
    3. splits the samples into grad_accum contiguous micro-batches.

    Loss per micro-batch, over the completion tokens not forced by a thinking budget, normalised
    by the step's count of those tokens: ``topk_reverse_kl`` (estimator "topk") or
    ``sampled_token_loss`` (estimator "sampled_token"). Metrics: ``on_policy`` (1 or 0), ``rkl``
    (mean of log p_s(x_t) - log p_t(x_t) over the sampled tokens, the sampled estimate of the
    reverse KL per token), ``divergence`` (topk: the coarsened reverse KL), ``entropy`` (the
    student's, per token), ``response_length``,
    ``response_tokens``, ``sample_correct`` (the verifier on the samples; monitoring only, no
    answer reaches the loss).
    """

    def __init__(self, *, pools: dict[str, list[Prompt]], replay: CacheReplay, teacher: Callable,
                 tokenizer, grade: Callable[[list[Prompt], list[str]], list[bool]], stage_cfg,
                 loss_cfg, k: int, seed: int, counters: OnPolicyCounters):
        check_on_policy_cfg(stage_cfg)
        # every rank needs samples for each of its grad_accum micro-batches
        world = current_rank().world
        per_process = -(-stage_cfg.grad_accum // stage_cfg.n_per_prompt)  # prompts, rounded up
        if stage_cfg.batch_size // world < per_process:
            raise ConfigError(
                f"pipeline.on_policy: batch_size={stage_cfg.batch_size} prompts shared by {world} "
                f"processes leave fewer than grad_accum={stage_cfg.grad_accum} samples on a "
                f"process; raise batch_size to at least {world * per_process}, or launch fewer "
                f"processes")
        self.pools, self.replay, self._make_teacher = pools, replay, teacher
        self.tokenizer, self.grade, self.cfg, self.loss_cfg = tokenizer, grade, stage_cfg, loss_cfg
        self.k, self.seed, self.counters = k, seed, counters
        self.modes = list(stage_cfg.modes)
        self._teacher = None
        self._rollout: tuple[int, Rollout] | None = None

    @property
    def teacher(self):
        if self._teacher is None:  # loaded at the first on-policy step: lambda 0 never loads it
            self._teacher = self._make_teacher()
        return self._teacher

    def prompts(self, step: int) -> list[Prompt]:
        """The step's global prompts (every rank draws the same): prompt i in mode
        ``modes[i % len(modes)]``."""
        g = step_stream(self.seed, step, _PROMPTS)
        out = []
        for i in range(self.cfg.batch_size):
            pool = self.pools[self.modes[i % len(self.modes)]]
            out.append(pool[int(torch.randint(0, len(pool), (), generator=g))])
        return out

    def rollout(self, model, step: int) -> Rollout:
        """Sample this rank's share of the step's prompts and have the teacher score them."""
        rank = current_rank().index
        prompts = shard(self.prompts(step))
        max_len, n = self.cfg.max_len, self.cfg.n_per_prompt
        room = max_len - min(len(p.ids) for p in prompts)
        samples = sample(
            _unwrap(model), [p.ids for p in prompts], n, temperature=self.cfg.temperature,
            top_p=1.0, top_k=0, min_p=0.0, max_new_tokens=min(self.cfg.max_new_tokens, room),
            **token_kwargs(self.tokenizer),
            generator=step_stream(self.seed, step, _SAMPLES, rank))
        sequences, starts, offsets, sampled_logprob = [], [], [], []
        for r, completion in enumerate(samples.tokens):
            prompt = prompts[samples.prompt_index[r]].ids
            keep = min(len(completion), max_len - len(prompt))
            sequences.append(prompt + completion[:keep])
            starts.append(len(prompt))
            offsets.append([t for t in range(keep) if not samples.forced[r][t]])
            sampled_logprob.append(torch.tensor(samples.logprobs[r][:keep], dtype=torch.float32))
        score_seed = int(torch.randint(0, 2**31 - 1, (), generator=step_stream(
            self.seed, step, _SCORES, rank)))
        scored = self.teacher.score(sequences, starts, k=self.k, mode="topk", seed=score_seed)
        for i, rows in enumerate(scored):
            if rows.ids_tk.shape[0] != len(sequences[i]) - starts[i]:
                raise ArtifactError(
                    f"the teacher backend returned {rows.ids_tk.shape[0]} rows for a "
                    f"{len(sequences[i]) - starts[i]}-token completion (sequence {i}): score must "
                    f"return one row per token from the start")
        texts = samples.texts(self.tokenizer)
        verdicts = self.grade([prompts[p] for p in samples.prompt_index], texts)
        lengths = samples.lengths()
        # the step's counts over every rank: the loss divides by the global loss-token count
        loss_tokens, sampled_tokens, teacher_tokens = all_sum(
            [sum(len(o) for o in offsets), sum(lengths), sum(len(s) for s in sequences)])
        return Rollout(
            sequences=sequences, starts=starts, offsets=offsets, sampled_logprob=sampled_logprob,
            scored=scored, loss_tokens=loss_tokens,
            response_length=float(np.mean(lengths)), correct=float(np.mean(verdicts)),
            sampled_tokens=sampled_tokens, teacher_tokens=teacher_tokens)

    def _step_rollout(self, model, step: int) -> Rollout:
        if self._rollout is None or self._rollout[0] != step:
            rollout = self.rollout(model, step)
            self._rollout = (step, rollout)
            self.counters.on_policy_steps += 1
            self.counters.sampled_tokens += rollout.sampled_tokens
            self.counters.teacher_tokens += rollout.teacher_tokens
        return self._rollout[1]

    def micro_step(self, model, step: int, micro: int) -> StepOutput:
        if not is_on_policy(self.seed, step, self.cfg.gkd_lambda):
            out = self.replay.micro_step(model, step, micro)
            out.metrics["on_policy"] = 0.0
            return out
        rollout = self._step_rollout(model, step)
        grad_accum = self.cfg.grad_accum
        sizes = micro_sizes(len(rollout.sequences), grad_accum)
        a = sum(sizes[:micro])
        sel = range(a, a + sizes[micro])
        device = current_device()
        packed = pack([rollout.sequences[i] for i in sel], [rollout.starts[i] for i in sel],
                      [rollout.offsets[i] for i in sel], self.tokenizer.pad_token_id).to(device)

        def gather(values: Callable[[int], torch.Tensor]) -> torch.Tensor:
            parts = [values(i)[rollout.offsets[i]] for i in sel]
            return torch.cat(parts).to(device)

        ids_nk = gather(lambda i: rollout.scored[i].ids_tk)
        logprobs_nk = gather(lambda i: rollout.scored[i].logprobs_tk)
        tail_n = gather(lambda i: rollout.scored[i].tail_t)
        logp_teacher_n = gather(lambda i: rollout.scored[i].token_logprob_t).float()
        logp_sampled_n = gather(lambda i: rollout.sampled_logprob[i])

        hidden_nh, weight_vh = response_hidden(model, packed)
        chunk, num_tokens = self.loss_cfg.chunk_size, rollout.loss_tokens
        world = current_rank().world
        metrics = {}
        if self.cfg.estimator == "topk":  # the metrics come from the loss's own chunks
            loss, logp_student_n, entropy_n = topk_reverse_kl(
                hidden_nh, weight_vh, ids_nk, logprobs_nk, tail_n, num_tokens=num_tokens,
                chunk_size=chunk, targets_n=packed.target_n)
            metrics["divergence"] = loss.item() * grad_accum * world
        else:
            logp_student_n, entropy_n = token_logprobs_and_entropy(
                hidden_nh, weight_vh, packed.target_n, chunk_size=chunk)
            loss = sampled_token_loss(logp_student_n, logp_sampled_n, logp_teacher_n, num_tokens)
        loss = loss * world  # normalised by the global count; DDP averages the ranks
        scale = grad_accum * world / max(num_tokens, 1)
        rkl_sum = (logp_student_n.detach() - logp_teacher_n).sum().item()
        metrics.update({
            "on_policy": 1.0, "rkl": rkl_sum * scale,
            "entropy": entropy_n.detach().sum().item() * scale,
            "response_tokens": float(num_tokens), "response_length": rollout.response_length,
            "sample_correct": rollout.correct})
        return StepOutput(loss=loss, tokens=int(packed.attention_mask_bl.sum()), metrics=metrics)


class TaskGrader:
    """Grades completions of off-policy-set prompts with the task's verifier, looking problems up
    by id among the task's training problems (a task that grades in parallel gets every pair at
    once, as in factory/evaluation.py). Monitoring only: no verdict reaches a loss."""

    def __init__(self, task_cfg):
        self.task = build_task(task_cfg)
        self.problems = {p.id: p for p in self.task.problems("train", 0)}

    def __call__(self, prompts: list[Prompt], texts: list[str]) -> list[bool]:
        pairs = [(self.problems[p.problem_id], chat.split_response(text)[1])
                 for p, text in zip(prompts, texts)]
        grade_many = getattr(self.task, "grade_many", None)
        if grade_many is not None:
            return [bool(v) for v in grade_many(pairs)]
        return [bool(self.task.grade(problem, answer)) for problem, answer in pairs]


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else asdict(node)


def _trainer_inputs(trainer_cfg) -> dict:
    """The trainer settings that change the weights a stage makes."""
    return {"precision": trainer_cfg.precision, "grad_clip": trainer_cfg.grad_clip,
            "weight_decay": trainer_cfg.weight_decay}


def _replay(ctx: StageContext, card, tokenizer, *, offpolicy_set: str, cache: str, cache_cfg,
            loss_cfg, stage_cfg, seed: int, rows_per_micro: list[int]) -> CacheReplay:
    """The off-policy set and its cache, batched for `rows_per_micro` rows per micro-batch."""
    return CacheReplay.open(
        ctx.upstream[offpolicy_set], ctx.upstream[cache], cache_cfg, loss_cfg=loss_cfg,
        max_len=stage_cfg.max_len, pad_id=tokenizer.pad_token_id, seed=seed,
        rows_per_micro=rows_per_micro, vocab_size=card.arch.vocab_size)


def _train_from(ctx: StageContext, start: str, card, tokenizer, micro_step, stage_cfg, cfg,
                extra_state=None):
    """Load the `start` stage's model, train it with the one loop, save it into the artifact."""
    model = load_model(ctx.upstream[start], card, device=cfg.trainer.device, dtype="float32")
    model.train()
    result = train(model, micro_step, stage=ctx.name, steps=stage_cfg.steps, lr=stage_cfg.lr,
                   warmup_ratio=stage_cfg.warmup_ratio, grad_accum=stage_cfg.grad_accum,
                   trainer_cfg=cfg.trainer, work_dir=ctx.work, metrics=ctx.metrics,
                   extra_state=extra_state)
    save_model(model, tokenizer, ctx.out)
    return result


def off_policy_stage(name: str, card, *, base: str, offpolicy_set: str, cache: str, stage_cfg,
                     loss_cfg, cache_cfg, seed: int, cfg, arm: str = "distill") -> Stage:
    """Off-policy distillation of the `base` stage's model on the teacher's responses
    (`offpolicy_set`) against the teacher's cached distributions (`cache`), `stage_cfg.steps`
    steps of `stage_cfg.grad_accum` micro-batches of `stage_cfg.batch_size` rows (``CacheReplay``
    for the loss, the batches and the metrics)."""
    check_loss_cfg(loss_cfg, cache_cfg.mode)
    inputs = {"card": card_inputs(card), "stage": _plain(stage_cfg), "loss": _plain(loss_cfg),
              "cache": cache_expect(cache_cfg), "seed": seed,
              "trainer": _trainer_inputs(cfg.trainer)}

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        replay = _replay(ctx, card, tokenizer, offpolicy_set=offpolicy_set, cache=cache,
                         cache_cfg=cache_cfg, loss_cfg=loss_cfg, stage_cfg=stage_cfg, seed=seed,
                         rows_per_micro=[stage_cfg.batch_size] * stage_cfg.grad_accum)
        result = _train_from(ctx, base, card, tokenizer, replay.micro_step, stage_cfg, cfg)
        active = count_params(card)["flops_params"]
        return StageCost(tokens=result.tokens, flops=train_flops(active, result.tokens),
                         notes={"steps": result.steps, "resumed_from": result.resumed_from,
                                "skipped_rows": replay.skipped_rows})

    return Stage(name=name, kind="model", inputs=inputs, build=build,
                 needs=[base, offpolicy_set, cache], arm=arm, distributed=True)


def on_policy_stage(name: str, card, teacher_card, *, init: str, teacher_model: str,
                    offpolicy_set: str, cache: str, stage_cfg, loss_cfg, cache_cfg, task_cfg,
                    seed: int, cfg, arm: str = "distill") -> Stage:
    """On-policy distillation of the `init` stage's model (the off-policy checkpoint) with the
    `teacher_model` stage's teacher scoring the student's samples (``OnPolicyData``); off-policy
    steps (1 - gkd_lambda of them) replay `offpolicy_set` with its `cache`, as in
    ``off_policy_stage``. `stage_cfg` is an OnPolicyConfig: batch_size prompts per step, each
    sampled n_per_prompt times, split into grad_accum micro-batches; an off-policy step replays
    as many sequences. `task_cfg` grades the samples for the ``sample_correct`` metric and checks
    that the off-policy set's problems are the task's."""
    check_loss_cfg(loss_cfg, cache_cfg.mode)
    check_on_policy_cfg(stage_cfg)
    inputs = {"card": card_inputs(card), "teacher": card_inputs(teacher_card),
              "stage": _plain(stage_cfg), "loss": _plain(loss_cfg),
              "cache": cache_expect(cache_cfg), "backend": cfg.backend.name, "seed": seed,
              "trainer": _trainer_inputs(cfg.trainer)}

    def build(ctx: StageContext) -> StageCost:
        tokenizer = tokenizer_for(card)
        replay = _replay(ctx, card, tokenizer, offpolicy_set=offpolicy_set, cache=cache,
                         cache_cfg=cache_cfg, loss_cfg=loss_cfg, stage_cfg=stage_cfg, seed=seed,
                         rows_per_micro=micro_sizes(stage_cfg.batch_size * stage_cfg.n_per_prompt,
                                                    stage_cfg.grad_accum))
        pools = prompt_pools(replay.dataset, list(stage_cfg.modes), stage_cfg.n_prompts,
                             stage_cfg.max_len)
        grade = TaskGrader(task_cfg)
        unknown = sorted({p.problem_id for pool in pools.values() for p in pool}
                         - set(grade.problems))
        if unknown:
            raise ArtifactError(
                f"the off-policy set {ctx.upstream[offpolicy_set].path} holds problems that are "
                f"not in task {task_cfg.name!r}'s training split (e.g. {unknown[0]!r}): it was "
                f"generated for another task")

        def teacher():
            return make_backend(cfg.backend, teacher_card, ctx.upstream[teacher_model], tokenizer,
                                device=cfg.trainer.device, batch_size=cache_cfg.batch_size)

        counters = OnPolicyCounters()
        data = OnPolicyData(pools=pools, replay=replay, teacher=teacher, tokenizer=tokenizer,
                            grade=grade, stage_cfg=stage_cfg, loss_cfg=loss_cfg, k=cache_cfg.k,
                            seed=seed, counters=counters)
        result = _train_from(ctx, init, card, tokenizer, data.micro_step, stage_cfg, cfg,
                             extra_state=counters)
        active = count_params(card)["flops_params"]
        teacher_active = count_params(teacher_card)["flops_params"]
        # training 6N per token, plus the student's sampling (forward only, KV-cached)
        flops = train_flops(active, result.tokens) + forward_flops(active, counters.sampled_tokens)
        return StageCost(tokens=result.tokens, flops=flops, notes={
            "steps": result.steps, "resumed_from": result.resumed_from,
            "on_policy_steps": counters.on_policy_steps,
            "sampled_tokens": counters.sampled_tokens,
            "teacher_scored_tokens": counters.teacher_tokens,
            "teacher_flops": forward_flops(teacher_active, counters.teacher_tokens)})

    return Stage(name=name, kind="model", inputs=inputs, build=build,
                 needs=[init, teacher_model, offpolicy_set, cache], arm=arm, distributed=True)
