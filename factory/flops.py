"""Cost by formula: FLOPs per token and weight bytes (DESIGN.md "Cost ledger").

N, the parameter count the FLOPs formulas use, is the matmul parameters one token passes through:
the active parameters (a MoE counts only its routed experts: Qwen3-235B-A22B is 22B, not 235B)
including the LM-head matmul, excluding the input-embedding lookup (a gather, no FLOPs). For a
tied-embedding card the shared matrix is counted once, as the LM head. Attention's
score/value products (which grow with context length) are left out, as in Kaplan et al.'s
6·N·D; at Qwen3's sizes and a few thousand tokens of context they add a few percent.
"""

from __future__ import annotations

from factory.errors import ConfigError

# bytes per weight; "8bit"/"4bit" are bitsandbytes loads (quantization scales not counted)
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8bit": 1.0, "4bit": 0.5}


def flops_params(active_non_embedding: int, vocab_size: int, hidden_size: int) -> int:
    """N for the FLOPs formulas: active non-embedding parameters + the LM head (vocab x hidden)."""
    return active_non_embedding + vocab_size * hidden_size


def train_flops(n_active: int, tokens: int) -> float:
    """Forward + backward: 6·N·tokens (2 for the forward matmuls, 4 for the two backward ones)."""
    return 6.0 * n_active * tokens


def forward_flops(n_active: int, tokens: int) -> float:
    """Forward only (generation, scoring, logit recording): 2·N·tokens."""
    return 2.0 * n_active * tokens


def weights_bytes(total_params: int, dtype: str) -> float:
    """Bytes the weights take in `dtype` (every parameter, routed or not, must be resident)."""
    if dtype not in BYTES_PER_PARAM:
        raise ConfigError(f"unknown dtype {dtype!r}: expected one of {', '.join(BYTES_PER_PARAM)}")
    return total_params * BYTES_PER_PARAM[dtype]


# Dense bf16 tensor-core peak of an H100 SXM, no sparsity (REFERENCE.md "Cost anchors"). The
# report's projection (reports/tables.py) uses the same number; reports never import factory, so
# tests/unit/test_dry_run.py checks that the two agree.
H100_PEAK_FLOPS = 989e12


def projected_h100_hours(flops: float, utilization: float) -> float:
    """H100-hours for `flops` at `utilization` of the dense bf16 peak (trainer.h100_utilization):
    a projection, not a measurement (DESIGN.md "Cost ledger")."""
    if not 0 < utilization <= 1:
        raise ConfigError(f"trainer.h100_utilization must be in (0, 1], got {utilization}; "
                          f"well-tuned 8-14B training reaches 0.35-0.40 (REFERENCE.md)")
    return flops / (H100_PEAK_FLOPS * utilization) / 3600
