"""The sampler against `model.generate`, a recomputed forward pass, and its own invariants."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from factory.sampling import Samples, filter_logits, sample, token_kwargs

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

VOCAB, EOS, PAD = 128, 2, 0
PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14, 15, 16], [1, 20], [1, 30, 31, 32, 33, 34]]


def tiny_config(**overrides) -> dict:
    # wide init and untied head: a random model whose greedy output varies, not one repeated id
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_theta=10_000.0, tie_word_embeddings=False, initializer_range=0.3,
        bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD, **overrides,
    )




@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**tiny_config())).eval()


def run(model, prompts=PROMPTS, n=1, **kw) -> Samples:
    opts = dict(temperature=0.0, max_new_tokens=12, stop_ids=[EOS], pad_id=PAD)
    opts.update(kw)
    return sample(model, prompts, n, **opts)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def recomputed_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log-softmax at temperature 1 of a plain forward pass over prompt + tokens: [T, V]."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].log_softmax(-1)


def test_shapes_grouping_and_lengths(model):
    out = run(model, n=3, temperature=1.0, generator=seeded(0), stop_ids=list(range(2, 12)),
              progress=True)
    assert len(out) == 3 * len(PROMPTS)
    assert out.prompt_index == [p for p in range(len(PROMPTS)) for _ in range(3)]
    stops = set(range(2, 12))
    for toks, lps, forced, done in zip(out.tokens, out.logprobs, out.forced, out.finished):
        assert len(toks) == len(lps) == len(forced) <= 12
        assert not any(forced)
        assert all(lp <= 0.0 for lp in lps)
        # a row stops at its first stop id and nowhere else
        assert not any(t in stops for t in toks[:-1])
        assert done == (toks[-1] in stops)
        assert done or len(toks) == 12
    assert any(out.finished) and not all(out.finished)


def test_stops_at_first_stop_id(model):
    free = run(model, stop_ids=[])
    assert all(len(t) == 12 for t in free.tokens) and not any(free.finished)
    stop = free.tokens[1][4]  # a token prompt 1 produces greedily at step 4 (maybe earlier)
    cut = run(model, stop_ids=[stop])
    first = free.tokens[1].index(stop)
    assert cut.tokens[1] == free.tokens[1][: first + 1]
    assert cut.finished[1]


def test_max_new_tokens_respected(model):
    for m in (1, 5):
        out = run(model, n=2, temperature=1.0, max_new_tokens=m, stop_ids=[], generator=seeded(1))
        assert [len(t) for t in out.tokens] == [m] * len(out)


def test_same_seed_same_samples(model):
    kw = dict(n=4, temperature=0.8, top_k=20, top_p=0.9, generator=None)
    a = run(model, **{**kw, "generator": seeded(7)})
    b = run(model, **{**kw, "generator": seeded(7)})
    c = run(model, **{**kw, "generator": seeded(8)})
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    # the n samples of one prompt are drawn independently, not copies of one another
    assert len({tuple(t) for t in a.tokens[:4]}) > 1


def test_batched_left_padded_equals_each_prompt_alone(model):
    alone = [run(model, [p]).tokens[0] for p in PROMPTS]
    batched = run(model, n=2)
    assert batched.tokens == [t for t in alone for _ in range(2)]
    # tiny batches: waves of one prompt, and one prompt's samples split over waves
    split = run(model, n=3, batch_size=2)
    assert split.tokens == [t for t in alone for _ in range(3)]
    assert split.prompt_index == [p for p in range(len(PROMPTS)) for _ in range(3)]


def test_greedy_matches_generate(model):
    for p in PROMPTS:
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
        ref = ref[0, len(p):].tolist()
        if EOS in ref:
            ref = ref[: ref.index(EOS) + 1]
        assert run(model, [p]).tokens[0] == ref


def test_greedy_matches_generate_moe():
    torch.manual_seed(0)
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **tiny_config(), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    )).eval()
    got = run(moe, n=2)
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([p])
        ref = moe.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
        ref = ref[0, len(p):].tolist()
        assert got.tokens[2 * i] == got.tokens[2 * i + 1] == ref[: len(got.tokens[2 * i])]


def test_logprobs_are_the_models_at_temperature_one(model):
    out = run(model, n=3, temperature=1.0, top_k=0, top_p=1.0, generator=seeded(3))
    for p, toks, lps in zip(out.prompt_index, out.tokens, out.logprobs):
        ref = recomputed_logprobs(model, PROMPTS[p], toks)
        expected = ref.gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=1e-4)


def test_logprobs_are_of_the_filtered_distribution(model):
    t, k = 0.7, 3
    out = run(model, n=3, temperature=t, top_k=k, generator=seeded(4))
    for p, toks, lps in zip(out.prompt_index, out.tokens, out.logprobs):
        ref = recomputed_logprobs(model, PROMPTS[p], toks)  # log-softmax at T=1: same order
        top_vals, top_ids = ref.topk(k, dim=-1)
        for step, tok in enumerate(toks):
            assert tok in top_ids[step].tolist()  # never outside the top k
            renorm = (top_vals[step] / t).log_softmax(-1)
            expected = renorm[top_ids[step].tolist().index(tok)].item()
            assert lps[step] == pytest.approx(expected, abs=1e-4)


def test_top_k_one_is_greedy(model):
    greedy = run(model, n=2)
    top1 = run(model, n=2, temperature=1.3, top_k=1, generator=seeded(5))
    assert top1.tokens == greedy.tokens
    assert all(lp == 0.0 for row in top1.logprobs for lp in row)  # a point mass


def test_filters_on_known_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(**kw):
        opts = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
        opts.update(kw)
        scores, ids = filter_logits(logits, **opts)
        ids = torch.arange(4)[None] if ids is None else ids
        return sorted(ids[scores > -math.inf].tolist())

    assert kept() == [0, 1, 2, 3]
    assert kept(top_k=3) == [0, 1, 2]
    assert kept(top_p=0.75) == [0, 1]  # 0.5 < 0.75, then 0.8 >= 0.75: stop
    assert kept(top_p=0.4) == [0]
    assert kept(top_p=0.9) == [0, 1, 2]
    assert kept(min_p=0.5) == [0, 1]  # p >= 0.5 * 0.5
    assert kept(top_k=3, top_p=0.75 / 0.95) == [0, 1]  # top-p on the renormalised top-k
    scores, _ = filter_logits(logits, temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    torch.testing.assert_close(scores.softmax(-1), torch.tensor([[0.5, 0.3, 0.15]]) / 0.95)


def test_sampling_follows_the_distribution():
    """A 4-token model, sampled 20k times: frequencies match the filtered probabilities."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20_000, 4)
    from factory.sampling import _next_tokens

    toks, lps = _next_tokens(logits, temperature=1.0, top_k=3, top_p=1.0, min_p=0.0,
                             generator=seeded(0))
    freq = torch.bincount(toks, minlength=4).float() / len(toks)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.01, rtol=0)
    torch.testing.assert_close(lps.exp(), torch.tensor([0.5, 0.3, 0.15])[toks] / 0.95)


class NeverClose:
    """A forward hook on the LM head that makes one token impossible (logit -inf)."""

    def __init__(self, model, token: int):
        self.token = token
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        output[..., self.token] = -math.inf
        return output


def test_thinking_budget_forces_the_closing_ids(model):
    think_open, think_close, budget = 3, 4, 5
    budget_ids = [40, 41, think_close, 42, 42]
    prompts = [[1, 5, 6, think_open], [1, 9, 10], [1, 5, think_open, 6, think_close, 7]]
    hook = NeverClose(model, think_close)
    try:
        out = run(model, prompts, n=2, temperature=1.0, max_new_tokens=14, stop_ids=[],
                  thinking_budget=budget, budget_ids=budget_ids, think_open_id=think_open,
                  think_close_id=think_close, generator=seeded(6))
    finally:
        hook.handle.remove()
    for p, toks, lps, forced in zip(out.prompt_index, out.tokens, out.logprobs, out.forced):
        assert len(toks) == 14
        if p < 2:  # still thinking after `budget` tokens: the closing ids, then free sampling
            assert toks[budget : budget + 5] == budget_ids
            assert forced == [False] * budget + [True] * 5 + [False] * 4
            assert all(lp == 0.0 for lp in lps[budget : budget + 5])
            assert think_close not in toks[:budget] + toks[budget + 5 :]
        else:  # the prompt already closed its think block (the /no_think prompt): no budget
            assert not any(forced)


def test_thinking_budget_spares_rows_that_closed(model):
    free = run(model, [PROMPTS[1]])
    think_close = free.tokens[0][1]  # pretend the row's greedy token at step 1 is </think>
    out = run(model, [PROMPTS[1]], thinking_budget=3, budget_ids=[40, 41], think_open_id=3,
              think_close_id=think_close)
    assert out.tokens == free.tokens and not any(out.forced[0])


def test_thinking_budget_needs_its_ids(model):
    with pytest.raises(ValueError, match="budget_ids"):
        run(model, thinking_budget=4)


def test_restores_training_mode(model):
    model.train()
    try:
        run(model, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_texts_and_token_kwargs_with_the_tiny_tokenizer():
    from factory.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = tok.encode("<think>\nab\n</think>\n\n42<|im_end|>", add_special_tokens=False)
    out = Samples(prompt_index=[0, 0], tokens=[ids, ids[:3]],
                  logprobs=[[0.0] * len(ids), [0.0] * 3],
                  forced=[[False] * len(ids), [False] * 3], finished=[True, False])
    assert out.texts(tok) == ["<think>\nab\n</think>\n\n42", "<think>\na"]
    assert out.texts(tok, include_stop=True)[0].endswith("42<|im_end|>")
    kw = token_kwargs(tok)
    assert kw["stop_ids"] == [0, 2] and kw["pad_id"] == 0
    assert (kw["think_open_id"], kw["think_close_id"]) == (3, 4)
    assert tok.decode(kw["budget_ids"]).endswith("directly now.\n</think>.\n\n")


def test_preallocated_cache_layer_crops_like_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from factory.sampling import _PreallocatedLayer

    keys = torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(0))
    values = torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(1))
    ours, reference = _PreallocatedLayer(max_len=32), DynamicLayer()
    for layer in (ours, reference):
        layer.update(keys, values)
        layer.crop(-3)
    assert ours.get_seq_length() == reference.get_seq_length() == 4
    assert torch.equal(ours.keys, reference.keys) and torch.equal(ours.values, reference.values)
    with pytest.raises(ValueError):
        ours.crop(2)
    ours.update(keys[:, :, :1], values[:, :, :1])  # appending after a crop overwrites the tail
    assert torch.equal(ours.keys[:, :, 4], keys[:, :, 0])
