"""Analytic and consistency tests for factory.losses on tiny tensors (CPU, well under a minute)."""

import math

import pytest
import torch

from factory.losses import (
    KINDS,
    chunk_rows,
    divergence,
    fused_dense_jsd,
    fused_sparse_divergence,
    sampled_forward_kl,
    sparse_divergence,
)

pytestmark = pytest.mark.unit

BETA, ALPHA = 0.3, 0.2  # asymmetric values, so a swapped convention cannot pass by symmetry


def _softmax(xs, temperature=1.0):
    exps = [math.exp(x / temperature) for x in xs]
    return [e / sum(exps) for e in exps]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _mix(w, a, b):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


# By hand, from the definitions: p = teacher, q = student.
HAND = {
    "fkl": lambda p, q: _kl(p, q),
    "rkl": lambda p, q: _kl(q, p),
    "jsd": lambda p, q: BETA * _kl(p, _mix(BETA, p, q)) + (1 - BETA) * _kl(q, _mix(BETA, p, q)),
    "skew_fkl": lambda p, q: _kl(p, _mix(ALPHA, p, q)),
    "skew_rkl": lambda p, q: _kl(q, _mix(ALPHA, q, p)),
    "tvd": lambda p, q: 0.5 * sum(abs(x - y) for x, y in zip(p, q)),
}
TEACHER_3, STUDENT_3 = [1.0, 2.0, 0.5], [0.0, 1.0, 3.0]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _random_problem(seed, batch=2, seq=7, vocab=50, hidden=16, k=5, dtype=torch.float32):
    """Student hidden/head, a teacher's top-k cache (one row with padding slots), and a mask."""
    gen = torch.Generator().manual_seed(seed)
    hidden_bth = torch.randn(batch, seq, hidden, generator=gen, dtype=dtype)
    weight_vh = torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.4
    teacher_btv = torch.randn(batch, seq, vocab, generator=gen, dtype=dtype) * 2.0
    logprobs_btk, ids_btk = teacher_btv.log_softmax(-1).topk(k)
    ids_btk[0, 1, 3:] = -1  # a variable-k row
    mask_bt = torch.rand(batch, seq, generator=gen) > 0.3
    mask_bt[0, 0] = True
    return hidden_bth, weight_vh, teacher_btv, ids_btk, logprobs_btk, mask_bt


# ---------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_matches_hand_computed_value(kind, temperature):
    p = _softmax(TEACHER_3, temperature)
    q = _softmax(STUDENT_3, temperature)
    expected = temperature**2 * HAND[kind](p, q)
    got = divergence(
        torch.tensor([STUDENT_3]), torch.tensor([TEACHER_3]), kind=kind,
        temperature=temperature, beta=BETA, alpha=ALPHA,
    )  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_jsd_endpoints_are_exactly_the_two_kls():
    student, teacher = torch.randn(4, 6, 11), torch.randn(4, 6, 11)
    fkl = divergence(student, teacher, kind="fkl")
    rkl = divergence(student, teacher, kind="rkl")
    assert torch.equal(divergence(student, teacher, kind="jsd", beta=0.0), fkl)
    assert torch.equal(divergence(student, teacher, kind="jsd", beta=1.0), rkl)
    # and the skew kinds reduce to the plain KLs at alpha = 0
    assert torch.equal(divergence(student, teacher, kind="skew_fkl", alpha=0.0), fkl)
    assert torch.equal(divergence(student, teacher, kind="skew_rkl", alpha=0.0), rkl)
    assert fkl.item() != pytest.approx(rkl.item())  # the test would be vacuous otherwise


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero(kind):
    logits_btv = torch.randn(2, 5, 13, generator=torch.Generator().manual_seed(1)) * 3
    same = divergence(logits_btv, logits_btv.clone(), kind=kind, temperature=1.7)
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # mixture kinds round at ~1e-8
    # sparse: teacher cache taken from the same distribution, tail non-empty, any temperature
    logprobs_btk, ids_btk = logits_btv.log_softmax(-1).topk(4)
    for temperature in (1.0, 2.5):
        got = sparse_divergence(
            logits_btv, ids_btk, logprobs_btk, kind=kind, temperature=temperature
        )
        # the two tails come by different fp32 routes (logsumexp of the complement vs
        # log1p(-exp(lse(top-k)))): the KLs square that ~1e-7 difference away, tvd is linear in it
        assert got.item() == pytest.approx(0.0, abs=1e-5 if kind == "tvd" else 1e-6)


def test_temperature_scales_by_t_squared():
    student, teacher = torch.randn(3, 9), torch.randn(3, 9)
    for kind in KINDS:
        hot = divergence(student, teacher, kind=kind, temperature=2.0)
        cold = divergence(student / 2.0, teacher / 2.0, kind=kind, temperature=1.0)
        assert hot.item() == pytest.approx(4.0 * cold.item(), rel=1e-5)


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="fkl, rkl, jsd, skew_fkl, skew_rkl, tvd"):
        divergence(torch.zeros(1, 3), torch.zeros(1, 3), kind="kl")
    with pytest.raises(ValueError, match="valid kinds"):
        ids_11 = torch.zeros(1, 1, dtype=torch.long)
        sparse_divergence(torch.zeros(1, 3), ids_11, torch.zeros(1, 1), kind="x")


# ---------------------------------------------------------------------------------- masks


def _assert_zero_with_finite_grads(loss, *leaves):
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, leaves)
    for grad in grads:
        assert torch.isfinite(grad).all() and not grad.any()


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_gives_zero_and_finite_grads(kind):
    hidden_bth, weight_vh, teacher_btv, ids_btk, logprobs_btk, _ = _random_problem(0)
    hidden_bth.requires_grad_()
    weight_vh.requires_grad_()
    empty_bt = torch.zeros(hidden_bth.shape[:2], dtype=torch.bool)
    def logits_btv():  # a fresh graph per loss
        return hidden_bth @ weight_vh.T

    _assert_zero_with_finite_grads(
        divergence(logits_btv(), teacher_btv, empty_bt, kind), hidden_bth
    )
    _assert_zero_with_finite_grads(
        sparse_divergence(logits_btv(), ids_btk, logprobs_btk, empty_bt, kind), hidden_bth
    )
    _assert_zero_with_finite_grads(
        fused_sparse_divergence(hidden_bth, weight_vh, ids_btk, logprobs_btk, empty_bt, kind),
        hidden_bth,
        weight_vh,
    )
    if kind == "fkl":
        _assert_zero_with_finite_grads(
            sampled_forward_kl(logits_btv(), ids_btk, logprobs_btk, empty_bt), hidden_bth
        )
        _assert_zero_with_finite_grads(
            fused_dense_jsd(
                hidden_bth, weight_vh, hidden_bth.detach(), weight_vh.detach(), empty_bt
            ),
            hidden_bth,
            weight_vh,
        )


def test_mask_excludes_tokens_and_num_tokens_gives_global_mean():
    _, _, teacher_btv, ids_btk, logprobs_btk, mask_bt = _random_problem(1)
    student_btv = torch.randn_like(teacher_btv)
    student_btv[~mask_bt] = float("nan")  # garbage at masked positions must not leak
    full = divergence(student_btv, teacher_btv, mask_bt)
    per_token = divergence(student_btv, teacher_btv, mask_bt, reduction="none")
    assert full.item() == pytest.approx(per_token[mask_bt].mean().item(), rel=1e-6)
    assert not per_token[~mask_bt].any()
    # Two micro-batches normalised by the step's token count add up to the full-batch mean.
    count = int(mask_bt.sum())
    for loss_fn, args in (
        (divergence, (teacher_btv,)),
        (sparse_divergence, (ids_btk, logprobs_btk)),
    ):
        whole = loss_fn(student_btv, *args, mask_bt, kind="jsd")
        parts = sum(
            loss_fn(student_btv[i : i + 1], *(a[i : i + 1] for a in args), mask_bt[i : i + 1],
                    kind="jsd", num_tokens=count)
            for i in range(2)
        )  # fmt: skip
        assert parts.item() == pytest.approx(whole.item(), rel=1e-5)


# ---------------------------------------------------------------------------------- sparse


def test_sparse_matches_hand_computed_coarsened_value():
    # V = 4, the teacher's top 2 cached; the coarsened support is {0, 1, {2, 3}}.
    teacher, student = [3.0, 1.0, 0.0, -1.0], [0.5, 1.5, -0.5, 0.2]
    p, q = _softmax(teacher), _softmax(student)
    p_c, q_c = [p[0], p[1], p[2] + p[3]], [q[0], q[1], q[2] + q[3]]
    ids_11k = torch.tensor([[[0, 1]]])
    logprobs_11k = torch.tensor([[[math.log(p[0]), math.log(p[1])]]], dtype=torch.float64)
    student_11v = torch.tensor([[student]], dtype=torch.float64)
    for temperature in (1.0, 2.0):
        # temperature acts on the coarsened distributions: x_j^(1/T), renormalised, both sides
        p_t = _softmax([math.log(x) for x in p_c], temperature)
        q_t = _softmax([math.log(x) for x in q_c], temperature)
        for kind in KINDS:
            expected = temperature**2 * HAND[kind](p_t, q_t)
            for tail in (None, torch.tensor([[math.log(p_c[2])]], dtype=torch.float64)):
                got = sparse_divergence(
                    student_11v, ids_11k, logprobs_11k, kind=kind, temperature=temperature,
                    beta=BETA, alpha=ALPHA, teacher_tail_logprob=tail,
                )  # fmt: skip
                assert got.item() == pytest.approx(expected, rel=1e-9), (kind, temperature)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_with_full_mass_equals_dense(kind, temperature):
    gen = torch.Generator().manual_seed(2)
    vocab = 17
    student_btv = torch.randn(2, 3, vocab, generator=gen)
    teacher_btv = torch.randn(2, 3, vocab, generator=gen) * 2
    order_btk = torch.argsort(torch.rand(2, 3, vocab, generator=gen), -1)  # k = V, any order
    logprobs_btk = teacher_btv.log_softmax(-1).gather(-1, order_btk)
    pad = torch.full((2, 3, 2), -1)  # and two empty slots
    ids_btk = torch.cat([order_btk, pad], -1)
    logprobs_btk = torch.cat([logprobs_btk, torch.zeros(2, 3, 2)], -1)
    kwargs = dict(kind=kind, temperature=temperature, beta=BETA, alpha=ALPHA)
    dense = divergence(student_btv, teacher_btv, **kwargs)
    sparse = sparse_divergence(student_btv, ids_btk, logprobs_btk, **kwargs)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_is_never_negative_and_at_most_dense(kind):
    gen = torch.Generator().manual_seed(3)
    for scale in (0.1, 1.0, 10.0, 40.0):  # from near-uniform to near-one-hot on both sides
        student_btv = torch.randn(4, 16, 64, generator=gen) * scale
        teacher_btv = torch.randn(4, 16, 64, generator=gen) * scale
        logprobs_btk, ids_btk = teacher_btv.log_softmax(-1).topk(8)
        sparse_bt = sparse_divergence(student_btv, ids_btk, logprobs_btk, kind=kind,
                                      reduction="none")  # fmt: skip
        assert torch.isfinite(sparse_bt).all() and (sparse_bt >= 0).all()
        # coarsening cannot increase an f-divergence (data processing inequality); these are
        # all f-divergences, so this also checks that the tail is the right lumped outcome
        dense_bt = divergence(student_btv, teacher_btv, kind=kind, reduction="none")
        assert (sparse_bt <= dense_bt * (1 + 1e-4) + 1e-5).all()


def test_sparse_padding_slots_equal_a_shorter_k():
    _, _, teacher_btv, _, _, mask_bt = _random_problem(4)
    student_btv = torch.randn_like(teacher_btv)
    logprobs_btk, ids_btk = teacher_btv.log_softmax(-1).topk(6)
    padded_ids = torch.cat([ids_btk[..., :4], torch.full_like(ids_btk[..., :2], -1)], -1)
    padded_lp = torch.cat([logprobs_btk[..., :4], torch.full_like(logprobs_btk[..., :2], -7.0)], -1)
    # a real id whose teacher log-prob is -inf (a token the teacher masked) holds no mass either
    minus_inf = torch.full_like(logprobs_btk[..., :2], -math.inf)
    minus_inf_lp = torch.cat([logprobs_btk[..., :4], minus_inf], -1)
    for kind in KINDS:
        short = sparse_divergence(
            student_btv, ids_btk[..., :4], logprobs_btk[..., :4], mask_bt, kind
        )
        padded = sparse_divergence(student_btv, padded_ids, padded_lp, mask_bt, kind)
        assert padded.item() == pytest.approx(short.item(), rel=1e-6)
        masked = sparse_divergence(student_btv, ids_btk, minus_inf_lp, mask_bt, kind)
        assert masked.item() == pytest.approx(short.item(), rel=1e-6)


def test_sparse_tail_from_cache_equals_derived_tail():
    _, _, teacher_btv, _, _, mask_bt = _random_problem(5, dtype=torch.float64)
    student_btv = torch.randn_like(teacher_btv)
    logprobs_all = teacher_btv.log_softmax(-1)
    logprobs_btk, ids_btk = logprobs_all.topk(5)
    rest_btv = logprobs_all.scatter(-1, ids_btk, float("-inf"))
    tail_bt = rest_btv.logsumexp(-1)  # what the logit cache stores: exact, from all V logits
    for kind in KINDS:
        derived = sparse_divergence(student_btv, ids_btk, logprobs_btk, mask_bt, kind)
        given = sparse_divergence(student_btv, ids_btk, logprobs_btk, mask_bt, kind,
                                  teacher_tail_logprob=tail_bt)  # fmt: skip
        assert given.item() == pytest.approx(derived.item(), rel=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_analytic_gradient_passes_gradcheck(kind):
    gen = torch.Generator().manual_seed(6)
    student_nv = torch.randn(5, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_nv = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    logprobs_nk, ids_nk = teacher_nv.log_softmax(-1).topk(3)
    ids_nk[1, 2] = -1
    ids_nk[2] = -1  # a row with no real slot
    assert torch.autograd.gradcheck(
        lambda s: sparse_divergence(s, ids_nk, logprobs_nk, kind=kind, temperature=1.5,
                                    beta=BETA, alpha=ALPHA),
        (student_nv,),
    )  # fmt: skip


# ---------------------------------------------------------------------------------- fused


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [3, 7, 1024])  # 3 does not divide the 10 unmasked rows
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_fused_matches_sparse_value_and_gradients(kind, chunk_size, temperature):
    hidden_bth, weight_vh, _, ids_btk, logprobs_btk, mask_bt = _random_problem(7)
    hidden_bth.requires_grad_()
    weight_vh.requires_grad_()
    kwargs = dict(kind=kind, temperature=temperature, beta=BETA, alpha=ALPHA)
    plain = sparse_divergence(hidden_bth @ weight_vh.T, ids_btk, logprobs_btk, mask_bt, **kwargs)
    plain_grads = torch.autograd.grad(plain, (hidden_bth, weight_vh))
    fused = fused_sparse_divergence(hidden_bth, weight_vh, ids_btk, logprobs_btk, mask_bt,
                                    chunk_size=chunk_size, **kwargs)  # fmt: skip
    fused_grads = torch.autograd.grad(fused, (hidden_bth, weight_vh))
    assert plain.item() > 0
    assert _rel(fused, plain) < 1e-5
    for got, want in zip(fused_grads, plain_grads):
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_fused_returns_the_targets_log_prob_and_entropy_from_its_own_chunks(chunk_size):
    """With `targets`, the same loss and gradients plus each position's full-vocabulary log-prob
    of its target and entropy (T = 1) without gradient, 0 where masked."""
    hidden_bth, weight_vh, _, ids_btk, logprobs_btk, mask_bt = _random_problem(9)
    hidden_bth.requires_grad_()
    targets_bt = torch.randint(0, weight_vh.shape[0], mask_bt.shape,
                               generator=torch.Generator().manual_seed(3))
    args = (hidden_bth, weight_vh, ids_btk, logprobs_btk, mask_bt)
    kwargs = dict(kind="rkl", temperature=1.5, chunk_size=chunk_size)
    plain = fused_sparse_divergence(*args, **kwargs)
    (g_plain,) = torch.autograd.grad(plain, hidden_bth)
    loss, logp_bt, ent_bt = fused_sparse_divergence(*args, targets=targets_bt, **kwargs)
    (g_loss,) = torch.autograd.grad(loss, hidden_bth)
    assert loss.item() == plain.item() and torch.equal(g_loss, g_plain)
    assert not logp_bt.requires_grad and not ent_bt.requires_grad
    lp_btv = (hidden_bth.detach() @ weight_vh.T).double().log_softmax(-1)
    want_logp = lp_btv.gather(-1, targets_bt[..., None]).squeeze(-1) * mask_bt
    want_ent = -(lp_btv.exp() * lp_btv).sum(-1) * mask_bt
    assert mask_bt.any() and not mask_bt.all()
    torch.testing.assert_close(logp_bt.double(), want_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_bt.double(), want_ent, rtol=0, atol=1e-5)


def test_chunk_size_zero_is_auto_about_64_mib_of_logits():
    """loss.chunk_size=0 picks the rows that fit 2**24 fp32 logits: 110 at Qwen3's vocabulary,
    a whole batch at the tiny world's; the fused loss gives the same value and gradient."""
    assert chunk_rows(0, 151_936) == 110 and chunk_rows(0, 128) == 131_072
    assert chunk_rows(7, 151_936) == 7
    with pytest.raises(ValueError, match="chunk_size must be >= 0"):
        chunk_rows(-1, 128)
    hidden_bth, weight_vh, _, ids_btk, logprobs_btk, mask_bt = _random_problem(10)
    hidden_bth.requires_grad_()
    args = (hidden_bth, weight_vh, ids_btk, logprobs_btk, mask_bt)
    auto = fused_sparse_divergence(*args, kind="jsd", chunk_size=0)
    three = fused_sparse_divergence(*args, kind="jsd", chunk_size=3)
    assert _rel(auto, three) < 1e-6
    (g_auto,) = torch.autograd.grad(auto, hidden_bth)
    (g_three,) = torch.autograd.grad(three, hidden_bth)
    assert _rel(g_auto, g_three) < 1e-5


def test_fused_global_token_count_sum_and_upstream_grad():
    hidden_bth, weight_vh, _, ids_btk, logprobs_btk, mask_bt = _random_problem(8)
    hidden_bth.requires_grad_()
    tail_bt = torch.full(mask_bt.shape, -3.0)
    args = (ids_btk, logprobs_btk, mask_bt)
    for reduction, num_tokens in (("mean", 37), ("sum", None)):
        kwargs = dict(kind="rkl", teacher_tail_logprob=tail_bt, reduction=reduction,
                      num_tokens=num_tokens)  # fmt: skip
        plain = sparse_divergence(hidden_bth @ weight_vh.T, *args, **kwargs)
        fused = fused_sparse_divergence(hidden_bth, weight_vh, *args, chunk_size=4, **kwargs)
        assert _rel(fused, plain) < 1e-5
        # a non-unit upstream gradient (e.g. a loss weight) scales the saved gradients
        (g_plain,) = torch.autograd.grad(3.0 * plain, hidden_bth)
        (g_fused,) = torch.autograd.grad(3.0 * fused, hidden_bth)
        assert _rel(g_fused, g_plain) < 1e-5


def test_fused_bf16_follows_the_plain_path():
    problem = _random_problem(9, dtype=torch.bfloat16)
    hidden_bth, weight_vh, _, ids_btk, logprobs_btk, mask_bt = problem
    weight_vh.requires_grad_()
    plain = sparse_divergence(hidden_bth @ weight_vh.T, ids_btk, logprobs_btk, mask_bt, "jsd")
    (g_plain,) = torch.autograd.grad(plain, weight_vh)
    fused = fused_sparse_divergence(hidden_bth, weight_vh, ids_btk, logprobs_btk, mask_bt, "jsd",
                                    chunk_size=4)  # fmt: skip
    (g_fused,) = torch.autograd.grad(fused, weight_vh)
    assert fused.dtype == torch.float32  # the loss itself is always fp32
    assert _rel(fused, plain) < 1e-5  # same bf16 logits, same fp32 arithmetic after them
    assert g_fused.dtype == torch.bfloat16 and _rel(g_fused.float(), g_plain.float()) < 2e-2


# ---------------------------------------------------------------------------------- liger


@pytest.mark.parametrize("beta", [0.0, BETA, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_liger_fused_jsd_matches_divergence(beta, temperature):
    hidden_bth, weight_vh, _, _, _, mask_bt = _random_problem(10)
    gen = torch.Generator().manual_seed(11)
    teacher_hidden_bth = torch.randn(2, 7, 24, generator=gen)
    teacher_weight_vh = torch.randn(50, 24, generator=gen) * 0.4
    hidden_bth.requires_grad_()
    weight_vh.requires_grad_()
    want = divergence(hidden_bth @ weight_vh.T, teacher_hidden_bth @ teacher_weight_vh.T, mask_bt,
                      kind="jsd", beta=beta, temperature=temperature)  # fmt: skip
    want_grads = torch.autograd.grad(want, (hidden_bth, weight_vh))
    got = fused_dense_jsd(hidden_bth, weight_vh, teacher_hidden_bth, teacher_weight_vh, mask_bt,
                          beta=beta, temperature=temperature, chunk_size=4)  # fmt: skip
    got_grads = torch.autograd.grad(got, (hidden_bth, weight_vh))
    assert _rel(got, want) < 1e-5
    for g, w in zip(got_grads, want_grads):
        assert _rel(g, w) < 1e-5


# ---------------------------------------------------------------------------------- sampled


def test_sampled_estimator_is_unbiased_for_forward_kl():
    gen = torch.Generator().manual_seed(12)
    rows, repeats, draws, vocab = 4, 2000, 8, 6
    teacher_rv = torch.randn(rows, vocab, generator=gen) * 1.5
    student_rv = torch.randn(rows, vocab, generator=gen) * 1.5
    logp_rv, logq_rv = teacher_rv.double().log_softmax(-1), student_rv.double().log_softmax(-1)
    p_rv = logp_rv.exp()
    # exact mean and variance of one draw's term log p(x) - log q(x), x ~ p
    term_rv = logp_rv - logq_rv
    kl_r = (p_rv * term_rv).sum(-1)
    var_r = (p_rv * term_rv**2).sum(-1) - kl_r**2
    ids_rnk = torch.multinomial(p_rv.float(), repeats * draws, replacement=True, generator=gen)
    ids_rnk = ids_rnk.view(rows, repeats, draws)
    student_rnv = student_rv[:, None, :].expand(rows, repeats, vocab)
    logprobs_rnk = logp_rv.float()[torch.arange(rows)[:, None, None], ids_rnk]
    estimate = sampled_forward_kl(student_rnv, ids_rnk, logprobs_rnk)
    # mean of rows * repeats * draws independent terms: standard error from the exact variance
    stderr = math.sqrt(var_r.sum().item() / rows**2 / (repeats * draws))
    assert abs(estimate.item() - kl_r.mean().item()) < 4 * stderr  # a 4-sigma band, honest
    assert stderr < 0.05 * kl_r.mean().item()  # and the band is tight enough to mean something
    # without teacher log-probs it estimates the cross-entropy = KL + teacher entropy; the
    # difference of the two estimates is the sample mean of -log p(x), with its own variance
    entropy_r = -(p_rv * logp_rv).sum(-1)
    var_h = ((p_rv * logp_rv**2).sum(-1) - entropy_r**2).sum().item() / rows**2
    ce = sampled_forward_kl(student_rnv, ids_rnk, None)
    assert ce.item() - estimate.item() == pytest.approx(
        entropy_r.mean().item(), abs=4 * math.sqrt(var_h / (repeats * draws))
    )
