"""Distillation losses: dense, sparse (cached top-k teacher), sampled, and fused with the LM head.

Notation, per token: ``p`` is the teacher distribution, ``q`` the student's, both over the same
outcomes (the vocabulary, or the coarsened support below); ``KL(a||b) = sum_x a(x) log(a(x)/b(x))``.

Kinds (``KINDS``), each a divergence >= 0 that is 0 iff ``p == q``:

=========== ====================================================================================
``fkl``      forward KL, ``KL(p || q)`` (mode covering; classic Hinton KD)
``rkl``      reverse KL, ``KL(q || p)`` (mode seeking; MiniLLM, on-policy distillation)
``jsd``      generalized JSD with ``m = beta p + (1 - beta) q``:
             ``beta KL(p || m) + (1 - beta) KL(q || m)``. ``beta = 0`` is exactly ``fkl`` and
             ``beta = 1`` exactly ``rkl`` (handled as those cases, as TRL's
             ``generalized_jsd_loss`` and liger-kernel do, not as a numerical limit; the formula
             itself would give 0 at both ends).
``skew_fkl`` ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM, arXiv 2402.03898; alpha = 0.1 there)
``skew_rkl`` ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM)
``tvd``      total variation, ``0.5 sum_x |p(x) - q(x)|``
=========== ====================================================================================

Temperature ``T`` divides both sides' logits and the loss is multiplied by ``T**2`` so gradient
magnitudes stay comparable across temperatures (Hinton et al. 2015). Log-softmax always runs in
fp32 (fp64 inputs stay fp64): bf16 resolves log-probabilities only to about 3 significant
digits, and the tail mass is exactly what it loses.

Normalisation (all entry points): the per-token divergence (summed over outcomes) is zeroed at
masked positions and summed; ``reduction="mean"`` divides by the number of unmasked tokens in
*this call* (at least 1), or by ``num_tokens`` when given. For gradient accumulation pass
``num_tokens`` = the unmasked-token count of the whole optimizer step (every micro-batch, every
rank): then the micro-batch losses add up to the per-token mean over the step and every token
weighs the same whatever micro-batch it fell in. ``reduction="sum"`` returns the masked sum and
``"none"`` the per-token values (zeros where masked; dense and sparse only). An empty mask gives
an exact 0 that still has a gradient path (zero gradients, never NaN).

Sparse teacher (logit cache): per token the cache holds the teacher's top-k token ids and their
full-vocabulary log-probabilities at temperature 1. The divergence is computed exactly on the
*coarsened* distributions over the k + 1 outcomes {the k ids, "everything else"}:
teacher tail mass ``1 - sum_i p_i``, student ``q_i`` at the ids plus its own remaining mass
``sum_{v not in ids} q_v`` (computed as a log-sum-exp over the complement, not as ``1 - sum``,
so a confident student's tiny tail is exact). By the data-processing inequality this is a true
divergence, never negative and at most the full one, and it equals the full one when the k
tokens carry all the mass. See ``sparse_divergence`` for temperature, padding slots and the
tail floor.
"""

from __future__ import annotations

import functools
import math

import torch

KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")

# Floor on the teacher's coarsened tail mass. A tail derived as 1 - sum(exp(logprobs)) from
# fp32 log-probs is only resolved to ~1e-7, and rounds to exactly 0 for a confident teacher;
# an exact 0 would make rkl (and jsd with beta = 1) infinite for any student with tail mass.
# 1e-10 is far below that resolution, so it never moves a tail the cache actually resolved.
TEACHER_TAIL_FLOOR = 1e-10

# Row blocks for the vocabulary-wide passes are sized to about 2**24 elements (64 MiB in fp32),
# so a pass over [N, V] logits allocates one small reusable scratch, not a second [N, V] tensor.
_BLOCK_ELEMENTS = 2**24
LOGIT_CHUNK_ELEMENTS = 2**24  # chunk_size=0 (auto): ~64 MiB of fp32 logits per chunk


def chunk_rows(chunk_size: int, vocab: int) -> int:
    """Rows of logits per chunk: `chunk_size` when > 0; 0 (auto) as many as fit in
    LOGIT_CHUNK_ELEMENTS (110 at Qwen3's 151,936, the whole batch at the tiny world's 128)."""
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: auto), got {chunk_size}")
    return chunk_size if chunk_size > 0 else max(1, LOGIT_CHUNK_ELEMENTS // vocab)
_IGNORE_INDEX = -100  # liger-kernel's label for a position that takes no loss


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every reduced-precision dtype; fp64 stays fp64 (gradcheck runs in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _scaled(logits: torch.Tensor, cdtype: torch.dtype, temperature: float) -> torch.Tensor:
    """logits / T in the compute dtype, without an extra [N, V] copy when T == 1."""
    logits = logits.to(cdtype)
    return logits if temperature == 1.0 else logits / temperature


def _check_args(kind: str, temperature: float, beta: float, alpha: float, reduction: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def _flat_mask(mask, lead_shape: torch.Size, device) -> torch.Tensor:
    """Mask as a flat bool [N]; None means every token counts."""
    if mask is None:
        return torch.ones(lead_shape.numel(), dtype=torch.bool, device=device)
    if mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(lead_shape)}")
    return mask.reshape(-1).to(device=device, dtype=torch.bool)


def _denominator(mask_n: torch.Tensor, num_tokens, reduction: str):
    """What the masked sum is divided by: 1 for 'sum', else the token count (at least 1)."""
    if num_tokens is not None and reduction != "mean":
        raise ValueError("num_tokens only applies to reduction='mean'")
    if reduction == "sum":
        return 1.0
    if num_tokens is None:
        return mask_n.sum().clamp_min(1)
    if torch.is_tensor(num_tokens):
        return num_tokens.clamp_min(1)
    return max(num_tokens, 1)


def _reduce(per_token_n, mask_n, lead_shape, reduction: str, num_tokens):
    """Zero masked tokens, then reduce. `where` rather than `* mask`: 0 * inf is NaN."""
    per_token_n = torch.where(mask_n, per_token_n, torch.zeros_like(per_token_n))
    if reduction == "none":
        if num_tokens is not None:
            raise ValueError("num_tokens only applies to reduction='mean'")
        return per_token_n.reshape(lead_shape)
    return per_token_n.sum() / _denominator(mask_n, num_tokens, reduction)


def _divergence_rows(logp_t, logq_s, kind: str, beta: float, alpha: float, valid=None):
    """Per-row divergence between two log-distributions over the last dim.

    ``logp_t`` (teacher) and ``logq_s`` (student) are log-probabilities, [n, K]. ``valid`` [n, K]
    marks the outcomes that exist (sparse padding slots, an empty tail); entries outside it must
    already be finite (sanitised by the caller) and contribute exactly 0 with a zero gradient.
    Returns [n], clamped at 0: each kind is >= 0 in exact arithmetic, and rounding at p == q
    otherwise gives values like -1e-9.
    """
    p = logp_t.exp()
    q = logq_s.exp()
    if valid is not None:
        p = p * valid
        q = q * valid

    def kl(w, log_a, log_b):  # sum_x w(x) (log a(x) - log b(x)), with w = a
        return (w * (log_a - log_b)).sum(-1)

    # Endpoints are the plain KLs exactly, not log(0) terms: jsd beta in {0, 1} as TRL/liger,
    # and skew alpha = 0 is the unskewed KL, alpha = 1 the divergence of a distribution to itself.
    if kind == "jsd" and beta == 0.0 or kind == "skew_fkl" and alpha == 0.0:
        kind = "fkl"
    elif kind == "jsd" and beta == 1.0 or kind == "skew_rkl" and alpha == 0.0:
        kind = "rkl"
    elif kind in ("skew_fkl", "skew_rkl") and alpha == 1.0:
        return (logq_s * 0.0).sum(-1)  # KL(x || x) = 0, kept on the graph

    if kind == "fkl":
        out = kl(p, logp_t, logq_s)
    elif kind == "rkl":
        out = kl(q, logq_s, logp_t)
    elif kind == "jsd":
        log_m = torch.logaddexp(logp_t + math.log(beta), logq_s + math.log1p(-beta))
        out = beta * kl(p, logp_t, log_m) + (1.0 - beta) * kl(q, logq_s, log_m)
    elif kind == "skew_fkl":
        log_m = torch.logaddexp(logp_t + math.log(alpha), logq_s + math.log1p(-alpha))
        out = kl(p, logp_t, log_m)
    elif kind == "skew_rkl":
        log_m = torch.logaddexp(logq_s + math.log(alpha), logp_t + math.log1p(-alpha))
        out = kl(q, logq_s, log_m)
    else:  # tvd
        out = 0.5 * (p - q).abs().sum(-1)
    return out.clamp_min(0.0)


# ----------------------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------------------


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between dense teacher and student logits, per token over the vocabulary.

    With ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)`` (fp32)::

        loss = T**2 * sum_{b,t} mask[b,t] * D_kind(p[b,t] || q[b,t]) / num_tokens

    ``D_kind`` as in the module docstring (fkl, rkl, jsd with ``beta``, skew_fkl / skew_rkl with
    ``alpha``, tvd) and ``num_tokens`` the unmasked count of this call unless given (module
    docstring, "Normalisation").

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``.
        teacher_logits: same shape. Not detached: compute it under ``torch.no_grad`` when the
            teacher is frozen.
        mask: ``[B, T]`` / ``[N]``, true where the token takes loss; None = all tokens.
        reduction: "mean" (default), "sum" or "none" (per-token ``[B, T]``, zeros where masked).
        num_tokens: the denominator of "mean" in place of this call's unmasked count.

    Returns a scalar (or ``[B, T]`` for ``reduction="none"``).
    """
    _check_args(kind, temperature, beta, alpha, reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the vocabularies must match"
        )
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    mask_n = _flat_mask(mask, lead_shape, student_logits.device)
    cdtype = _compute_dtype(student_logits.dtype)
    # fp32 log-softmax: bf16 loses the tail mass
    logq_nv = torch.log_softmax(_scaled(student_logits.reshape(-1, vocab), cdtype, temperature), -1)
    logp_nv = torch.log_softmax(_scaled(teacher_logits.reshape(-1, vocab), cdtype, temperature), -1)
    per_token_n = _divergence_rows(logp_nv, logq_nv, kind, beta, alpha) * temperature**2
    return _reduce(per_token_n, mask_n, lead_shape, reduction, num_tokens)


# ----------------------------------------------------------------------------------------------
# Sparse (cached top-k teacher): coarsening
# ----------------------------------------------------------------------------------------------


def _logsumexp_rows_(x_nv: torch.Tensor, scratch_bv: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp of ``x_nv``, in row blocks through ``scratch_bv`` (no [n, V] temporary).

    Rows that are all -inf give -inf (not NaN).
    """
    out_n = x_nv.new_empty(x_nv.shape[0])
    block = scratch_bv.shape[0]
    for start in range(0, x_nv.shape[0], block):
        x_bv = x_nv[start : start + block]
        buf_bv = scratch_bv[: x_bv.shape[0]]
        max_b1 = x_bv.amax(-1, keepdim=True)
        max_b1 = torch.where(torch.isfinite(max_b1), max_b1, torch.zeros_like(max_b1))
        torch.sub(x_bv, max_b1, out=buf_bv)
        out_n[start : start + block] = buf_bv.exp_().sum(-1).log_() + max_b1.squeeze(-1)
    return out_n


def _target_logprob_and_entropy(z_nv, targets_n, scratch_bv):
    """log softmax(z)[target] and the entropy of softmax(z) per row (T = 1), in row blocks
    through ``scratch_bv``: with e = exp(z - max), s = sum e, lse = max + log s,
    H = lse - sum(e z) / s. ``z_nv`` is left as it was."""
    logp_n, ent_n = z_nv.new_empty(z_nv.shape[0]), z_nv.new_empty(z_nv.shape[0])
    block = scratch_bv.shape[0]
    for start in range(0, z_nv.shape[0], block):
        z_bv = z_nv[start : start + block]
        e_bv = scratch_bv[: z_bv.shape[0]]
        max_b1 = z_bv.amax(-1, keepdim=True)
        torch.sub(z_bv, max_b1, out=e_bv).exp_()
        sum_b = e_bv.sum(-1)
        lse_b = max_b1.squeeze(-1) + sum_b.log()
        logp_n[start : start + block] = (
            z_bv.gather(-1, targets_n[start : start + block, None]).squeeze(-1) - lse_b)
        ent_n[start : start + block] = lse_b - e_bv.mul_(z_bv).sum(-1) / sum_b
    return logp_n, ent_n


def _mask_ids_and_lse_(z_nv, ids_nk, valid_nk, scratch_bv):
    """Coarsening statistics of logits rows; overwrites the id columns of ``z_nv`` with -inf.

    Returns ``zs_nk`` (the logits at the ids), ``lse_n`` (logsumexp over the vocabulary) and
    ``lse_c_n`` (logsumexp over the complement of the ids, -inf when it is empty). The student's
    coarsened log-probs are then ``zs - lse`` and ``lse_c - lse``. ``ids_nk`` must be valid indices
    (padding slots already redirected to a real id of the same row, see ``_safe_ids``).
    One vocabulary-wide pass: the full logsumexp combines the complement's with the ids' (a sum
    of positive parts, so exact; no 1 - sum cancellation).
    """
    zs_nk = z_nv.gather(-1, ids_nk)
    z_nv.scatter_(-1, ids_nk, float("-inf"))
    lse_c_n = _logsumexp_rows_(z_nv, scratch_bv)
    lse_s_n = torch.where(valid_nk, zs_nk, float("-inf")).logsumexp(-1)
    return zs_nk, torch.logaddexp(lse_c_n, lse_s_n), lse_c_n


def _coarsen_grad_(zm_nv, ids_nk, zs_nk, lse_n, lse_c_n, g_zs_nk, g_lse_n, g_lse_c_n, valid_nk):
    """Turn ``zm_nv`` (logits, -inf at the ids, from ``_mask_ids_and_lse_``) into dL/dz in place.

    For v outside the ids:  dL/dz_v = g_lse exp(z_v - lse) + g_lse_c exp(z_v - lse_c)
                                    = exp(z_v - lse_c) (g_lse exp(lse_c - lse) + g_lse_c)
    (both exponents <= 0, so nothing overflows however small the tail). At id_i:
    dL/dz = g_zs_i + g_lse exp(zs_i - lse), added with scatter_add so that a padding slot that
    points at a real id adds exactly 0.
    """
    finite = torch.isfinite(lse_c_n)
    lse_c_n = torch.where(finite, lse_c_n, lse_n)  # empty complement: no entry left to scale
    row_n = g_lse_n * (lse_c_n - lse_n).exp() + torch.where(finite, g_lse_c_n, 0.0)
    zm_nv.sub_(lse_c_n[:, None]).exp_().mul_(row_n[:, None])
    at_ids_nk = (g_zs_nk + g_lse_n[:, None] * (zs_nk - lse_n[:, None]).exp()) * valid_nk
    zm_nv.scatter_add_(-1, ids_nk, at_ids_nk)
    return zm_nv


def _scratch(rows: int, vocab: int, dtype, device) -> torch.Tensor:
    block = max(1, min(rows, _BLOCK_ELEMENTS // vocab))
    return torch.empty(block, vocab, dtype=dtype, device=device)


class _CoarsenStudent(torch.autograd.Function):
    """(logits [N, V], ids [N, k]) -> (zs [N, k], lse [N], lse_c [N]) with an analytic backward.

    Autograd through ``scatter`` + ``logsumexp`` would keep two extra [N, V] copies; this keeps
    only the input logits and allocates one [N, V] gradient in backward.
    """

    @staticmethod
    def forward(ctx, logits_nv, ids_nk, valid_nk):
        cdtype = _compute_dtype(logits_nv.dtype)
        n, vocab = logits_nv.shape
        scratch_bv = _scratch(n, vocab, cdtype, logits_nv.device)
        work_bv = torch.empty_like(scratch_bv)
        block = scratch_bv.shape[0]
        zs_nk = logits_nv.new_empty(ids_nk.shape, dtype=cdtype)
        lse_n = logits_nv.new_empty(n, dtype=cdtype)
        lse_c_n = logits_nv.new_empty(n, dtype=cdtype)
        for start in range(0, n, block):
            rows = slice(start, start + block)
            z_bv = work_bv[: min(block, n - start)].copy_(logits_nv[rows])
            zs_nk[rows], lse_n[rows], lse_c_n[rows] = _mask_ids_and_lse_(
                z_bv, ids_nk[rows], valid_nk[rows], scratch_bv
            )
        ctx.save_for_backward(logits_nv, ids_nk, valid_nk, zs_nk, lse_n, lse_c_n)
        return zs_nk, lse_n, lse_c_n

    @staticmethod
    def backward(ctx, g_zs_nk, g_lse_n, g_lse_c_n):
        logits_nv, ids_nk, valid_nk, zs_nk, lse_n, lse_c_n = ctx.saved_tensors
        n, vocab = logits_nv.shape
        grad_nv = logits_nv.new_empty(n, vocab, dtype=zs_nk.dtype)
        scratch_bv = _scratch(n, vocab, zs_nk.dtype, logits_nv.device)
        block = scratch_bv.shape[0]
        for start in range(0, n, block):
            rows = slice(start, start + block)
            grad_bv = grad_nv[rows].copy_(logits_nv[rows])
            grad_bv.scatter_(-1, ids_nk[rows], float("-inf"))
            _coarsen_grad_(
                grad_bv, ids_nk[rows], zs_nk[rows], lse_n[rows], lse_c_n[rows],
                g_zs_nk[rows], g_lse_n[rows], g_lse_c_n[rows], valid_nk[rows],
            )  # fmt: skip
        return grad_nv.to(logits_nv.dtype), None, None


def _safe_ids(ids_nk: torch.Tensor, valid_nk: torch.Tensor) -> torch.Tensor:
    """Empty slots -> the id of the row's first real slot, so scatter/gather stay in range and
    masking an id twice is harmless. Returns safe ids [n, k] int64."""
    first_n1 = valid_nk.to(torch.int8).argmax(-1, keepdim=True)  # first True (0 if none)
    slot_nk = torch.where(valid_nk, torch.arange(ids_nk.shape[-1], device=ids_nk.device), first_n1)
    return ids_nk.gather(-1, slot_nk).clamp_min(0).long()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _teacher_coarsened(teacher_logprobs_nk, valid_nk, teacher_tail_logprob_n, cdtype):
    """Teacher's unnormalised coarsened log-probs [n, k+1]: the k log-probs (0 in padding slots)
    and the tail log-mass, derived as log(1 - sum_i p_i) unless given, floored at
    ``TEACHER_TAIL_FLOOR``. Renormalised later, together with the tail's validity."""
    logp_nk = torch.where(valid_nk, teacher_logprobs_nk.detach().to(cdtype), 0.0)
    if teacher_tail_logprob_n is None:
        top_mass_n = torch.where(valid_nk, logp_nk, float("-inf")).logsumexp(-1)
        tail_n = _log1mexp(top_mass_n.clamp_max(0.0))  # rounding can push the sum past 1
    else:
        tail_n = teacher_tail_logprob_n.detach().to(cdtype)
    tail_n = tail_n.clamp_min(math.log(TEACHER_TAIL_FLOOR))
    return torch.cat([logp_nk, tail_n[:, None]], -1)


def _renormalise(x_nk: torch.Tensor, valid_nk: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid outcomes; invalid entries become 0 (finite, weight 0 later)."""
    norm_n1 = torch.where(valid_nk, x_nk, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.where(valid_nk, x_nk - norm_n1, 0.0)


def _coarsened_rows(zs_nk, lse_n, lse_c_n, teacher_nk1, valid_nk, kind, temperature, beta, alpha):
    """Per-token divergence on the coarsened support {k ids, tail}, times T**2. [n]

    Temperature acts on the coarsened distributions of *both* sides: ``p_T ∝ p^(1/T)`` over the
    k + 1 outcomes, the tail as one lumped outcome, and the same for the student's coarsened q.
    """
    valid_nk1 = torch.cat([valid_nk, torch.isfinite(lse_c_n)[:, None]], -1)
    student_nk1 = torch.cat([zs_nk - lse_n[:, None], (lse_c_n - lse_n)[:, None]], -1)
    logq_nk1 = _renormalise(student_nk1 / temperature, valid_nk1)
    logp_nk1 = _renormalise(teacher_nk1 / temperature, valid_nk1)
    per_token_n = _divergence_rows(logp_nk1, logq_nk1, kind, beta, alpha, valid_nk1)
    return per_token_n * temperature**2


def _sparse_inputs(teacher_ids, teacher_logprobs, teacher_tail_logprob, lead_shape):
    if teacher_ids.shape[:-1] != lead_shape or teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must both be {tuple(lead_shape)} + (k,)"
        )
    if teacher_tail_logprob is not None and teacher_tail_logprob.shape != lead_shape:
        raise ValueError(
            f"teacher_tail_logprob {tuple(teacher_tail_logprob.shape)} must be {tuple(lead_shape)}"
        )
    k = teacher_ids.shape[-1]
    ids_nk, logp_nk = teacher_ids.reshape(-1, k), teacher_logprobs.reshape(-1, k)
    # a slot with a -inf log-prob (a teacher-masked token) carries no mass: same as an empty one
    valid_nk = (ids_nk >= 0) & (logp_nk > float("-inf"))
    tail_n = None if teacher_tail_logprob is None else teacher_tail_logprob.reshape(-1)
    return _safe_ids(ids_nk, valid_nk), valid_nk, logp_nk, tail_n


def sparse_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    teacher_tail_logprob: torch.Tensor | None = None,
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence to a cached top-k teacher, exact on the coarsened support {k ids, the rest}.

    Per token, with ids ``S`` (k of them), teacher log-probs ``l_i`` and student logits ``z``::

        p_i = exp(l_i),            p_tail = 1 - sum_i p_i        (or exp(teacher_tail_logprob))
        q_i = softmax(z)[S_i],     q_tail = sum_{v not in S} softmax(z)_v
        loss = T**2 * sum_tokens mask * D_kind(temper(p) || temper(q)) / num_tokens

    with ``temper(x)_j = x_j^(1/T) / sum_j' x_j'^(1/T)`` over the k + 1 outcomes.

    Conventions:
      * Temperature: the same map acts on both coarsened distributions, so a student equal to
        the teacher gets 0 at any T, and with an empty tail (k = V) this is the dense tempered
        divergence exactly. The cache holds T = 1 log-probs and nothing about how the tail mass
        is spread, so the teacher's tail is tempered as one lumped outcome (its mass^(1/T)), not
        as ``sum_v p_v^(1/T)``; the student's tail is treated the same way. At T = 1 (the
        default) all of this is the identity and the value is exact.
      * ``teacher_logprobs`` are full-vocabulary log-softmax values at T = 1, not renormalised
        over the k ids. The derived tail is ``log(1 - exp(logsumexp(l)))`` (stable form), clamped
        to ``>= log(TEACHER_TAIL_FLOOR)`` because a rounded-to-zero tail would make rkl infinite;
        the k + 1 teacher probabilities are then renormalised (a no-op unless the floor or
        rounding acted). Pass ``teacher_tail_logprob`` when the cache stores it.
      * Padding: ids < 0 are empty slots (variable k per row); their log-probs are ignored, and a
        slot whose log-prob is -inf is treated as empty too (no mass either way). A row
        with no real slot has the single outcome "everything" and contributes 0 (it still counts
        in the "mean" denominator when unmasked). Real ids within a row must be distinct (top-k
        ids are); duplicates would count a token's mass twice.
      * The teacher is a constant: no gradient reaches ``teacher_logprobs``.
      * The result is clamped at 0 per token (rounding at p == q gives about -1e-9).

    Args:
        student_logits: ``[B, T, V]`` or ``[N, V]``, any float dtype (cast to fp32 inside, in row
            blocks; the backward allocates one fp32 ``[N, V]`` gradient).
        teacher_ids: ``[B, T, k]`` integer ids, ``-1`` for an empty slot.
        teacher_logprobs: ``[B, T, k]``.
        mask, reduction, num_tokens: as in ``divergence``.
        teacher_tail_logprob: optional ``[B, T]`` log of the teacher's mass outside the ids.
    """
    _check_args(kind, temperature, beta, alpha, reduction)
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    ids_nk, valid_nk, logp_nk, tail_n = _sparse_inputs(
        teacher_ids, teacher_logprobs, teacher_tail_logprob, lead_shape
    )
    mask_n = _flat_mask(mask, lead_shape, student_logits.device)
    cdtype = _compute_dtype(student_logits.dtype)
    zs_nk, lse_n, lse_c_n = _CoarsenStudent.apply(
        student_logits.reshape(-1, vocab), ids_nk, valid_nk
    )
    teacher_nk1 = _teacher_coarsened(logp_nk, valid_nk, tail_n, cdtype)
    per_token_n = _coarsened_rows(
        zs_nk, lse_n, lse_c_n, teacher_nk1, valid_nk, kind, temperature, beta, alpha
    )
    # A row with no real slot is the one-outcome distribution on both sides: exactly 0.
    per_token_n = torch.where(valid_nk.any(-1), per_token_n, 0.0)
    return _reduce(per_token_n, mask_n, lead_shape, reduction, num_tokens)


# ----------------------------------------------------------------------------------------------
# Sampled teacher (Sparse Logit Sampling)
# ----------------------------------------------------------------------------------------------


def sampled_forward_kl(
    student_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased Monte-Carlo forward KL from ids sampled from the teacher (arXiv 2503.16870).

    The k ids of a token were drawn *with replacement* from the teacher distribution ``p``
    (random-sampling KD with the teacher as its own proposal, so every importance weight is 1).
    Per token, with ``q = softmax(student_logits / T)`` over the full vocabulary::

        KL_hat = (1/k) sum_j [ log p(x_j) - log q(x_j) ],      x_j ~ p
        E[KL_hat] = KL(p || q)

    Without ``teacher_logprobs`` the ``log p`` term is dropped and the estimate is of the
    cross-entropy ``H(p, q)``; the gradient is the same (the teacher term is constant).
    ``teacher_logprobs`` must be the log-probs of the distribution the ids were drawn from:
    ``temperature`` softens the student only, so sample the teacher at the temperature you mean
    to match. The loss is scaled by T**2 like the other losses. A single token's estimate can be
    negative; only its expectation is a divergence. ids < 0 are empty draws (a row's estimate
    averages its real draws; a row with none contributes 0).

    Shapes: student_logits ``[B, T, V]`` / ``[N, V]``; sampled_ids and teacher_logprobs
    ``[B, T, k]``. mask, reduction, num_tokens as in ``divergence``.
    """
    _check_args("fkl", temperature, 0.5, 0.1, reduction)
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    if sampled_ids.shape[:-1] != lead_shape:
        raise ValueError(f"sampled_ids {tuple(sampled_ids.shape)} must be {tuple(lead_shape)}+(k,)")
    mask_n = _flat_mask(mask, lead_shape, student_logits.device)
    k = sampled_ids.shape[-1]
    ids_nk = sampled_ids.reshape(-1, k)
    valid_nk = ids_nk >= 0
    cdtype = _compute_dtype(student_logits.dtype)
    z_nv = _scaled(student_logits.reshape(-1, vocab), cdtype, temperature)
    logq_nk = z_nv.gather(-1, ids_nk.clamp_min(0).long()) - z_nv.logsumexp(-1, keepdim=True)
    terms_nk = -logq_nk
    if teacher_logprobs is not None:
        terms_nk = terms_nk + teacher_logprobs.reshape(-1, k).detach().to(logq_nk.dtype)
    terms_nk = torch.where(valid_nk, terms_nk, 0.0)
    per_token_n = terms_nk.sum(-1) / valid_nk.sum(-1).clamp_min(1) * temperature**2
    return _reduce(per_token_n, mask_n, lead_shape, reduction, num_tokens)


# ----------------------------------------------------------------------------------------------
# Fused LM head + sparse divergence
# ----------------------------------------------------------------------------------------------


class _FusedSparseDivergence(torch.autograd.Function):
    """Chunked ``sparse_divergence(hidden @ weight.T)``: forward computes the loss *and* the
    gradients chunk by chunk and keeps only ``grad_hidden`` and ``grad_weight`` for backward
    (liger-kernel's chunked-loss pattern). The logits gradient of a chunk is analytic
    (``_coarsen_grad_``) given the gradient w.r.t. the k + 1 coarsened log-probs, which comes
    from a small local autograd over [chunk, k + 1] tensors."""

    @staticmethod
    def forward(
        ctx, hidden_nh, weight_vh, ids_nk, valid_nk, teacher_nk1, rows_r, row_scale,
        kind, temperature, beta, alpha, chunk_size, targets_n,
    ):  # fmt: skip
        vocab = weight_vh.shape[0]
        cdtype = _compute_dtype(weight_vh.dtype)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden_nh = torch.zeros_like(hidden_nh) if need_hidden else None
        grad_weight_vh = torch.zeros_like(weight_vh) if need_weight else None
        loss = torch.zeros((), dtype=cdtype, device=hidden_nh.device)
        n_rows = rows_r.shape[0]
        chunk = max(1, min(chunk_size, n_rows))
        # One logits buffer for every chunk: a fresh [chunk, V] tensor per chunk costs page faults
        # on CPU and allocator churn on GPU. mm writes straight into it when dtypes agree.
        z_cv = torch.empty(chunk, vocab, dtype=cdtype, device=hidden_nh.device)
        low_cv = None  # bf16/fp16 weights: the matmul's own-dtype output, cast into z_cv
        if weight_vh.dtype != cdtype:
            low_cv = torch.empty_like(z_cv, dtype=weight_vh.dtype)
        scratch_bv = _scratch(chunk, vocab, cdtype, hidden_nh.device)
        # with targets: each row's log-prob of its target and entropy (T = 1) from the same
        # chunk of logits, so a caller's metrics need no second pass through the LM head
        stats = targets_n is not None
        logp_r = hidden_nh.new_empty(n_rows if stats else 0, dtype=cdtype)
        ent_r = torch.empty_like(logp_r)
        for start in range(0, n_rows, chunk):
            r_c = rows_r[start : start + chunk]
            c = r_c.shape[0]
            h_ch = hidden_nh.index_select(0, r_c)
            ids_ck, valid_ck = ids_nk[r_c], valid_nk[r_c]
            z = z_cv[:c]
            if low_cv is None:
                torch.mm(h_ch, weight_vh.t(), out=z)
            else:
                z.copy_(torch.mm(h_ch, weight_vh.t(), out=low_cv[:c]))  # bf16 logits, as plain
            if stats:
                logp_r[start : start + c], ent_r[start : start + c] = (
                    _target_logprob_and_entropy(z, targets_n[r_c], scratch_bv))
            zs_ck, lse_c1, lse_cc = _mask_ids_and_lse_(z, ids_ck, valid_ck, scratch_bv)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (zs_ck, lse_c1, lse_cc)]
                per_token_c = _coarsened_rows(
                    *leaves, teacher_nk1[r_c], valid_ck, kind, temperature, beta, alpha
                )
                chunk_loss = (per_token_c * row_scale).sum()
                g_zs, g_lse, g_lse_c = torch.autograd.grad(chunk_loss, leaves)
            loss += chunk_loss.detach()
            dz = _coarsen_grad_(z, ids_ck, zs_ck, lse_c1, lse_cc, g_zs, g_lse, g_lse_c, valid_ck)
            if low_cv is not None:
                dz = low_cv[:c].copy_(dz)
            if grad_hidden_nh is not None:
                grad_hidden_nh.index_copy_(0, r_c, dz @ weight_vh)
            if grad_weight_vh is not None:
                grad_weight_vh.addmm_(dz.t(), h_ch)
        ctx.save_for_backward(grad_hidden_nh, grad_weight_vh)
        ctx.mark_non_differentiable(logp_r, ent_r)
        return loss, logp_r, ent_r

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_ent):
        grad_hidden_nh, grad_weight_vh = ctx.saved_tensors
        # In place: `grad * grad_loss` would allocate a second [V, H] buffer, and that copy was
        # the fused path's peak. The buffers are ours alone, and one backward is all we support.
        for grad in (grad_hidden_nh, grad_weight_vh):
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return (grad_hidden_nh, grad_weight_vh) + (None,) * 11


def fused_sparse_divergence(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int = 0,
    teacher_tail_logprob: torch.Tensor | None = None,
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sparse_divergence(hidden @ lm_head_weight.T, ...)`` without materialising the logits.

    Same value and gradients (w.r.t. ``hidden`` and ``lm_head_weight``) as the plain call, and
    the same conventions (see ``sparse_divergence``: coarsened support, temperature on both
    coarsened sides, T**2, padding slots, tail floor, normalisation, empty mask = 0). Only the
    unmasked tokens are computed, ``chunk_size`` at a time (0: ``chunk_rows``' auto, ~64 MiB of
    fp32 logits): each chunk's fp32 logits ``[chunk_size, V]`` live in one reused buffer, and its gradient is formed analytically in that
    same buffer. Peak extra memory is therefore about ``chunk_size * V * 4`` bytes, a 64 MiB
    scratch, and ``grad_weight`` (``[V, H]`` in the weight's dtype, which the plain path also
    produces), instead of two ``[N, V]`` fp32 tensors (logits and their gradient).

    The logits ``hidden @ weight.T`` are computed in the inputs' dtype and then cast to fp32,
    exactly as the plain path does; ``grad_weight`` accumulates in the weight's dtype (as
    liger-kernel). Gradients are computed in the forward, so the returned loss supports one
    backward, and ``reduction="none"`` is not offered (it would need per-token gradients).
    No bias (Qwen3's LM head has none).

    With ``targets`` (token ids shaped like the mask: the tokens each position predicts) it
    returns ``(loss, target_logprob, entropy)``, the last two ``[B, T]`` (or ``[N]``) fp32
    without gradient: the student's full-vocabulary log-prob of each target and the entropy of
    its softmax at T = 1, read from the same chunks of logits (0 where masked or where no
    teacher id is real), so training metrics cost no second pass through the LM head.

    Shapes: hidden ``[B, T, H]`` or ``[N, H]``; lm_head_weight ``[V, H]``; teacher_ids /
    teacher_logprobs ``[B, T, k]``; mask ``[B, T]``; teacher_tail_logprob ``[B, T]``.
    """
    _check_args(kind, temperature, beta, alpha, reduction)
    if reduction == "none":
        raise ValueError("fused_sparse_divergence supports reduction 'mean' or 'sum', not 'none'")
    chunk_size = chunk_rows(chunk_size, lm_head_weight.shape[0])
    lead_shape = hidden.shape[:-1]
    hidden_nh = hidden.reshape(-1, hidden.shape[-1])
    if lm_head_weight.shape[1] != hidden_nh.shape[1]:
        raise ValueError(
            f"lm_head_weight {tuple(lm_head_weight.shape)} does not match hidden size "
            f"{hidden_nh.shape[1]}"
        )
    ids_nk, valid_nk, logp_nk, tail_n = _sparse_inputs(
        teacher_ids, teacher_logprobs, teacher_tail_logprob, lead_shape
    )
    mask_n = _flat_mask(mask, lead_shape, hidden.device)
    cdtype = _compute_dtype(lm_head_weight.dtype)
    teacher_nk1 = _teacher_coarsened(logp_nk, valid_nk, tail_n, cdtype)
    # Rows that take loss: unmasked and with at least one real id (others are exactly 0).
    rows_r = torch.nonzero(mask_n & valid_nk.any(-1)).squeeze(-1)
    row_scale = 1.0 / _denominator(mask_n, num_tokens, reduction)
    if torch.is_tensor(row_scale):
        row_scale = row_scale.to(cdtype)
    targets_n = None if targets is None else targets.reshape(-1).to(hidden.device)
    loss, logp_r, ent_r = _FusedSparseDivergence.apply(
        hidden_nh, lm_head_weight, ids_nk, valid_nk, teacher_nk1, rows_r, row_scale,
        kind, temperature, beta, alpha, chunk_size, targets_n,
    )  # fmt: skip
    if targets is None:
        return loss
    logp_n = hidden_nh.new_zeros(hidden_nh.shape[0], dtype=logp_r.dtype)
    ent_n = torch.zeros_like(logp_n)
    logp_n[rows_r], ent_n[rows_r] = logp_r, ent_r
    return loss, logp_n.reshape(lead_shape), ent_n.reshape(lead_shape)


# ----------------------------------------------------------------------------------------------
# Fused LM heads + dense JSD, in-process teacher (liger-kernel)
# ----------------------------------------------------------------------------------------------


def fused_dense_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    compiled: bool = False,
) -> torch.Tensor:
    """``divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T,
    kind="jsd")`` through liger-kernel's ``LigerFusedLinearJSDFunction`` (chunked, CPU or GPU).

    Liger's conventions checked against ours (liger-kernel 0.8.5, chunked_loss/jsd_loss.py):
      * beta: the same. Mixture ``m = beta p_teacher + (1 - beta) q_student`` and loss
        ``beta KL(p||m) + (1 - beta) KL(q||m)``; beta = 0 is forward KL, beta = 1 reverse KL,
        both special-cased exactly.
      * temperature: liger divides both logits by T but does not multiply by T**2; this wrapper
        does, to agree with ``divergence``.
      * masking: liger takes ``ignore_index`` labels; the mask becomes labels 0 / -100 (the hard
        cross-entropy term is weighted 0 and so not computed) and liger divides by the number of
        unmasked tokens (at least 1), i.e. ``reduction="mean"``. ``num_tokens`` rescales to a
        global denominator; ``"sum"`` multiplies the count back.
      * precision: liger's own JSD takes its log-softmax in the *input* dtype (bf16 inputs: a
        bf16 log-softmax, ~1e-3 off). This wrapper runs it through ``_liger_fp32_jsd``, which
        casts each chunk's logits to fp32 first, so like every divergence here the log-softmax
        is fp32; the logits themselves are the inputs' matmul, as in the plain path.
      * chunking: liger splits the N tokens into ``max(1, N // chunk_size)`` chunks, so a chunk can
        hold up to ``2 * chunk_size - 1`` tokens. ``compiled=True`` torch.compiles the chunk step
        (worth it on GPU; off by default because on CPU it needs a C++ toolchain and compile time).
      * gradients reach the student's hidden states and weight only (the teacher is a constant).

    Shapes: ``*_hidden`` ``[B, T, H_s]`` / ``[B, T, H_t]`` (or ``[N, H]``), ``*_weight`` ``[V, H]``,
    mask ``[B, T]``.
    """
    _check_args("jsd", temperature, beta, 0.1, reduction)
    if reduction == "none":
        raise ValueError("fused_dense_jsd supports reduction 'mean' or 'sum', not 'none'")
    lead_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead_shape:
        raise ValueError("student and teacher hidden states must cover the same tokens")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError("student and teacher LM heads must have the same vocabulary size")
    mask_n = _flat_mask(mask, lead_shape, student_hidden.device)
    labels_n = torch.where(mask_n, 0, _IGNORE_INDEX)
    loss = _liger_fp32_jsd().apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight,
        labels_n,
        None,  # student_bias
        None,  # teacher_bias
        0.0,  # weight_hard_loss: no cross-entropy term
        1.0,  # weight_soft_loss
        beta,
        _IGNORE_INDEX,
        temperature,
        compiled,
        chunk_size,
        False,  # return_soft_hard_loss
    )
    # liger returns sum / max(count, 1); turn that into our reduction, then apply T**2
    count = mask_n.sum().clamp_min(1)
    return loss * (count / _denominator(mask_n, num_tokens, reduction)) * temperature**2


@functools.cache
def _liger_fp32_jsd():
    """liger-kernel's fused linear JSD with the chunk's logits cast to fp32 before its
    log-softmax (liger's base class calls the subclass's ``distillation_loss_fn`` per chunk)."""
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    class _FP32JSD(LigerFusedLinearJSDFunction):
        @staticmethod
        def distillation_loss_fn(student_logits, teacher_logits, *args, **kwargs):
            # fp32 log-softmax: bf16 rounds the log-probs of a large vocabulary to 1/32
            return LigerFusedLinearJSDFunction.distillation_loss_fn(
                student_logits.float(), teacher_logits.float(), *args, **kwargs)

    return _FP32JSD
