"""GRPO's pieces against hand-computed values: group-normalised advantages, the clipped surrogate
and its gradient, the k3 KL estimator, the entropy controller, and the chunked LM-head log-probs
and entropies against plain autograd."""

import math

import pytest
import torch

from factory import rl

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

EPS_LOW, EPS_HIGH = 0.2, 0.28


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0],  # mean .5, std .5
                            [2.0, 0.0, 0.0, 0.0]])  # mean .5, std sqrt(.75)
    adv = rl.group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    s = math.sqrt(0.75)
    assert torch.allclose(adv[1], torch.tensor([1.5 / s, -0.5 / s, -0.5 / s, -0.5 / s]))
    centred = rl.group_advantages(rewards, normalize_std=False)
    assert torch.allclose(centred, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.5, -0.5, -0.5, -0.5]]))


@pytest.mark.parametrize("normalize_std", [True, False])
def test_a_group_of_equal_rewards_has_zero_advantage_not_nan(normalize_std):
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    adv = rl.group_advantages(rewards, normalize_std=normalize_std)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:3], torch.zeros(3, 3))  # exactly zero: no signal, no drift
    assert adv[3, 1] > 0 > adv[3, 0]


# ----------------------------------------------------------------------------- the loss

def _tokens():
    """Five tokens: ratio 1.5 / 0.5 with positive and negative advantages, and a zero one."""
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2])
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
    return logp, old, adv


def test_clipped_loss_value_gradient_and_clip_fraction_by_hand():
    logp, old, adv = _tokens()
    loss, metrics = rl.grpo_loss(logp, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, num_tokens=5)
    # per token -min(rho A, clip(rho) A):
    #   rho 1.5, A +1: min(1.5, 1.28) = 1.28 (clipped)     -> -1.28
    #   rho 0.5, A +1: min(0.5, 0.8)  = 0.5                -> -0.5
    #   rho 0.5, A -1: min(-0.5, -0.8) = -0.8 (clipped)    -> +0.8
    #   rho 1.5, A -1: min(-1.5, -1.28) = -1.5             -> +1.5
    #   A 0                                                -> 0
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5) / 5, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["ratio"] == pytest.approx(5.0 / 5)
    loss.backward()
    # the gradient flows only through unclipped terms: d(-rho A)/d logp = -rho A
    want = torch.tensor([0.0, -0.5, 0.0, 1.5, 0.0]) / 5
    assert torch.allclose(logp.grad, want, atol=1e-6)


def test_loss_is_normalised_by_the_steps_token_count():
    logp, old, adv = _tokens()
    whole, _ = rl.grpo_loss(logp, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, num_tokens=5)
    first, _ = rl.grpo_loss(logp[:2], old[:2], adv[:2], eps_low=EPS_LOW, eps_high=EPS_HIGH,
                            num_tokens=5)
    rest, _ = rl.grpo_loss(logp[2:], old[2:], adv[2:], eps_low=EPS_LOW, eps_high=EPS_HIGH,
                           num_tokens=5)
    assert (first + rest).item() == pytest.approx(whole.item(), abs=1e-7)


def test_zero_advantage_gives_zero_loss_and_gradient_without_nan():
    logp, old, _ = _tokens()
    adv = rl.group_advantages(torch.ones(1, 5))[0]
    loss, metrics = rl.grpo_loss(logp, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, num_tokens=5)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(5))
    assert all(math.isfinite(v) for v in metrics.values())


def test_kl_and_entropy_terms():
    logp = torch.tensor([0.0, -1.0], requires_grad=True)
    old = logp.detach().clone()
    ref = torch.tensor([math.log(2.0), -1.0])
    entropy = torch.tensor([0.5, 1.5], requires_grad=True)
    loss, metrics = rl.grpo_loss(logp, old, torch.zeros(2), eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                 num_tokens=2, ref_logp_n=ref, kl_coef=0.1, entropy_n=entropy,
                                 entropy_coef=0.01)
    k3 = 2.0 - math.log(2.0) - 1.0  # exp(q) - q - 1 at q = log 2; 0 at the second token
    assert metrics["kl"] == pytest.approx(k3 / 2)
    assert metrics["entropy"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx((0.1 * k3 - 0.01 * 2.0) / 2, abs=1e-6)
    loss.backward()
    assert torch.allclose(entropy.grad, torch.full((2,), -0.01 / 2))
    # d k3 / d logp = 1 - exp(q): pushes logp toward the reference
    assert logp.grad[0].item() == pytest.approx(0.1 * (1 - 2.0) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp_n"):
        rl.grpo_loss(logp, old, torch.zeros(2), eps_low=EPS_LOW, eps_high=EPS_HIGH,
                     num_tokens=2, kl_coef=0.1)


def test_k3_is_zero_on_agreement_nonnegative_and_unbiased():
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(rl.k3_kl(x, x), torch.zeros(13))
    assert (rl.k3_kl(x, x.flip(0)) >= 0).all()
    # E_{y~p}[k3(log p(y), log q(y))] = KL(p || q) exactly
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(7, generator=g, dtype=torch.float64).log_softmax(-1)
    logq = torch.randn(7, generator=g, dtype=torch.float64).log_softmax(-1)
    expected = (logp.exp() * rl.k3_kl(logp, logq)).sum()
    kl = (logp.exp() * (logp - logq)).sum()
    assert expected.item() == pytest.approx(kl.item(), rel=1e-12)


# ----------------------------------------------------------------------------- entropy control

def _controller(**kw):
    args = dict(coef=0.01, target_low=0.5, target_high=1.0, rate=0.005, max_coef=0.02)
    return rl.EntropyController(**{**args, **kw})


def test_additive_controller_raises_below_lowers_above_holds_inside_and_clamps():
    c = _controller()
    assert c.update(0.2) == pytest.approx(0.015)  # entropy below the band: raise
    assert c.update(0.7) == pytest.approx(0.015)  # inside: hold
    assert c.update(1.5) == pytest.approx(0.010)  # above: lower
    for _ in range(5):
        c.update(2.0)
    assert c.coef == 0.0  # clamped at 0, never negative
    for _ in range(10):
        c.update(0.0)
    assert c.coef == pytest.approx(0.02)  # clamped at max_coef


def test_multiplicative_controller_grows_from_zero_and_drops_to_zero():
    c = _controller(coef=0.0, rule="multiplicative", rate=1.0, min_coef=0.001)
    assert c.update(0.1) == pytest.approx(0.002)  # from the floor, times 1 + rate
    assert c.update(0.1) == pytest.approx(0.004)
    assert c.update(3.0) == pytest.approx(0.002)
    assert c.update(3.0) == pytest.approx(0.001)
    assert c.update(3.0) == 0.0  # lowered below the floor


def test_disabled_controller_and_state_round_trip():
    off = _controller(enabled=False)
    assert off.update(0.0) == 0.01 and off.update(9.0) == 0.01
    on = _controller()
    on.update(0.0)
    again = _controller()
    again.load_state_dict(on.state_dict())
    assert again.coef == on.coef == pytest.approx(0.015)
    with pytest.raises(ValueError, match="min_coef > 0"):
        _controller(rule="multiplicative")
    with pytest.raises(ValueError, match="band"):
        _controller(target_low=2.0)
    with pytest.raises(ValueError, match="additive"):
        _controller(rule="linear")


# ----------------------------------------------------------------------------- chunked LM head

@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_logprobs_and_entropy_match_plain_autograd(chunk_size):
    g = torch.Generator().manual_seed(1)
    n, h, v, temperature = 11, 8, 19, 0.7
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    logp, ent = rl.token_logprobs_and_entropy(hidden, weight, targets, temperature=temperature,
                                              chunk_size=chunk_size)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    got = (logp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone())

    hidden.grad = weight.grad = None
    lp_nv = ((hidden @ weight.T) / temperature).log_softmax(-1)
    ref_logp = lp_nv.gather(-1, targets[:, None])[:, 0]
    ref_ent = -(lp_nv.exp() * lp_nv).sum(-1)
    ((ref_logp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    want = (ref_logp.detach(), ref_ent.detach(), hidden.grad, weight.grad)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_head_gives_the_models_own_logprobs():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32, tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 32, (2, 7))
    mask = torch.ones_like(ids)
    hidden, weight = rl.final_hidden_states(model, ids, mask)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp, ent = rl.token_logprobs_and_entropy(hidden[:, :-1].reshape(-1, 16), weight,
                                              ids[:, 1:].reshape(-1), chunk_size=3)
    want = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).reshape(-1)
    assert torch.allclose(logp, want, atol=1e-5)
    assert (ent > 0).all() and (ent <= math.log(32) + 1e-5).all()
