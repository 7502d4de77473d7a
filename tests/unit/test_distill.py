"""Loss pieces and schedules of the distillation stages (factory/stages/distill.py), on tiny
tensors."""

from __future__ import annotations

import pytest
import torch

from factory.config import LossConfig
from factory.errors import ConfigError
from factory.inspect import compose
from factory.losses import divergence, sampled_forward_kl, sparse_divergence
from factory.stages.distill import (
    cache_divergence,
    is_on_policy,
    micro_sizes,
    off_policy_stage,
    on_policy_stage,
    pack,
    sampled_token_loss,
    step_stream,
    topk_reverse_kl,
)
from teachers.cache import from_logits

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

N, H, V, K = 7, 6, 19, 4


def _leaves(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    return hidden, weight, g


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


def test_sampled_token_loss_has_the_analytic_policy_gradient():
    """d loss / d z_t = -(w_t A_t / n) (onehot(x_t) - softmax(z_t)), w and A held constant."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randint(0, V, (N,), generator=g)
    logp_s = logits.log_softmax(-1).gather(-1, x[:, None]).squeeze(-1)
    # sampled at temperature 0.7, scored by an unrelated teacher
    logp_q = (logits.detach() / 0.7).log_softmax(-1).gather(-1, x[:, None]).squeeze(-1)
    logp_t = torch.randn(N, V, generator=g, dtype=torch.float64).log_softmax(-1).gather(
        -1, x[:, None]).squeeze(-1)
    num_tokens = 11  # the step's count: more tokens than this micro-batch holds

    loss = sampled_token_loss(logp_s, logp_q, logp_t, num_tokens)
    (grad,) = _grads(loss, logits)

    w = torch.exp(logp_s.detach() - logp_q)
    A = -(logp_s.detach() - logp_t)
    torch.testing.assert_close(loss, -(w * A * logp_s.detach()).sum() / num_tokens)
    onehot = torch.nn.functional.one_hot(x, V).double()
    want = -(w * A / num_tokens)[:, None] * (onehot - logits.detach().softmax(-1))
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.5])
def test_sampled_token_loss_is_unbiased_for_the_reverse_kl_gradient(temperature):
    """E_{x ~ q_T}[grad loss(x)] = grad KL(p_s || p_t) for one position, exactly (enumerating V):
    the importance weight corrects for sampling at the student's temperature."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, V, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(1, V, generator=g, dtype=torch.float64)
    q = (z.detach() / temperature).softmax(-1)[0]

    expected = torch.zeros_like(z)
    for x in range(V):
        tok = torch.tensor([x])
        logp_s = z.log_softmax(-1)[:, x]
        logp_q = (z.detach() / temperature).log_softmax(-1)[:, x]
        logp_t = teacher.log_softmax(-1)[:, x]
        (grad,) = _grads(sampled_token_loss(logp_s, logp_q, logp_t, num_tokens=1), z)
        expected += q[tok] * grad
    (want,) = _grads(divergence(z, teacher, kind="rkl"), z)
    torch.testing.assert_close(expected, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [2, 7, 1024])
def test_topk_estimator_equals_the_sparse_reverse_kl(chunk):
    hidden, weight, g = _leaves(3, dtype=torch.float32)
    ids, logprobs, tail = from_logits(torch.randn(N, V, generator=g) * 3, K)
    num_tokens = 10

    got = topk_reverse_kl(hidden, weight, ids, logprobs, tail, num_tokens=num_tokens,
                          chunk_size=chunk)
    want = sparse_divergence(hidden @ weight.T, ids, logprobs, kind="rkl",
                             teacher_tail_logprob=tail, num_tokens=num_tokens)
    assert want > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_topk_estimator_is_zero_against_the_students_own_rows():
    hidden, weight, _ = _leaves(4, dtype=torch.float32)
    ids, logprobs, tail = from_logits((hidden @ weight.T).detach(), K)
    got = topk_reverse_kl(hidden, weight, ids, logprobs, tail, num_tokens=N)
    assert got.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
def test_cache_divergence_on_topk_rows_is_the_configured_sparse_divergence(kind):
    hidden, weight, g = _leaves(5, dtype=torch.float32)
    ids, logprobs, tail = from_logits(torch.randn(N, V, generator=g) * 2, K)
    cfg = LossConfig(kind=kind, temperature=2.0, beta=0.3, chunk_size=3)
    got = cache_divergence(hidden, weight, ids, logprobs, tail, cache_mode="topk",
                           loss_cfg=cfg, num_tokens=12)
    want = sparse_divergence(hidden @ weight.T, ids, logprobs, kind=kind, temperature=2.0,
                             beta=0.3, teacher_tail_logprob=tail, num_tokens=12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cache_divergence_on_sampled_rows_is_the_sampled_forward_kl():
    hidden, weight, g = _leaves(6)
    ids, logprobs, tail = from_logits(torch.randn(N, V, generator=g, dtype=torch.float64), K,
                                      mode="sampled", generator=g)
    cfg = LossConfig(kind="fkl", chunk_size=3)
    got = cache_divergence(hidden, weight, ids, logprobs, tail, cache_mode="sampled",
                           loss_cfg=cfg, num_tokens=9)
    want = sampled_forward_kl(hidden @ weight.T, ids, logprobs, num_tokens=9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gkd_lambda_zero_one_and_a_deterministic_half():
    steps = range(1, 201)
    assert not any(is_on_policy(0, s, 0.0) for s in steps)
    assert all(is_on_policy(0, s, 1.0) for s in steps)
    half = [is_on_policy(0, s, 0.5) for s in steps]
    assert half == [is_on_policy(0, s, 0.5) for s in steps]  # a pure function of (seed, step)
    assert 0.4 < sum(half) / len(half) < 0.6
    assert half != [is_on_policy(1, s, 0.5) for s in steps]  # and of the seed
    # a larger lambda turns on a superset of the steps (the same draw, a higher bar)
    quarter = [is_on_policy(0, s, 0.25) for s in steps]
    assert all(h for q, h in zip(quarter, half) if q) and sum(quarter) < sum(half)


def test_step_streams_are_reproducible_and_independent():
    def draw(*args):
        return torch.rand(4, generator=step_stream(*args)).tolist()

    assert draw(3, 5, 1) == draw(3, 5, 1)
    assert len({tuple(draw(3, 5, s)) for s in range(4)}) == 4  # streams of one step
    assert draw(3, 5, 1) != draw(3, 6, 1) and draw(3, 5, 1) != draw(3, 5, 1, 1)  # step, rank


def test_micro_sizes_split_evenly_and_contiguously():
    assert micro_sizes(8, 2) == [4, 4]
    assert micro_sizes(7, 3) == [2, 2, 3]
    assert micro_sizes(2, 2) == [1, 1]
    assert sum(micro_sizes(101, 7)) == 101


def test_pack_predicts_each_response_token_from_the_position_before_it():
    seqs = [[10, 11, 12, 13, 14], [20, 21, 22]]
    packed = pack(seqs, starts=[2, 1], offsets=[[0, 2], [0, 1]], pad_id=0)
    assert packed.input_ids_bl.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]]
    assert packed.attention_mask_bl.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert packed.row_n.tolist() == [0, 0, 1, 1]
    assert packed.pos_n.tolist() == [1, 3, 0, 1]
    assert packed.target_n.tolist() == [12, 14, 21, 22]
    with pytest.raises(ValueError, match="prompt token"):
        pack([[1, 2]], starts=[0], offsets=[[0]], pad_id=0)


def test_pack_shares_rows_between_short_sequences_without_widening_them():
    seqs = [[10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31], [40, 41, 42]]
    packed = pack(seqs, starts=[1, 1, 1, 2], offsets=[[0, 4], [1], [0], [0]], pad_id=0)
    # first fit by decreasing length into rows of the longest (6): [0], [1, 3], [2]
    assert packed.input_ids_bl.tolist() == [[10, 11, 12, 13, 14, 15], [20, 21, 22, 40, 41, 42],
                                            [30, 31, 0, 0, 0, 0]]
    assert packed.attention_mask_bl.tolist() == [[1] * 6, [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert packed.position_ids_bl.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2],
                                               [0, 1, 2, 3, 4, 5]]
    # loss tokens stay in sequence order (the teacher rows are concatenated in that order)
    assert packed.target_n.tolist() == [11, 15, 22, 31, 42]
    assert packed.row_n.tolist() == [0, 0, 1, 2, 1]


def test_packed_rows_give_each_sequence_the_hidden_states_of_its_own_forward():
    """Sequences sharing a row must not see each other: the block-causal mask transformers
    builds from the restarting positions (no attention mask) is what keeps them apart."""
    from factory.stages.distill import response_hidden
    from students.builders import build_model

    torch.manual_seed(0)
    model = build_model(compose([]).student, init="scratch").eval()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (9, 4, 5, 3, 6)]
    offsets = [list(range(len(s) - 1)) for s in seqs]
    packed = pack(seqs, starts=[1] * len(seqs), offsets=offsets, pad_id=0)
    assert packed.position_ids_bl is not None and packed.input_ids_bl.shape[0] < len(seqs)
    with torch.no_grad():
        got, _ = response_hidden(model, packed)
        want = torch.cat([response_hidden(model, pack([s], [1], [o], pad_id=0))[0]
                          for s, o in zip(seqs, offsets)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["pipeline.on_policy.estimator=exact"], "estimator='exact'"),
    (["pipeline.on_policy.gkd_lambda=1.5"], "gkd_lambda"),
    (["pipeline.on_policy.modes=[think,maybe]"], "modes holds 'maybe'"),
    (["pipeline.on_policy.modes=[]"], "modes is empty"),
    (["pipeline.on_policy.batch_size=1", "pipeline.on_policy.n_per_prompt=2",
      "pipeline.on_policy.grad_accum=4"], "grad_accum=4"),
    (["pipeline.cache.mode=sampled", "loss=rkl"], "forward KL only"),
    (["loss.kind=kl"], "loss.kind='kl'"),
])
def test_an_unrunnable_config_is_refused_when_the_stages_are_made(overrides, message):
    cfg = compose(overrides)
    on_policy = dict(init="base", teacher_model="teacher", offpolicy_set="set", cache="cache",
                     stage_cfg=cfg.pipeline.on_policy, loss_cfg=cfg.loss,
                     cache_cfg=cfg.pipeline.cache, task_cfg=cfg.task, seed=0, cfg=cfg)
    with pytest.raises(ConfigError, match=message):
        on_policy_stage("distill/on_policy", cfg.student, cfg.teacher, **on_policy)
    if not any(o.startswith("pipeline.on_policy") for o in overrides):
        with pytest.raises(ConfigError, match=message):
            off_policy_stage("distill/off_policy", cfg.student, base="base", offpolicy_set="set",
                             cache="cache", stage_cfg=cfg.pipeline.off_policy, loss_cfg=cfg.loss,
                             cache_cfg=cfg.pipeline.cache, seed=0, cfg=cfg)
