#!/usr/bin/env python3
"""One-shot check of a lent CUDA card: correctness of the GPU paths, then what they cost.

    bash scripts/gpu_check.sh                                    # the run on the GPU machine
    python scripts/gpu_check.py --out /tmp/gpu_check.json        # CUDA only
    python scripts/gpu_check.py --allow-cpu --tiny --out /tmp/g.json   # CPU smoke, toy shapes

Sections, in this order (liger's Triton kernels last, so a kernel fault that poisons the CUDA
context costs no other section's numbers); each has its own time budget, and one that fails or
runs out of time does not stop the others (its error is recorded and printed):

  peak     the card's bf16 matmul rate (8192^3 products, median of 10 after 3 warm-ups): the MFU
           denominator, measured rather than the datasheet's 989 TFLOP/s
  losses   factory.losses on the device, bf16 and fp32 inputs against an fp64 reference on the
           same (bf16-representable) values: value and gradients for `divergence` and
           `sparse_divergence` (every kind), `fused_sparse_divergence` (every kind; also against
           the plain path in the same dtype) and `fused_dense_jsd` (liger's chunked JSD)
  sampler  factory.sampling.sample vs HF `generate` at batch 64 (8 prompts x 8 samples, 128-token
           prompts, 256 new tokens, no stop), tokens/s
  step     one off-policy distillation step at Qwen3-0.6B shape (bf16 weights, 4 x 1024 tokens,
           top-64 cached teacher, forward + backward + clip + AdamW): tokens/s, MFU, peak memory,
           for {plain logits + sparse_divergence, fused_sparse_divergence} x {HF, liger kernels},
           and the fused and plain paths' loss and gradients at the same weights
  liger    liger-kernel's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)
           patched into a Qwen3-0.6B-shaped student (random weights) against the unpatched model:
           logits in fp32 (tight) and bf16 (against HF's own bf16 error), and the training loss
           and every parameter's gradient through liger's fused linear cross-entropy (fp32)

On CPU (--allow-cpu) liger's Triton kernels are not applied (Triton needs a GPU); the liger
section then checks only the patch machinery (liger's forward with the HF layers). Writes --out
(JSON, rewritten after every section, so a run cut short keeps what it measured) and the
Markdown table beside it (same name, .md), and prints the table last.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project is not pip-installed on the GPU machine
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------
# Sizes and bounds
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    card: str  # conf/student/<card>.yaml
    matmul_n: int
    matmul_reps: int
    liger_batch: int
    liger_seq: int
    loss_batch: int
    loss_seq: int
    loss_vocab: int
    loss_hidden: int
    loss_chunk: int  # fused chunk size in the loss check: several chunks per call
    topk: int
    step_batch: int
    step_seq: int
    step_warmup: int
    step_reps: int
    sample_prompts: int
    sample_n: int
    sample_prompt_len: int
    sample_new: int
    budgets_s: dict = field(default_factory=dict)  # per-section soft time budget


FULL = Sizes(
    card="qwen3-0.6b", matmul_n=8192, matmul_reps=10,
    liger_batch=2, liger_seq=256,
    loss_batch=2, loss_seq=256, loss_vocab=151_936, loss_hidden=1024, loss_chunk=128, topk=64,
    step_batch=4, step_seq=1024, step_warmup=2, step_reps=8,
    sample_prompts=8, sample_n=8, sample_prompt_len=128, sample_new=256,
    budgets_s={"peak": 15, "liger": 70, "losses": 50, "step": 70, "sampler": 60},
)  # fmt: skip
TINY = Sizes(
    card="tiny", matmul_n=256, matmul_reps=3,
    liger_batch=2, liger_seq=16,
    loss_batch=2, loss_seq=16, loss_vocab=512, loss_hidden=32, loss_chunk=8, topk=8,
    step_batch=2, step_seq=32, step_warmup=1, step_reps=3,
    sample_prompts=2, sample_n=2, sample_prompt_len=8, sample_new=16,
    budgets_s={"peak": 10, "liger": 30, "losses": 45, "step": 30, "sampler": 30},
)  # fmt: skip

# Relative errors (||got - ref|| / ||ref||) allowed against the fp64 reference, as
# (value, gradient). Inputs are bf16-representable, so the fp32 and bf16 runs see the same
# numbers as the reference: what is left is the compute precision. The losses upcast to fp32
# inside, so their values agree to fp32 rounding in both dtypes; a bf16 gradient is rounded to
# bf16 on the way out (2^-9 per element). The fused path also rounds its logits to bf16 (as the
# plain path does, since hidden @ W.T runs in the weights' dtype) and accumulates grad_weight in
# bf16 across chunks. Liger's JSD takes its log-softmax in the input dtype (bf16): informative.
LOSS_BOUNDS = {
    ("divergence", "fp32"): (1e-4, 1e-4),
    ("divergence", "bf16"): (1e-4, 1e-2),
    ("sparse", "fp32"): (1e-4, 1e-4),
    ("sparse", "bf16"): (1e-4, 1e-2),
    ("fused", "fp32"): (1e-4, 1e-3),
    ("fused", "bf16"): (2e-2, 5e-2),
    ("fused_vs_plain", "fp32"): (1e-5, 1e-4),
    ("fused_vs_plain", "bf16"): (2e-3, 3e-2),
    ("liger_jsd", "fp32"): (1e-4, 1e-3),
    ("liger_jsd", "bf16"): (1e-1, 2e-1),
}
LIGER_FP32_BOUND = 1e-4  # logits, loss: Triton RMSNorm/SwiGLU/RoPE vs torch, fp32 rounding only
LIGER_GRAD_FP32_BOUND = 1e-3  # every parameter's gradient, 28 layers of fp32 rounding
STEP_LOSS_BOUND = 2e-3  # fused vs plain loss at the same bf16 weights (bf16 logits both ways)
STEP_GRAD_BOUND = 5e-2  # fused vs plain gradients (bf16 grads, bf16 grad_weight accumulation)


# ----------------------------------------------------------------------------------------------
# Small helpers (also used by tests/gpu)
# ----------------------------------------------------------------------------------------------


def load_card(name: str, **arch_overrides):
    """A student card from conf/student/, typed by its schema, with arch fields overridden."""
    from omegaconf import OmegaConf

    from factory.config import StudentConfig

    values = OmegaConf.load(REPO / "conf" / "student" / f"{name}.yaml")
    card = OmegaConf.merge(OmegaConf.structured(StudentConfig), values)
    if arch_overrides:
        card = OmegaConf.merge(card, {"arch": arch_overrides})
    return card


def build_student(card, dtype: torch.dtype, device: torch.device, seed: int):
    """A causal LM of the card's architecture with random weights, built on `device`."""
    from transformers import AutoModelForCausalLM

    from students.builders import hf_config

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: 0.6B random normals on CPU take seconds
        model = AutoModelForCausalLM.from_config(hf_config(card.arch), dtype=dtype)
    if next(model.parameters()).device.type != device.type:
        model = model.to(device)
    return model


def recast(model, card, dtype: torch.dtype, device: torch.device):
    """A copy of `model` in `dtype`, built the way from_config builds a model of that dtype.

    Not `model.to(dtype)`: that also rounds RoPE's `inv_freq` buffer, which HF keeps in fp32 in
    its own bf16 models, and a bf16 inv_freq moves the angles by up to ~0.5 rad at position 256.
    """
    other = build_student(card, dtype, device, seed=0)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| over a tensor or a list of tensors, in fp64."""
    got = [got] if torch.is_tensor(got) else list(got)
    ref = [ref] if torch.is_tensor(ref) else list(ref)
    num = sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(got, ref, strict=True))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def max_abs(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref|, that over max |ref|)."""
    diff = float((got.double() - ref.double()).abs().max())
    return diff, diff / max(float(ref.double().abs().max()), 1e-300)


def logits_of(model, ids_bt: torch.Tensor) -> torch.Tensor:
    """The model's fp32 logits [B, T, V], no cache, no grad."""
    with torch.no_grad():
        return model(input_ids=ids_bt, use_cache=False).logits.float()


def loss_and_grads(model, ids_bt: torch.Tensor, labels_bt: torch.Tensor):
    """(cross-entropy training loss, every parameter's gradient) through the model's own loss
    path: HF's, or liger's fused linear cross-entropy once its forward is patched in."""
    model.train()
    loss = model(input_ids=ids_bt, labels=labels_bt, use_cache=False).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.eval()
    return float(loss.detach()), grads


def import_liger():
    """`liger_kernel.transformers`. liger imports peft when it is installed and catches only
    ImportError: a peft that fails otherwise (a version clash with transformers) is hidden from
    it, so it cannot take liger down with it."""
    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    except Exception as err:
        print(f"  peft fails to import ({type(err).__name__}: {err}); hidden from liger")
        sys.modules["peft"] = None  # makes `import peft` raise ImportError
    import liger_kernel.transformers

    return liger_kernel.transformers


@contextlib.contextmanager
def liger_patched():
    """Yields `apply(model, kernels, flce)`; on exit undoes liger's module-level patches.

    `apply_liger_kernel_to_qwen3` swaps names in transformers' modeling_qwen3 module
    (`apply_rotary_pos_emb`, `Qwen3RMSNorm`, `Qwen3MLP`) as well as patching the instance given
    as `model=`. The RoPE swap is looked up at call time by *every* Qwen3 attention layer, also
    of models built before, so the unpatched reference must run outside this context. Instance
    patches (bound forwards) stay on their instance: use a patched model inside the context only.
    """
    from transformers.models.qwen3 import modeling_qwen3

    names = ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP")
    saved = {name: getattr(modeling_qwen3, name) for name in names}
    saved_forward = modeling_qwen3.Qwen3ForCausalLM.__dict__["forward"]

    def apply(model, kernels: bool = True, flce: bool = True) -> None:
        import_liger().apply_liger_kernel_to_qwen3(
            rope=kernels, rms_norm=kernels, swiglu=kernels, cross_entropy=False,
            fused_linear_cross_entropy=flce, model=model,
        )  # fmt: skip

    try:
        yield apply
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen3, name, value)
        modeling_qwen3.Qwen3ForCausalLM.forward = saved_forward


def random_sparse_targets(n: int, vocab: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher targets a logit cache could hold: k distinct ids per row and full-vocabulary
    log-probs, sorted descending, whose mass is 0.5..0.95 (a tail remains). ([n, k] x 2)"""
    ids_nk = torch.empty(n, k, dtype=torch.long, device=device)
    rows = max(1, 2**26 // vocab)  # 256 MiB of fp32 noise per block
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        ids_nk[start:stop] = torch.rand(stop - start, vocab, device=device).topk(k, -1).indices
    raw_nk = (torch.randn(n, k, device=device) * 2.0).sort(-1, descending=True).values
    mass_n1 = torch.empty(n, 1, device=device).uniform_(0.5, 0.95)
    return ids_nk, raw_nk.log_softmax(-1) + mass_n1.log()


def compare_loss(fn, grad_inputs, const_inputs, dtype, ref_fn=None) -> dict:
    """Value and gradients (w.r.t. `grad_inputs`) of `fn(*grad_inputs, *const_inputs)` in `dtype`
    against `ref_fn` (default `fn`) in fp64 on the same values; both kinds of input are cast to
    the run's dtype. Returns the relative errors and whether everything was finite."""

    def run(fun, dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in grad_inputs]
        consts = [c.to(dt) for c in const_inputs]
        loss = fun(*leaves, *consts)
        grads = torch.autograd.grad(loss, leaves)
        return float(loss.detach().double()), [g.detach() for g in grads]

    ref_value, ref_grads = run(ref_fn or fn, torch.float64)
    value, grads = run(fn, dtype)
    out = {
        "value": value,
        "ref_value": ref_value,
        "value_rel": abs(value - ref_value) / max(abs(ref_value), 1e-300),
        "grad_rel": rel_err(grads, ref_grads),
        "finite": math.isfinite(value) and all(bool(torch.isfinite(g).all()) for g in grads),
    }
    del grads, ref_grads
    return out


# ----------------------------------------------------------------------------------------------
# Run context, timing, checks
# ----------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    value: float | None
    bound: float | None
    ok: bool | None  # None: informative, no bound


@dataclass
class Ctx:
    device: torch.device
    sizes: Sizes
    seed: int
    peak_tflops: float | None = None  # filled by the peak section
    checks: list[Check] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def check(self, name: str, value, bound: float | None) -> bool | None:
        value = None if value is None else float(value)
        ok = None
        if bound is not None:
            ok = value is not None and math.isfinite(value) and value <= bound
        self.checks.append(Check(name, value, bound, ok))
        mark = {True: "ok", False: "FAIL", None: "info"}[ok]
        print(f"  [{mark}] {name}: {_fmt(value)}" + ("" if bound is None else f" (<= {bound:g})"))
        return ok

    def failed(self, label: str, err: BaseException) -> str:
        """Record a part of a section that raised, so the rest of the section still runs."""
        traceback.print_exc()
        self.checks.append(Check(f"{label} ran", None, None, False))
        print(f"  [FAIL] {label}: {type(err).__name__}: {err}")
        return f"{type(err).__name__}: {str(err)[:300]}"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class Clock:
    """A section's soft time budget: loops stop repeating once it is spent."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.2e}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def section_peak(ctx: Ctx, clock: Clock) -> dict:
    n, dev = ctx.sizes.matmul_n, ctx.device
    torch.manual_seed(ctx.seed)
    # random data, never zeros: zeros run faster than real data (device README, METHOD.md)
    a_nn = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b_nn = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c_nn = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a_nn, b_nn, out=c_nn)
    ctx.sync()
    times = []
    for _ in range(ctx.sizes.matmul_reps):
        if times and clock.left() < 0:
            break
        if ctx.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a_nn, b_nn, out=c_nn)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.mm(a_nn, b_nn, out=c_nn)
            times.append(time.perf_counter() - t0)
    if not bool(torch.isfinite(c_nn).all()):
        raise RuntimeError("the bf16 matmul produced non-finite values")
    seconds = statistics.median(times)
    tflops = 2 * n**3 / seconds / 1e12
    ctx.peak_tflops = tflops
    ms = seconds * 1e3
    print(f"  bf16 {n}^3 matmul: {ms:.3f} ms (median of {len(times)}): {tflops:.0f} TFLOP/s")
    return {"n": n, "reps": len(times), "median_s": seconds, "tflops": tflops, "times_s": times}


def section_liger(ctx: Ctx, clock: Clock) -> dict:
    import_liger()  # fail early, before building models, when it is missing

    dev, s = ctx.device, ctx.sizes
    card = load_card(s.card)
    vocab = card.arch.vocab_size
    kernels = ctx.cuda  # Triton needs a GPU: on CPU only liger's forward (the FLCE path) is swapped
    out: dict[str, Any] = {
        "card": s.card, "batch": s.liger_batch, "seq": s.liger_seq, "kernels": kernels,
    }  # fmt: skip
    try:
        from liger_kernel.backends import available_impls

        out["impls"] = {
            op: available_impls(op)
            for op in ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy")
        }
    except Exception as err:  # introspection only
        out["impls"] = f"unavailable: {type(err).__name__}"

    torch.manual_seed(ctx.seed + 1)
    ids_bt = torch.randint(0, vocab, (s.liger_batch, s.liger_seq), device=dev)
    labels_bt = ids_bt.clone()
    labels_bt[:, : s.liger_seq // 4] = -100  # a prompt that takes no loss

    ref32 = build_student(card, torch.float32, dev, ctx.seed).eval()
    lig32 = copy.deepcopy(ref32)
    ref_logits32 = logits_of(ref32, ids_bt)
    ref_loss = ref_grads = None
    if kernels:
        ref_loss, ref_grads = loss_and_grads(ref32, ids_bt, labels_bt)
    ref16 = recast(ref32, card, torch.bfloat16, dev)
    del ref32
    lig16 = copy.deepcopy(ref16)
    ref_logits16 = logits_of(ref16, ids_bt)
    del ref16
    _free()

    with liger_patched() as apply:
        apply(lig32, kernels=kernels)
        apply(lig16, kernels=kernels)
        t0 = time.monotonic()
        lig_logits32 = logits_of(lig32, ids_bt)
        lig_logits16 = logits_of(lig16, ids_bt)
        out["first_forward_s"] = time.monotonic() - t0  # includes Triton's compile
        lig_loss = lig_grads = None
        if kernels:
            try:
                lig_loss, lig_grads = loss_and_grads(lig32, ids_bt, labels_bt)
            except Exception as err:  # keep the logits checks above
                out["fp32_train_error"] = ctx.failed("liger FLCE fp32 train step", err)

    bound32 = LIGER_FP32_BOUND if kernels else 1e-6  # without kernels the math is HF's, exactly
    diff, diff_rel = max_abs(lig_logits32, ref_logits32)
    out["fp32_logits"] = {
        "max_abs": diff, "max_rel": diff_rel, "rel": rel_err(lig_logits32, ref_logits32),
    }  # fmt: skip
    ctx.check("liger fp32 logits rel", out["fp32_logits"]["rel"], bound32)
    ctx.check("liger fp32 logits max|diff|/max|ref|", diff_rel, None)
    err_hf16 = rel_err(ref_logits16, ref_logits32)
    err_lig16 = rel_err(lig_logits16, ref_logits32)
    diff16, diff16_rel = max_abs(lig_logits16, ref_logits16)
    out["bf16_logits"] = {
        "hf_bf16_vs_fp32_rel": err_hf16,
        "liger_bf16_vs_fp32_rel": err_lig16,
        "liger_vs_hf_bf16_rel": rel_err(lig_logits16, ref_logits16),
        "liger_vs_hf_bf16_max_abs": diff16,
        "liger_vs_hf_bf16_max_rel": diff16_rel,
    }
    ctx.check("HF bf16 logits rel to fp32 (yardstick)", err_hf16, None)
    # bf16 passes when liger's bf16 error to the fp32 model is within 2x HF's own bf16 error
    ctx.check("liger bf16 logits rel to fp32", err_lig16, max(2 * err_hf16, 1e-3))
    if lig_loss is not None:
        out["fp32_train"] = {
            "hf_loss": ref_loss,
            "liger_flce_loss": lig_loss,
            "loss_rel": abs(lig_loss - ref_loss) / abs(ref_loss),
            "grads_rel": rel_err(lig_grads, ref_grads),
        }
        train = out["fp32_train"]
        ctx.check("liger FLCE fp32 train loss rel", train["loss_rel"], LIGER_FP32_BOUND)
        ctx.check("liger fp32 param grads rel", train["grads_rel"], LIGER_GRAD_FP32_BOUND)
    if not kernels:
        print("  liger Triton kernels skipped: no CUDA (checked liger's forward, HF layers only)")
    return out


def section_losses(ctx: Ctx, clock: Clock) -> dict:
    from factory import losses as L

    dev, s = ctx.device, ctx.sizes
    B, T, V, H, K = s.loss_batch, s.loss_seq, s.loss_vocab, s.loss_hidden, s.topk
    torch.manual_seed(ctx.seed + 2)
    bf = torch.bfloat16
    # every input bf16-representable, so bf16, fp32 and the fp64 reference see the same numbers
    student_btv = (torch.randn(B, T, V, device=dev) * 2.0).to(bf)
    teacher_btv = (student_btv.float() + torch.randn(B, T, V, device=dev)).to(bf)
    mask_bt = torch.rand(B, T, device=dev) > 0.1
    mask_bt[0, 0] = True
    t_logp_btk, t_ids_btk = teacher_btv.float().log_softmax(-1).topk(K, -1)  # sorted, full-vocab
    hidden_bth = torch.randn(B, T, H, device=dev).to(bf)
    weight_vh = (torch.randn(V, H, device=dev) * (2.0 / math.sqrt(H))).to(bf)  # logits std ~2
    t_hidden_bth = torch.randn(B, T, H, device=dev).to(bf)
    t_weight_vh = (torch.randn(V, H, device=dev) * (2.0 / math.sqrt(H))).to(bf)

    rows: list[dict] = []

    def record(fn_name: str, kind: str, dtype_name: str, res: dict) -> None:
        bound_v, bound_g = LOSS_BOUNDS[(fn_name, dtype_name)]
        row = {"fn": fn_name, "kind": kind, "dtype": dtype_name, **res,
               "value_bound": bound_v, "grad_bound": bound_g}  # fmt: skip
        row["ok"] = bool(
            res["finite"] and res["value_rel"] <= bound_v and res["grad_rel"] <= bound_g
        )
        rows.append(row)
        mark = "ok" if row["ok"] else "FAIL"
        print(
            f"  [{mark}] {fn_name:<14} {kind:<9} {dtype_name}: value rel {_fmt(res['value_rel'])}"
            f" (<= {bound_v:g}), grad rel {_fmt(res['grad_rel'])} (<= {bound_g:g})"
        )

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    # (function, kind, fn, inputs with gradients, constant inputs, fp64 reference or None = fn)
    cases: list[tuple[str, str, Callable, list, list, Callable | None]] = []
    for kind in L.KINDS:

        def dense(z, t, kind=kind):
            return L.divergence(z, t, mask_bt, kind)

        cases.append(("divergence", kind, dense, [student_btv], [teacher_btv], None))

    def dense_t2(z, t):
        return L.divergence(z, t, mask_bt, "jsd", temperature=2.0)

    cases.append(("divergence", "jsd@T2", dense_t2, [student_btv], [teacher_btv], None))
    for kind in L.KINDS:

        def sparse(z, kind=kind):
            return L.sparse_divergence(z, t_ids_btk, t_logp_btk, mask_bt, kind)

        cases.append(("sparse", kind, sparse, [student_btv], [], None))
    for kind in L.KINDS:

        def fused(h, w, kind=kind):
            return L.fused_sparse_divergence(
                h, w, t_ids_btk, t_logp_btk, mask_bt, kind, chunk_size=s.loss_chunk
            )

        def plain(h, w, kind=kind):
            return L.sparse_divergence(h @ w.T, t_ids_btk, t_logp_btk, mask_bt, kind)

        cases.append(("fused", kind, fused, [hidden_bth, weight_vh], [], plain))

    def liger_jsd(h, w, th, tw):  # liger makes N // chunk_size chunks: 2 at full size
        return L.fused_dense_jsd(h, w, th, tw, mask_bt, beta=0.5, chunk_size=256)

    def dense_jsd(h, w, th, tw):
        return L.divergence(h @ w.T, th @ tw.T, mask_bt, "jsd", beta=0.5)

    cases.append(("liger_jsd", "jsd", liger_jsd, [hidden_bth, weight_vh],
                  [t_hidden_bth, t_weight_vh], dense_jsd))  # fmt: skip

    skipped = 0
    for fn_name, kind, fn, grad_inputs, consts, ref_fn in cases:
        for dtype_name, dtype in dtypes.items():
            if clock.left() < 0:
                skipped += 1
                continue
            try:
                res = compare_loss(fn, grad_inputs, consts, dtype, ref_fn)
                record(fn_name, kind, dtype_name, res)
                if fn_name == "fused":  # the fused kernel against the plain path, same dtype
                    same = _same_dtype_reference(ref_fn, dtype)
                    res = compare_loss(fn, grad_inputs, consts, dtype, same)
                    record("fused_vs_plain", kind, dtype_name, res)
            except Exception as err:  # one case failing must not hide the others
                rows.append({"fn": fn_name, "kind": kind, "dtype": dtype_name, "ok": False,
                             "error": f"{type(err).__name__}: {err}"})  # fmt: skip
                print(f"  [FAIL] {fn_name} {kind} {dtype_name}: {type(err).__name__}: {err}")
                _free()
    for row in rows:
        if not row.get("ok"):
            name = f"loss {row['fn']} {row['kind']} {row['dtype']}"
            ctx.checks.append(Check(name, None, None, False))
    n_ok = sum(1 for r in rows if r.get("ok"))
    ctx.check("loss cases failing", len(rows) - n_ok, 0)
    if skipped:
        ctx.check("loss cases skipped (time budget)", skipped, None)
    return {"shape": {"B": B, "T": T, "V": V, "H": H, "k": K, "chunk": s.loss_chunk},
            "cases": rows, "skipped": skipped}  # fmt: skip


def _same_dtype_reference(plain_fn, dtype):
    """`plain_fn` run in `dtype`, as a `ref_fn` for compare_loss (which hands it fp64 leaves):
    compares the fused kernel with the plain path at the same precision."""

    def ref(*args):
        cast = [a.to(dtype) if torch.is_tensor(a) and a.dtype == torch.float64 else a for a in args]
        return plain_fn(*cast)

    return ref


def section_step(ctx: Ctx, clock: Clock) -> dict:
    from omegaconf import OmegaConf

    from factory import losses as L
    from students.builders import count_params

    dev, s = ctx.device, ctx.sizes
    card = load_card(s.card)
    vocab = card.arch.vocab_size
    n_flops = count_params(card)["flops_params"]
    datasheet = float(OmegaConf.load(REPO / "conf" / "trainer" / "gpu.yaml").device_peak_tflops)
    B, T = s.step_batch, s.step_seq
    tokens = B * T
    flops = 6.0 * n_flops * tokens  # factory.flops.train_flops: attention scores left out

    model = build_student(card, torch.bfloat16, dev, ctx.seed).train()
    decoder = getattr(model, model.base_model_prefix)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, fused=ctx.cuda)
    torch.manual_seed(ctx.seed + 3)
    ids_bt = torch.randint(0, vocab, (B, T), device=dev)
    mask_bt = torch.ones(B, T, dtype=torch.bool, device=dev)
    mask_bt[:, : T // 8] = False  # a prompt that takes no loss
    t_ids_nk, t_logp_nk = random_sparse_targets(tokens, vocab, s.topk, dev)
    t_ids_btk, t_logp_btk = t_ids_nk.view(B, T, -1), t_logp_nk.view(B, T, -1)

    def loss_of(path: str):
        if path == "fused":
            hidden_bth = decoder(input_ids=ids_bt, use_cache=False).last_hidden_state
            return L.fused_sparse_divergence(
                hidden_bth, model.lm_head.weight, t_ids_btk, t_logp_btk, mask_bt
            )
        logits_btv = model(input_ids=ids_bt, use_cache=False).logits
        return L.sparse_divergence(logits_btv, t_ids_btk, t_logp_btk, mask_bt)

    def step(path: str) -> float:
        loss = loss_of(path)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def paths_agree(tag: str) -> dict:
        """Plain and fused loss and gradients at the same weights (no optimizer step)."""
        loss_plain = loss_of("plain")
        grads_plain = torch.autograd.grad(loss_plain, params)
        loss_fused = loss_of("fused")
        grads_fused = torch.autograd.grad(loss_fused, params)
        plain, fused = float(loss_plain.detach()), float(loss_fused.detach())
        res = {
            "loss_plain": plain,
            "loss_fused": fused,
            "loss_rel": abs(fused - plain) / abs(plain),
            "grads_rel": rel_err(grads_fused, grads_plain),
        }
        del grads_plain, grads_fused
        ctx.check(f"step {tag}: fused vs plain loss rel", res["loss_rel"], STEP_LOSS_BOUND)
        ctx.check(f"step {tag}: fused vs plain grads rel", res["grads_rel"], STEP_GRAD_BOUND)
        return res

    def timed(path: str) -> dict:
        for _ in range(s.step_warmup):
            step(path)
        ctx.sync()
        if ctx.cuda:
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        times, losses = [], []
        for _ in range(s.step_reps):
            if len(times) >= 3 and clock.left() < 0:
                break
            t0 = time.perf_counter()
            losses.append(step(path))  # float(loss) syncs; the optimizer step is waited below
            ctx.sync()
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        res = {
            "reps": len(times),
            "step_s": sec,
            "tokens_per_s": tokens / sec,
            "tflops": flops / sec / 1e12,
            "mfu_measured": None if not ctx.peak_tflops else flops / sec / 1e12 / ctx.peak_tflops,
            "mfu_datasheet": flops / sec / 1e12 / datasheet,
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if ctx.cuda else None,
            "resident_gib": base / 2**30 if ctx.cuda else None,
            "losses": losses,
        }
        mfu = res["mfu_measured"]
        print(
            f"  {path:<5}: {sec * 1e3:8.1f} ms/step, {res['tokens_per_s']:,.0f} tok/s, "
            f"{res['tflops']:.1f} TFLOP/s, MFU {'-' if mfu is None else f'{mfu:.1%}'} "
            f"(datasheet {res['mfu_datasheet']:.1%}), peak {_fmt(res['peak_mem_gib'])} GiB"
        )
        return res

    out: dict[str, Any] = {
        "card": s.card, "batch": B, "seq": T, "tokens": tokens, "topk": s.topk, "kind": "fkl",
        "flops_params": n_flops, "flops_per_step": flops, "datasheet_tflops": datasheet,
        "peak_tflops": ctx.peak_tflops, "runs": [],
    }  # fmt: skip
    for liger in (False, True):
        tag = "liger" if liger else "hf"
        if liger and not ctx.cuda:
            print("  liger kernels skipped: no CUDA")
            continue
        if clock.left() < 0:
            print(f"  {tag}: skipped, time budget spent")
            out["runs"].append({"liger": liger, "skipped": "time budget"})
            continue
        with liger_patched() if liger else contextlib.nullcontext() as apply:
            if liger:  # kernels only: the distillation loss takes hidden states, not labels
                apply(model, kernels=True, flce=False)
            try:
                out[f"agree_{tag}"] = paths_agree(tag)
            except Exception as err:
                out[f"agree_{tag}"] = {"error": ctx.failed(f"step {tag}: fused vs plain", err)}
            _free()
            for path in ("plain", "fused"):
                if clock.left() < 0:
                    out["runs"].append({"liger": liger, "path": path, "skipped": "time budget"})
                    continue
                try:
                    res = timed(path)
                except Exception as err:
                    error = ctx.failed(f"step {tag}/{path}", err)
                    out["runs"].append({"liger": liger, "path": path, "skipped": error})
                    _free()
                    continue
                bad = sum(1 for x in res["losses"] if not math.isfinite(x))
                ctx.check(f"step {tag}/{path} non-finite losses", bad, 0)
                out["runs"].append({"liger": liger, "path": path, **res})
                _free()
    return out


def section_sampler(ctx: Ctx, clock: Clock) -> dict:
    from factory.sampling import sample

    dev, s = ctx.device, ctx.sizes
    card = load_card(s.card)
    vocab, pad = card.arch.vocab_size, card.arch.pad_token_id
    model = build_student(card, torch.bfloat16, dev, ctx.seed).eval()
    g = torch.Generator().manual_seed(ctx.seed + 4)
    prompts = torch.randint(0, vocab, (s.sample_prompts, s.sample_prompt_len), generator=g)
    rows = s.sample_prompts * s.sample_n
    # Qwen3's recommended thinking-mode settings (factory.config.SamplingConfig)
    opts = dict(temperature=0.6, top_p=0.95, top_k=20)

    def ours(new: int) -> int:
        out = sample(
            model, prompts.tolist(), s.sample_n, max_new_tokens=new, stop_ids=[], pad_id=pad,
            generator=torch.Generator().manual_seed(ctx.seed), **opts,
        )  # fmt: skip
        return sum(out.lengths())

    ids_pl = prompts.to(dev)

    def hf(new: int) -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids_pl, attention_mask=torch.ones_like(ids_pl), do_sample=True,
                max_new_tokens=new, min_new_tokens=new, num_return_sequences=s.sample_n,
                pad_token_id=pad, **opts,
            )  # fmt: skip
        return (out.shape[1] - ids_pl.shape[1]) * out.shape[0]

    res: dict[str, Any] = {
        "card": s.card, "prompts": s.sample_prompts, "n": s.sample_n, "rows": rows,
        "prompt_len": s.sample_prompt_len, "new_tokens": s.sample_new, "settings": opts,
    }  # fmt: skip
    for name, fn in (("factory.sampling.sample", ours), ("transformers generate", hf)):
        times, counts = [], []
        try:
            torch.manual_seed(ctx.seed)
            fn(4)  # warm-up: kernels, cache allocators
            for _ in range(2):
                if times and clock.left() < 30:
                    break
                ctx.sync()
                t0 = time.perf_counter()
                counts.append(fn(s.sample_new))
                ctx.sync()
                times.append(time.perf_counter() - t0)
        except Exception as err:
            res[name] = {"error": ctx.failed(name, err)}
            continue
        sec = statistics.median(times)
        res[name] = {"wall_s": times, "tokens": counts[0], "tokens_per_s": counts[0] / sec}
        print(f"  {name}: {counts[0]:,} tokens in {sec:.2f} s -> {counts[0] / sec:,.0f} tok/s")
        # no stop ids: every row must run to max_new_tokens
        short = rows * s.sample_new - counts[0]
        ctx.check(f"{name}: tokens short of rows x max_new_tokens", short, 0)
    ours_tps = res["factory.sampling.sample"].get("tokens_per_s")
    hf_tps = res["transformers generate"].get("tokens_per_s")
    res["speedup_vs_generate"] = ours_tps / hf_tps if ours_tps and hf_tps else None
    ctx.check("sampler speed-up over HF generate (x)", res["speedup_vs_generate"], None)
    return res


# Triton's kernels come last (the step's liger half, then the liger section): a kernel fault
# that poisons the CUDA context then costs no other section's numbers.
SECTIONS: dict[str, Callable[[Ctx, Clock], dict]] = {
    "peak": section_peak,
    "losses": section_losses,
    "sampler": section_sampler,
    "step": section_step,
    "liger": section_liger,
}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name: version(name) for name in ("transformers", "triton", "liger_kernel", "peft")},
        "device": str(device),
        # fp32 matmuls in full fp32 unless these say otherwise (the fp32 bounds assume so)
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=props.total_memory / 2**30,
            sms=props.multi_processor_count,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    else:
        cpu = platform.processor() or platform.machine()
        env.update(gpu=f"CPU ({cpu}, {os.cpu_count()} cores)")
    return env


def markdown(report: dict, full: bool = True) -> str:
    """The report as Markdown for docs/benchmarks.md; `full` adds the per-kind loss rows."""
    env, sec = report["env"], report["sections"]
    lines = [
        f"## GPU check: {env['gpu']}",
        "",
        f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
        f"{env['transformers']}, liger-kernel {env['liger_kernel']}, triton {env['triton']}; "
        f"sizes: {report['sizes']}. Produced by `scripts/gpu_check.sh`.",
        "",
        "| section | status | seconds |",
        "| --- | --- | --- |",
    ]
    for name, data in sec.items():
        lines.append(f"| {name} | {data['status']} | {data['seconds']:.1f} |")
    peak = sec.get("peak", {}).get("result")
    if peak:
        lines += ["", f"bf16 matmul peak, measured: **{peak['tflops']:.0f} TFLOP/s** "
                      f"({peak['n']}^3, median of {peak['reps']})."]  # fmt: skip

    step = sec.get("step", {}).get("result")
    if step and step.get("runs"):
        lines += [
            "",
            f"### Off-policy distillation step ({step['card']} shape, random weights, bf16, "
            f"{step['batch']} x {step['seq']} tokens, top-{step['topk']} cached teacher, "
            f"{step['kind']}, AdamW + clip)",
            "",
            f"FLOPs/step = 6 x {step['flops_params']:,} x {step['tokens']:,} = "
            f"{step['flops_per_step'] / 1e12:.1f} TFLOP (non-embedding params + LM head; "
            "attention scores left out).",
            "",
            "| kernels | loss path | ms/step | tokens/s | TFLOP/s | MFU (measured peak) "
            f"| MFU ({step['datasheet_tflops']:.0f} datasheet) | peak mem GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for run in step["runs"]:
            kern = "liger" if run["liger"] else "HF"
            path = {"plain": "logits + sparse_divergence", "fused": "fused_sparse_divergence"}.get(
                run.get("path"), run.get("path", "-")
            )
            if "skipped" in run:
                lines.append(f"| {kern} | {path} | skipped ({run['skipped'][:80]}) | | | | | |")
                continue
            mfu = "-" if run["mfu_measured"] is None else f"{run['mfu_measured']:.1%}"
            mem = "-" if run["peak_mem_gib"] is None else f"{run['peak_mem_gib']:.1f}"
            lines.append(
                f"| {kern} | {path} | {run['step_s'] * 1e3:.1f} | {run['tokens_per_s']:,.0f} | "
                f"{run['tflops']:.0f} | {mfu} | {run['mfu_datasheet']:.1%} | {mem} |"
            )

    samp = sec.get("sampler", {}).get("result")
    if samp:
        lines += [
            "",
            f"### Sampling ({samp['card']} shape, random weights, bf16, {samp['prompts']} "
            f"prompts x {samp['n']} samples of {samp['prompt_len']}-token prompts, "
            f"{samp['new_tokens']} new tokens, no stop, T=0.6 top-p 0.95 top-k 20)",
            "",
            "| sampler | tokens/s | wall s |",
            "| --- | --- | --- |",
        ]
        for name in ("factory.sampling.sample", "transformers generate"):
            r = samp.get(name, {"error": "not run"})
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'][:80]} | |")
                continue
            wall = statistics.median(r["wall_s"])
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {wall:.2f} |")
        if samp["speedup_vs_generate"]:
            lines.append(f"\nSpeed-up over `generate`: {samp['speedup_vs_generate']:.2f}x.")

    losses = sec.get("losses", {}).get("result")
    if losses and losses.get("cases"):
        sh = losses["shape"]
        lines += [
            "",
            f"### factory.losses on the device vs fp64 (B={sh['B']}, T={sh['T']}, V={sh['V']:,}, "
            f"H={sh['H']}, k={sh['k']}, fused chunk {sh['chunk']}): worst over kinds",
            "",
            "| function | dtype | kinds ok | worst value rel | worst grad rel "
            "| bounds (value, grad) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        groups: dict[tuple, list] = {}
        for r in losses["cases"]:
            groups.setdefault((r["fn"], r["dtype"]), []).append(r)
        for (fn_name, dtype_name), rs in groups.items():
            measured = [r for r in rs if "error" not in r]
            worst_v = max((r["value_rel"] for r in measured), default=None)
            worst_g = max((r["grad_rel"] for r in measured), default=None)
            bounds = LOSS_BOUNDS[(fn_name, dtype_name)]
            n_ok = sum(1 for r in rs if r.get("ok"))
            flag = "" if n_ok == len(rs) else " **FAIL**"
            lines.append(
                f"| {fn_name} | {dtype_name} | {n_ok}/{len(rs)}{flag} | {_fmt(worst_v)} | "
                f"{_fmt(worst_g)} | {bounds[0]:g}, {bounds[1]:g} |"
            )
        if full:
            lines += [
                "",
                "| function | kind | dtype | value | value rel | grad rel | ok |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in losses["cases"]:
                if "error" in r:
                    lines.append(f"| {r['fn']} | {r['kind']} | {r['dtype']} | error: "
                                 f"{r['error'][:100]} | | | **no** |")  # fmt: skip
                    continue
                lines.append(
                    f"| {r['fn']} | {r['kind']} | {r['dtype']} | {_fmt(r['value'])} | "
                    f"{_fmt(r['value_rel'])} | {_fmt(r['grad_rel'])} | "
                    f"{'yes' if r['ok'] else '**no**'} |"
                )

    lines += ["", "### Checks", "", "| check | value | bound | ok |", "| --- | --- | --- | --- |"]
    for c in report["checks"]:
        ok = {True: "yes", False: "**no**", None: "info"}[c["ok"]]
        bound = "-" if c["bound"] is None else f"{c['bound']:g}"
        lines.append(f"| {c['name']} | {_fmt(c['value'])} | {bound} | {ok} |")
    return "\n".join(lines) + "\n"


def write_report(path: Path, report: dict) -> None:
    """The JSON first (atomically), then the Markdown: a bug in the table loses no numbers."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    try:
        path.with_suffix(".md").write_text(markdown(report))
    except Exception:
        traceback.print_exc()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                    help="JSON report (and the Markdown beside it, .md)")  # fmt: skip
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU: a smoke run, with --tiny")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (the tiny card): a smoke run")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here. This check is for a lent GPU; pass --allow-cpu "
              "(with --tiny) for a smoke run on CPU.", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.tiny else FULL
    only = [x for x in args.only.split(",") if x]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    ctx = Ctx(device=device, sizes=sizes, seed=args.seed)
    env = environment(device)
    print("gpu_check:", json.dumps(env))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "env": env, "sizes": "tiny" if args.tiny else "full", "sizes_detail": asdict(sizes),
        "sections": {}, "checks": [],
    }  # fmt: skip
    interrupted = False
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        if interrupted:
            report["sections"][name] = {"status": "not run (interrupted)", "seconds": 0.0}
            continue
        budget = sizes.budgets_s.get(name, 60)
        print(f"\n== {name} (budget {budget} s)", flush=True)
        clock = Clock(budget)
        entry: dict[str, Any] = {}
        try:
            entry["result"] = fn(ctx, clock)
            entry["status"] = "ok"
        except KeyboardInterrupt:  # the shell's timeout sends SIGINT: keep what was measured
            entry["status"] = "interrupted"
            interrupted = True
        except Exception as err:
            entry["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
            entry["traceback"] = traceback.format_exc()[-4000:]
            print(entry["traceback"], file=sys.stderr)
            ctx.checks.append(Check(f"section {name} ran", None, None, False))
        entry["seconds"] = clock.elapsed()
        print(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        report["sections"][name] = entry
        report["checks"] = [asdict(c) for c in ctx.checks]
        _free()
        write_report(args.out, report)

    try:
        print("\n" + markdown(report, full=False))
    except Exception:
        traceback.print_exc()
        print(json.dumps(report["checks"], indent=1))
    failed = [c.name for c in ctx.checks if c.ok is False]
    print(f"gpu_check: {len(failed)} failed check(s){': ' + '; '.join(failed) if failed else ''}")
    print(f"gpu_check: wrote {args.out} and {args.out.with_suffix('.md')}")
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
