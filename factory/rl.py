"""Reinforcement learning pieces as pure functions: GRPO's advantages and clipped loss, the k3 KL
estimator, the adaptive entropy coefficient, per-token log-probs and entropies through a chunked
LM head, and the rule rewards of general RL. factory/stages/four_stage.py wires them into the
one training loop.

GRPO (DeepSeekMath, arXiv 2402.03300) as used here, per sampled token t of response i in group g:

    A_i       = (r_i - mean_g r) / std_g r        group-normalised advantage (0 when std_g = 0)
    rho_t     = exp(log pi(y_t) - log pi_old(y_t))  importance ratio to the sampling policy
    pg_t      = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i)
    kl_t      = k3(pi || pi_ref) = exp(q_t) - q_t - 1,  q_t = log pi_ref(y_t) - log pi(y_t)
    loss      = sum_t (pg_t + kl_coef kl_t - entropy_coef H_t) / N

with H_t the entropy of the policy's whole next-token distribution at t. Normalisation is per
token over the global count (DAPO, arXiv 2503.14476): N is the number of response tokens in the
whole optimizer step (every micro-batch), so micro-batch losses add up to the step's per-token
mean and a long response weighs in proportion to its length. `eps_high > eps_low` is DAPO's
clip-higher. std is the population std of the group (defined for any group size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from factory import chat
from factory.losses import chunk_rows

ENTROPY_UPDATES = ("additive", "multiplicative")
_FORWARD_BLOCK_ELEMENTS = 2**24  # logits per forward chunk of token_logprobs_and_entropy


# --------------------------------------------------------------------------------- advantages

def group_advantages(rewards_pg: torch.Tensor, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages `[P, G]` for P prompts with G samples each.

    A = (r - mean) / std over each group (population std); with `normalize_std=False`, A = r - mean
    (Dr. GRPO, arXiv 2503.20783). A group whose rewards are all equal (std <= eps) carries no
    signal: its advantages are exactly 0, never NaN.
    """
    r = rewards_pg.double()  # fp64: a group of equal float rewards must centre to exactly 0
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, unbiased=False, keepdim=True)
    centered = r - mean
    scaled = centered / std.clamp_min(eps) if normalize_std else centered
    return torch.where(std > eps, scaled, torch.zeros_like(scaled)).to(rewards_pg.dtype)


# --------------------------------------------------------------------------------- the loss

def k3_kl(logp_n: torch.Tensor, ref_logp_n: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman,
    "Approximating KL divergence", 2020): exp(q) - q - 1 with q = log pi_ref - log pi.
    Unbiased, never negative, and 0 exactly where the two log-probs agree."""
    q = ref_logp_n - logp_n
    return torch.exp(q) - q - 1.0


def grpo_loss(
    logp_n: torch.Tensor,
    old_logp_n: torch.Tensor,
    advantages_n: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    num_tokens: int,
    ref_logp_n: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy_n: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate over N response tokens (module docstring), summed and divided by
    `num_tokens` (the step's response-token count, all micro-batches).

    logp_n: log pi(y_t) with grad; old_logp_n: the sampling policy's, no grad; advantages_n: the
    response's advantage repeated on each of its tokens; ref_logp_n: the frozen reference's (only
    read when kl_coef != 0 or for the `kl` metric); entropy_n: H_t with grad (the bonus).
    Returns the loss and metrics over these tokens: pg_loss, clip_frac (share of tokens whose
    clipped term is the active one), ratio (mean), kl_old (k3 to the sampling policy), and kl
    and entropy where given.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    n = logp_n.numel()
    ratio_n = torch.exp(logp_n - old_logp_n)
    unclipped_n = ratio_n * advantages_n
    clipped_n = ratio_n.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages_n
    per_token_n = -torch.minimum(unclipped_n, clipped_n)
    with torch.no_grad():
        is_clipped_n = ((advantages_n > 0) & (ratio_n > 1.0 + eps_high)) | (
            (advantages_n < 0) & (ratio_n < 1.0 - eps_low))
        metrics = {
            "pg_loss": float(per_token_n.sum()) / max(n, 1),
            "clip_frac": float(is_clipped_n.float().sum()) / max(n, 1),
            "ratio": float(ratio_n.sum()) / max(n, 1),
            "kl_old": float(k3_kl(logp_n, old_logp_n).sum()) / max(n, 1),
        }
    if ref_logp_n is not None:
        kl_n = k3_kl(logp_n, ref_logp_n)
        metrics["kl"] = float(kl_n.detach().sum()) / max(n, 1)
        if kl_coef != 0.0:
            per_token_n = per_token_n + kl_coef * kl_n
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logp_n, the reference policy's log-probs")
    if entropy_n is not None:
        metrics["entropy"] = float(entropy_n.detach().sum()) / max(n, 1)
        if entropy_coef != 0.0:
            per_token_n = per_token_n - entropy_coef * entropy_n
    return per_token_n.sum() / num_tokens, metrics


# --------------------------------------------------------------------------------- entropy control

@dataclass
class EntropyController:
    """An entropy bonus coefficient steered by the measured token entropy, no schedule.

    After each optimizer step `update(entropy)`: below [target_low, target_high] the coefficient
    is raised (the bonus pushes entropy up), above it lowered, inside left alone; always clamped
    to [0, max_coef]. "additive" moves it by `rate`; "multiplicative" by the factor 1 + rate,
    raising from at least `min_coef` (a coefficient at 0 cannot grow by a factor) and dropping to
    0 once lowered below it. `enabled=False` holds `coef` fixed (the "entropy control off" arm).
    Its state (`coef`) is saved with the training checkpoint (factory/loop.py `extra_state`).
    """

    coef: float
    target_low: float
    target_high: float
    rate: float
    rule: str = "additive"
    min_coef: float = 0.0
    max_coef: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.rule not in ENTROPY_UPDATES:
            raise ValueError(f"entropy update must be one of {ENTROPY_UPDATES}, "
                             f"got {self.rule!r}")
        if not 0.0 <= self.target_low <= self.target_high:
            raise ValueError(f"entropy target band needs 0 <= low <= high, got "
                             f"[{self.target_low}, {self.target_high}]")
        if self.rate < 0 or self.max_coef < 0 or self.min_coef < 0:
            raise ValueError("entropy rate, min_coef and max_coef must be >= 0")
        if self.rule == "multiplicative" and self.min_coef <= 0:
            raise ValueError("multiplicative entropy control needs min_coef > 0 to grow from 0")

    def update(self, entropy: float) -> float:
        """Move the coefficient for the measured mean token entropy (nats); returns the new one."""
        if not self.enabled or not math.isfinite(entropy):
            return self.coef
        direction = 1 if entropy < self.target_low else -1 if entropy > self.target_high else 0
        coef = self.coef
        if self.rule == "additive":
            coef += direction * self.rate
        elif direction > 0:
            coef = max(coef, self.min_coef) * (1.0 + self.rate)
        elif direction < 0:
            coef /= 1.0 + self.rate
            if coef < self.min_coef:
                coef = 0.0
        self.coef = min(max(coef, 0.0), self.max_coef)
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


# --------------------------------------------------------------------------------- chunked head

class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Per-token log-prob of the target and entropy of softmax(h W^T / T), chunk by chunk.

    Forward keeps only [N] outputs; backward recomputes each chunk's logits and forms the logits'
    gradient analytically (z = h W^T / T, p = softmax(z), H = -sum p log p):
        d log p_y / dz = onehot(y) - p        dH / dz = -p (log p + H)
    so at most one chunk's [chunk, V] logits (fp32) exist at a time, forward or backward.
    """

    @staticmethod
    def forward(ctx, hidden_nh, weight_vh, targets_n, temperature, chunk_size):
        n, vocab = hidden_nh.shape[0], weight_vh.shape[0]
        logp_n = hidden_nh.new_empty(n, dtype=torch.float32)
        ent_n = hidden_nh.new_empty(n, dtype=torch.float32)
        w = weight_vh.float()
        # The forward keeps only [N] outputs, so its chunks need not be chunk_size rows: two
        # reused [rows, V] fp32 buffers of at most 2**24 elements (64 MiB each), whatever the
        # vocabulary. With log p = z - lse and p = e / s, e = exp(z - max), s = sum e:
        #   H = -sum p log p = lse - sum(e z) / s
        rows = max(1, min(chunk_size, n, _FORWARD_BLOCK_ELEMENTS // vocab))
        z_buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden_nh.device)
        e_buf = torch.empty_like(z_buf)
        for s in range(0, n, rows):
            h_cd = hidden_nh[s:s + rows].float()
            z_cv, e_cv = z_buf[:h_cd.shape[0]], e_buf[:h_cd.shape[0]]
            torch.mm(h_cd, w.T, out=z_cv)
            if temperature != 1.0:
                z_cv.div_(temperature)
            max_c1 = z_cv.amax(-1, keepdim=True)
            torch.sub(z_cv, max_c1, out=e_cv).exp_()
            sum_c = e_cv.sum(-1)
            lse_c = max_c1[:, 0] + sum_c.log()
            logp_n[s:s + rows] = z_cv.gather(-1, targets_n[s:s + rows, None])[:, 0] - lse_c
            ent_n[s:s + rows] = lse_c - e_cv.mul_(z_cv).sum(-1) / sum_c
        ctx.save_for_backward(hidden_nh, weight_vh, targets_n)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp_n, ent_n

    @staticmethod
    def backward(ctx, g_logp_n, g_ent_n):
        hidden_nh, weight_vh, targets_n = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk_size
        w = weight_vh.float()
        g_hidden = torch.zeros_like(hidden_nh, dtype=torch.float32)
        g_weight = torch.zeros_like(w)
        g_logp_n = torch.zeros(hidden_nh.shape[0], device=hidden_nh.device) if g_logp_n is None \
            else g_logp_n.float()
        g_ent_n = torch.zeros_like(g_logp_n) if g_ent_n is None else g_ent_n.float()
        for s in range(0, hidden_nh.shape[0], chunk):
            h_ch = hidden_nh[s:s + chunk].float()
            lp_cv = ((h_ch @ w.T) / t).log_softmax(-1)
            p_cv = lp_cv.exp()
            ent_c = -(p_cv * lp_cv).sum(-1)
            g_lp, g_ent = g_logp_n[s:s + chunk, None], g_ent_n[s:s + chunk, None]
            gz_cv = -p_cv * g_lp - g_ent * p_cv * (lp_cv + ent_c[:, None])
            gz_cv.scatter_add_(-1, targets_n[s:s + chunk, None], g_lp)
            gz_cv /= t
            g_hidden[s:s + chunk] = gz_cv @ w
            g_weight += gz_cv.T @ h_ch
        return (g_hidden.to(hidden_nh.dtype) if ctx.needs_input_grad[0] else None,
                g_weight.to(weight_vh.dtype) if ctx.needs_input_grad[1] else None,
                None, None, None)


def token_logprobs_and_entropy(hidden_nh: torch.Tensor, weight_vh: torch.Tensor,
                               targets_n: torch.Tensor, *, temperature: float = 1.0,
                               chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h W^T / T)[y] and the entropy of softmax(h W^T / T), both `[N]` fp32 with
    gradients to `hidden_nh` and `weight_vh`, computed `chunk_size` rows at a time so the `[N, V]`
    logits never exist (peak extra memory about chunk_size * V * 4 bytes, times a few; 0: the
    chunk `factory.losses.chunk_rows` picks).

    hidden_nh: the final (normed) hidden states at the positions that predict `targets_n`;
    weight_vh: the LM head. liger-kernel's LigerFusedLinearGRPOLoss (0.8.5) is not used: it has
    no entropy term, which entropy control needs with a gradient.
    """
    chunk_size = chunk_rows(chunk_size, weight_vh.shape[0])  # 0: auto, ~64 MiB of logits
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _ChunkedLogprobEntropy.apply(hidden_nh, weight_vh, targets_n, float(temperature),
                                        int(chunk_size))


def final_hidden_states(model, input_ids_bt: torch.Tensor, attention_mask_bt: torch.Tensor | None,
                        position_ids_bt: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normed hidden states `[B, T, H]`, LM-head weight `[V, H]`) of a causal LM.

    The forward goes through `model` itself (so a DDP/accelerate wrapper sees it and autocast
    applies) with `logits_to_keep=1`, which skips the full logits; the last entry of
    `hidden_states` is the final norm's output, the one the head reads. Packed rows (several
    sequences back to back) pass `position_ids_bt` restarting at each sequence and no attention
    mask: transformers then masks attention block-causally, sequence by sequence.
    """
    out = model(input_ids=input_ids_bt, attention_mask=attention_mask_bt,
                position_ids=position_ids_bt, output_hidden_states=True, logits_to_keep=1,
                use_cache=False)
    return out.hidden_states[-1], getattr(model, "module", model).get_output_embeddings().weight


# --------------------------------------------------------------------------------- rule rewards

def correct_reward(grade: Callable[[str], bool], text: str) -> float:
    """1.0 when the answer part of the completion (after its think block, chat.split_response)
    is graded correct by the task's verifier `grade(answer)`, else 0.0. An unclosed think block
    has no answer: 0.0."""
    _, answer = chat.split_response(text)
    return float(bool(answer) and grade(answer))


def format_reward(text: str, finished: bool, extract: Callable[[str], Any]) -> float:
    """1.0 for a well-formed completion: it ended on its own (a stop token, not the length cap),
    any think block is closed, and the answer part holds a parseable final answer
    (`extract(answer)` is not None: for arith, an integer)."""
    if not finished:
        return 0.0
    _, answer = chat.split_response(text)
    return float(bool(answer) and extract(answer) is not None)


def follow_reward(text: str, mode: str | None) -> float:
    """1.0 when the completion obeys the latest mode flag (chat.follows_mode: a think block with
    content under /think; none or an empty one under /no_think)."""
    return float(chat.follows_mode(text, mode))


def length_reward(n_tokens: int, target: int, tolerance: float) -> float:
    """Length control against a per-prompt target: 1.0 up to `target` tokens, falling linearly to
    0.0 at target * (1 + tolerance), 0.0 beyond (tolerance 0: a hard cut at the target)."""
    if target < 1 or tolerance < 0:
        raise ValueError(f"length target must be >= 1 and tolerance >= 0, got {target}, "
                         f"{tolerance}")
    if n_tokens <= target:
        return 1.0
    over = n_tokens - target
    slack = target * tolerance
    return 0.0 if slack <= 0 else max(0.0, 1.0 - over / slack)


def weighted_reward(parts: dict[str, float], weights: dict[str, float]) -> float:
    """sum_k weights[k] * parts[k]; every weighted part must be present."""
    missing = set(weights) - set(parts)
    if missing:
        raise KeyError(f"rewards {sorted(missing)} are weighted but were not computed")
    return float(sum(w * parts[k] for k, w in weights.items()))
