"""The gpu tier: liger-kernel's Triton kernels on a Qwen3 student, and factory.losses and
factory.sampling on CUDA. Skipped without CUDA.

    python -m pytest -m gpu -q tests/gpu

Shapes are small (the tiny card, widened by overrides so the kernels see more than one block),
so the tier takes seconds plus Triton's first compile; scripts/gpu_check.py repeats these checks
at Qwen3-0.6B shape and times them. The helpers and bounds are gpu_check's, loaded from the
script. liger is imported inside the tests only, so no Triton kernel is loaded on a CPU machine,
not even at collection.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from factory import losses as L

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the gpu tier)"),
]

CUDA = torch.device("cuda")
# the tiny card widened: hidden 128 (RMSNorm rows), head_dim 32 (RoPE), vocab 1024 (FLCE chunks)
ARCH = dict(hidden_size=128, intermediate_size=384, head_dim=32, vocab_size=1024)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def gpu_check():
    """scripts/gpu_check.py as a module (scripts/ is no package): its helpers, not copies."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def card(gpu_check):
    return gpu_check.load_card("tiny", **ARCH)


def _ids(card, batch: int = 2, seq: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids_bt = torch.randint(0, card.arch.vocab_size, (batch, seq), device=CUDA)
    labels_bt = ids_bt.clone()
    labels_bt[:, : seq // 4] = -100  # a prompt that takes no loss
    return ids_bt, labels_bt


def _dense_inputs(vocab: int = 4096):
    torch.manual_seed(2)
    student_btv = (torch.randn(2, 32, vocab, device=CUDA) * 2.0).bfloat16()
    teacher_btv = (student_btv.float() + torch.randn(2, 32, vocab, device=CUDA)).bfloat16()
    mask_bt = torch.rand(2, 32, device=CUDA) > 0.2
    t_logp_btk, t_ids_btk = teacher_btv.float().log_softmax(-1).topk(16, -1)
    return student_btv, teacher_btv, mask_bt, t_ids_btk, t_logp_btk


def _assert_within(res: dict, bounds: tuple[float, float]) -> None:
    assert res["finite"]
    assert res["value_rel"] <= bounds[0], res
    assert res["grad_rel"] <= bounds[1], res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", L.KINDS)
def test_divergence_on_cuda_matches_fp64(gpu_check, kind, dtype):
    student_btv, teacher_btv, mask_bt, _, _ = _dense_inputs()
    res = gpu_check.compare_loss(
        lambda z, t: L.divergence(z, t, mask_bt, kind), [student_btv], [teacher_btv], DTYPES[dtype]
    )
    _assert_within(res, gpu_check.LOSS_BOUNDS[("divergence", dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", L.KINDS)
def test_sparse_divergence_on_cuda_matches_fp64(gpu_check, kind, dtype):
    student_btv, _, mask_bt, t_ids_btk, t_logp_btk = _dense_inputs()
    res = gpu_check.compare_loss(
        lambda z: L.sparse_divergence(z, t_ids_btk, t_logp_btk, mask_bt, kind),
        [student_btv], [], DTYPES[dtype],
    )  # fmt: skip
    _assert_within(res, gpu_check.LOSS_BOUNDS[("sparse", dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", L.KINDS)
def test_fused_sparse_divergence_on_cuda_matches_plain(gpu_check, kind, dtype):
    """Against the fp64 plain path, and against the plain path in the same dtype (4 chunks)."""
    _, _, mask_bt, t_ids_btk, t_logp_btk = _dense_inputs()
    torch.manual_seed(3)
    hidden_bth = torch.randn(2, 32, 64, device=CUDA).bfloat16()
    weight_vh = (torch.randn(4096, 64, device=CUDA) * (2.0 / math.sqrt(64))).bfloat16()

    def fused(h, w):
        return L.fused_sparse_divergence(h, w, t_ids_btk, t_logp_btk, mask_bt, kind, chunk_size=16)

    def plain(h, w):
        return L.sparse_divergence(h @ w.T, t_ids_btk, t_logp_btk, mask_bt, kind)

    res = gpu_check.compare_loss(fused, [hidden_bth, weight_vh], [], DTYPES[dtype], plain)
    _assert_within(res, gpu_check.LOSS_BOUNDS[("fused", dtype)])
    same = gpu_check._same_dtype_reference(plain, DTYPES[dtype])
    res = gpu_check.compare_loss(fused, [hidden_bth, weight_vh], [], DTYPES[dtype], same)
    _assert_within(res, gpu_check.LOSS_BOUNDS[("fused_vs_plain", dtype)])


def test_fused_dense_jsd_on_cuda_matches_divergence(gpu_check):
    """liger's chunked JSD (through our wrapper) equals `divergence(kind="jsd")` in fp32."""
    _, _, mask_bt, _, _ = _dense_inputs()
    torch.manual_seed(4)
    h_bth, th_bth = (torch.randn(2, 32, 64, device=CUDA).bfloat16() for _ in range(2))
    w_vh, tw_vh = ((torch.randn(4096, 64, device=CUDA) / 4).bfloat16() for _ in range(2))
    res = gpu_check.compare_loss(
        lambda h, w, th, tw: L.fused_dense_jsd(h, w, th, tw, mask_bt, beta=0.5, chunk_size=16),
        [h_bth, w_vh], [th_bth, tw_vh], torch.float32,
        lambda h, w, th, tw: L.divergence(h @ w.T, th @ tw.T, mask_bt, "jsd", beta=0.5),
    )  # fmt: skip
    _assert_within(res, gpu_check.LOSS_BOUNDS[("liger_jsd", "fp32")])


def test_sampler_on_cuda_logprobs_match_rescoring(gpu_check, card):
    """Each sampled token's log-prob (T=1, no filter) equals the model's log-softmax when the
    whole sequence is scored again without a cache: the KV cache, left padding, positions and
    row compaction are right on the device. The same generator seed gives the same samples."""
    from factory.sampling import sample

    model = gpu_check.build_student(card, torch.float32, CUDA, seed=0).eval()
    g = torch.Generator().manual_seed(5)
    vocab = card.arch.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 12)]
    kwargs = dict(temperature=1.0, max_new_tokens=12, stop_ids=[], pad_id=card.arch.pad_token_id)
    out = sample(model, prompts, 2, generator=torch.Generator().manual_seed(0), **kwargs)
    again = sample(model, prompts, 2, generator=torch.Generator().manual_seed(0), **kwargs)

    assert again.tokens == out.tokens
    assert out.prompt_index == [0, 0, 1, 1, 2, 2]
    assert out.lengths() == [12] * 6 and not any(out.finished)
    for row, p in enumerate(out.prompt_index):
        seq = torch.tensor([prompts[p] + out.tokens[row]], device=CUDA)
        with torch.no_grad():
            logp_tv = model(input_ids=seq, use_cache=False).logits[0].float().log_softmax(-1)
        start = len(prompts[p]) - 1  # the logits at position t predict token t + 1
        want = logp_tv[start : start + 12].gather(-1, seq[0, start + 1 :, None]).squeeze(-1)
        got = torch.tensor(out.logprobs[row], device=CUDA)
        assert torch.allclose(got, want, atol=1e-3, rtol=0), (row, (got - want).abs().max())


# liger's Triton kernels last: a kernel fault that poisons the CUDA context fails only these


def test_liger_kernels_match_hf_qwen3_in_fp32(gpu_check, card):
    """Triton RMSNorm, SwiGLU, RoPE and fused linear cross-entropy give the HF model's logits,
    training loss and every gradient to fp32 rounding; the module-level patches are undone."""
    from transformers.models.qwen3 import modeling_qwen3

    names = ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP")
    before = {name: getattr(modeling_qwen3, name) for name in names}
    ids_bt, labels_bt = _ids(card)
    ref = gpu_check.build_student(card, torch.float32, CUDA, seed=0).eval()
    lig = copy.deepcopy(ref)
    ref_logits = gpu_check.logits_of(ref, ids_bt)
    ref_loss, ref_grads = gpu_check.loss_and_grads(ref, ids_bt, labels_bt)

    with gpu_check.liger_patched() as apply:
        apply(lig)
        # the instance's modules really run liger's code (bound forwards, renamed)
        assert lig.model.norm._get_name() == "LigerRMSNorm"
        assert lig.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
        lig_logits = gpu_check.logits_of(lig, ids_bt)
        lig_loss, lig_grads = gpu_check.loss_and_grads(lig, ids_bt, labels_bt)

    assert gpu_check.rel_err(lig_logits, ref_logits) < gpu_check.LIGER_FP32_BOUND
    assert abs(lig_loss - ref_loss) <= gpu_check.LIGER_FP32_BOUND * abs(ref_loss)
    assert gpu_check.rel_err(lig_grads, ref_grads) < gpu_check.LIGER_GRAD_FP32_BOUND
    assert {name: getattr(modeling_qwen3, name) for name in names} == before


def test_liger_kernels_in_bf16_err_no_more_than_hf_bf16(gpu_check, card):
    """In bf16, liger's logits are as close to the fp32 model as HF's own bf16 ones (within 2x)."""
    ids_bt, _ = _ids(card)
    ref32 = gpu_check.build_student(card, torch.float32, CUDA, seed=0).eval()
    ref_logits32 = gpu_check.logits_of(ref32, ids_bt)
    ref16 = gpu_check.recast(ref32, card, torch.bfloat16, CUDA)  # RoPE's inv_freq stays fp32
    lig16 = copy.deepcopy(ref16)
    err_hf = gpu_check.rel_err(gpu_check.logits_of(ref16, ids_bt), ref_logits32)
    with gpu_check.liger_patched() as apply:
        apply(lig16)
        err_liger = gpu_check.rel_err(gpu_check.logits_of(lig16, ids_bt), ref_logits32)
    assert 0 < err_hf < 5e-2  # bf16 really rounded, and not broken
    assert err_liger <= max(2 * err_hf, 1e-3)
