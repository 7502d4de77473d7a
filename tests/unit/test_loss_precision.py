"""Every divergence takes its log-softmax in fp32, whatever the inputs' dtype (issue 9).

With bf16 logits over a few thousand tokens, a bf16 log-softmax rounds each log-prob (about -8
here) to a step of 1/32, and the divergence comes out about 1e-3 off, relative. Each loss below
gets bf16 inputs and must equal, to fp32 rounding (~1e-7 measured), the float64 divergence of
exactly those bf16 values (their logits from the same bf16 matmul); the naive bf16 log-softmax
is checked to miss by far more, so the comparison tells the two apart.
"""

import pytest
import torch

from factory.losses import (
    divergence,
    fused_dense_jsd,
    fused_sparse_divergence,
    sampled_forward_kl,
    sparse_divergence,
)

pytestmark = pytest.mark.unit

N, V, H, K = 12, 4096, 32, 16
TOL = 1e-5  # fp32 arithmetic on bf16 inputs gives ~1e-7; a bf16 log-softmax ~1e-3 (asserted)


def _bf16(*shape, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)


def _rel(got, want):
    return abs(float(got) - float(want)) / abs(float(want))


def _naive_bf16_fkl(student_nv, teacher_nv):
    """Forward KL with the log-softmax in bf16: what the losses must not do."""
    logp, logq = teacher_nv.log_softmax(-1), student_nv.log_softmax(-1)  # bf16 in, bf16 out
    return (logp.float().exp() * (logp.float() - logq.float())).sum(-1).mean()


@pytest.fixture(scope="module")
def logits():
    student_nv = _bf16(N, V, scale=3.0, seed=0)
    teacher_nv = _bf16(N, V, scale=3.0, seed=1)
    return student_nv, teacher_nv


def test_the_naive_bf16_log_softmax_is_measurably_off(logits):
    student_nv, teacher_nv = logits
    exact = divergence(student_nv.double(), teacher_nv.double(), kind="fkl")
    assert _rel(_naive_bf16_fkl(student_nv, teacher_nv), exact) > 10 * TOL


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"])
def test_dense_divergence_of_bf16_logits_is_fp32(logits, kind):
    student_nv, teacher_nv = logits
    got = divergence(student_nv, teacher_nv, kind=kind)
    assert got.dtype == torch.float32
    assert _rel(got, divergence(student_nv.double(), teacher_nv.double(), kind=kind)) < TOL


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_sparse_and_fused_sparse_of_bf16_are_fp32(kind):
    hidden_nh, weight_vh = _bf16(N, H, scale=1.0, seed=2), _bf16(V, H, scale=0.6, seed=3)
    teacher_nv = _bf16(N, V, scale=3.0, seed=4).double()
    logprobs_nk, ids_nk = teacher_nv.log_softmax(-1).topk(K)
    logits_nv = hidden_nh @ weight_vh.T  # the bf16 matmul both paths compute
    want = sparse_divergence(logits_nv.double(), ids_nk, logprobs_nk, kind=kind)
    got = sparse_divergence(logits_nv, ids_nk, logprobs_nk.float(), kind=kind)
    fused = fused_sparse_divergence(hidden_nh, weight_vh, ids_nk, logprobs_nk.float(), kind=kind,
                                    chunk_size=5)
    assert got.dtype == fused.dtype == torch.float32
    assert _rel(got, want) < TOL and _rel(fused, want) < TOL


def test_sampled_forward_kl_of_bf16_is_fp32(logits):
    student_nv, teacher_nv = logits
    gen = torch.Generator().manual_seed(5)
    ids_nk = torch.multinomial(teacher_nv.float().softmax(-1), K, True, generator=gen)
    teacher_lp_nk = teacher_nv.double().log_softmax(-1).gather(-1, ids_nk)
    want = sampled_forward_kl(student_nv.double(), ids_nk, teacher_lp_nk)
    got = sampled_forward_kl(student_nv, ids_nk, teacher_lp_nk.float())
    assert got.dtype == torch.float32 and _rel(got, want) < TOL


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_fused_jsd_of_bf16_is_fp32(beta):
    hidden_nh, weight_vh = _bf16(N, H, scale=1.0, seed=6), _bf16(V, H, scale=0.6, seed=7)
    t_hidden_nh, t_weight_vh = _bf16(N, H, scale=1.0, seed=8), _bf16(V, H, scale=0.6, seed=9)
    student_nv, teacher_nv = hidden_nh @ weight_vh.T, t_hidden_nh @ t_weight_vh.T
    want = divergence(student_nv.double(), teacher_nv.double(), kind="jsd", beta=beta)
    got = fused_dense_jsd(hidden_nh, weight_vh, t_hidden_nh, t_weight_vh, beta=beta,
                          chunk_size=4)
    assert _rel(got, want) < TOL
