"""Pass@k against hand-computed values and brute force; `evaluate` on models of known output."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from factory import chat
from factory.config import SamplingConfig, TaskConfig
from factory.errors import FactoryError
from factory.evaluation import evaluate, pass_at_k, write_eval
from factory.sampling import THINKING_BUDGET_TEXT, sample, token_kwargs
from factory.tasks import Problem
from factory.tasks.arith import ArithTask, make_problem
from factory.tokenizer import build_tiny_tokenizer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


# --- pass@k ---------------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(64, 1, 64) == 1.0
    assert pass_at_k(64, 1, 8) == pytest.approx(8 / 64)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # n = k
    assert pass_at_k(7, 0, 3) == 0.0  # c = 0
    assert pass_at_k(7, 7, 3) == 1.0  # c = n
    assert pass_at_k(7, 5, 3) == 1.0  # n - c < k


def test_pass_at_k_matches_enumeration_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                exact = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_k_above_n():
    # a FactoryError (the CLI prints its message alone) that is also a ValueError
    with pytest.raises(FactoryError, match=r"k <= n.*raise eval.n_samples") as err:
        pass_at_k(8, 3, 64)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError):
        pass_at_k(8, 9, 1)


# --- evaluate on a model that writes known text -------------------------------------------------

TOK = build_tiny_tokenizer()


def tid(ch: str) -> int:
    return TOK.convert_tokens_to_ids(ch)


def bigram_model(successors: dict[str, list[str]]) -> Qwen3ForCausalLM:
    """A Qwen3 whose next token depends on the current token only: attention and MLP write
    nothing (o_proj, down_proj = 0), so the residual stream is the one-hot embedding, and the
    head scores each listed successor equally and far above everything else. Tokens with no
    entry are followed by <|im_end|>."""
    vocab = 128
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=vocab, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    head = torch.zeros(vocab, vocab)
    head[tid("<|im_end|>"), :] = 1.0
    for tok, nexts in successors.items():
        head[:, tid(tok)] = 0.0
        for nxt in nexts:
            head[tid(nxt), tid(tok)] = 1.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # RMSNorm maps a one-hot row to sqrt(128) on its entry: logits gap about 11 * 8 = 90
        model.lm_head.weight.copy_(8.0 * head)
    return model


ANSWER_42 = {"\n": ["4"], "4": ["2"]}  # every completion is "42<|im_end|>"
SAMPLING = SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0, max_new_tokens=16)


class Exact:
    name = "exact"

    def grade(self, problem: Problem, response: str) -> bool:
        return response == problem.answer


class Everything(Exact):
    def grade(self, problem, response):
        return True


class Nothing(Exact):
    def grade(self, problem, response):
        return False


def problems(*answers: str) -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"What is {a}?", answer=a) for i, a in enumerate(answers)]


def run_eval(model, task, probs, **kw):
    opts = dict(mode="no_think", n_samples=4, ks=[1, 2, 4], sampling=SAMPLING, batch_size=8, seed=0)
    opts.update(kw)
    return evaluate(model, TOK, task, probs, **opts)




def test_evaluate_counts_a_known_model():
    res = run_eval(bigram_model(ANSWER_42), Exact(), problems("42", "41", "42"))
    assert [p["c"] for p in res["per_problem"]] == [4, 0, 4]
    assert [p["n"] for p in res["per_problem"]] == [4, 4, 4]
    assert res["per_problem"][1]["pass@k"] == {"1": 0.0, "2": 0.0, "4": 0.0}
    assert res["pass@k"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "4": 2 / 3})
    assert res["pass@1"] == pytest.approx(2 / 3)
    assert res["mode"] == "no_think" and res["n_samples"] == 4 and res["n_problems"] == 3
    assert res["think_follow"] == 1.0  # no think block, as /no_think asks
    assert res["mean_response_tokens"] == 3.0  # "4", "2", <|im_end|>
    assert res["generated_tokens"] == 3 * 3 * 4 and res["truncated"] == 0.0
    assert [s["completion"] for s in res["samples_preview"]] == ["42"] * 3
    json.dumps(res)  # JSON-ready as it is


def test_evaluate_think_mode_scores_think_follow():
    # the model answers directly in both modes: it ignores /think
    res = run_eval(bigram_model(ANSWER_42), Exact(), problems("42"), mode="think", ks=[1])
    assert res["pass@1"] == 1.0 and res["think_follow"] == 0.0


def test_evaluate_applies_the_thinking_budget():
    """A model that thinks forever ("x" after "x"): after 2 tokens the report's sentence is
    inserted, closing the think block, and the model goes on writing."""
    model = bigram_model({"\n": ["x"], "x": ["x"]})
    budget_len = len(token_kwargs(TOK)["budget_ids"])
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=budget_len + 5)
    res = run_eval(model, Exact(), problems("42"), mode="think", ks=[1], sampling=sampling,
                   thinking_budget=2)
    assert res["samples_preview"][0]["completion"] == "xx" + THINKING_BUDGET_TEXT + "xxx"
    assert res["think_follow"] == 1.0 and res["truncated"] == 1.0
    assert res["mean_response_tokens"] == budget_len + 5
    # /no_think's prompt closes the block itself: no budget, "x" to the end
    res = run_eval(model, Exact(), problems("42"), ks=[1], sampling=sampling, thinking_budget=2)
    assert res["samples_preview"][0]["completion"] == "x" * (budget_len + 5)


def test_evaluate_counts_match_the_samples_it_drew():
    """A model that writes "42" or "52" at random: evaluate's counts equal a recount of the
    same draws (same prompts, same seed)."""
    model = bigram_model({"\n": ["4", "5"], "4": ["2"], "5": ["2"]})
    probs = problems("42", "52", "42")
    res = run_eval(model, Exact(), probs, n_samples=16, ks=[1, 4, 16], seed=3)
    prompts = [
        chat.prompt_ids(TOK, [chat.user_message(p.prompt, "no_think")], enable_thinking=False)
        for p in probs
    ]
    again = sample(model, prompts, 16, **vars(SAMPLING), **token_kwargs(TOK), batch_size=8,
                   generator=torch.Generator().manual_seed(3))
    texts = again.texts(TOK)
    assert set(texts) == {"42", "52"}
    counts = [sum(t == p.answer for t in texts[i * 16 : (i + 1) * 16]) for i, p in enumerate(probs)]
    assert [p["c"] for p in res["per_problem"]] == counts
    assert 0 < counts[0] < 16  # both answers were drawn
    assert res["pass@1"] == pytest.approx(sum(counts) / 48)
    assert res["pass@k"]["4"] == pytest.approx(sum(pass_at_k(16, c, 4) for c in counts) / 3)


def test_evaluate_all_or_nothing_graders():
    model = bigram_model(ANSWER_42)
    probs = problems("1", "2")
    yes = run_eval(model, Everything(), probs, sampling=vars(SAMPLING))  # a plain dict works too
    no = run_eval(model, Nothing(), probs)
    assert yes["pass@1"] == 1.0 and yes["pass@k"] == {"1": 1.0, "2": 1.0, "4": 1.0}
    assert no["pass@1"] == 0.0 and no["pass@k"] == {"1": 0.0, "2": 0.0, "4": 0.0}
    assert all(p["c"] == 0 for p in no["per_problem"])


def test_evaluate_with_the_arith_verifier():
    task = ArithTask(TaskConfig(name="arith", kind="arith"))
    probs = [make_problem([6, 7], ["*"], id="right"), make_problem([6, 8], ["*"], id="wrong")]
    res = run_eval(bigram_model(ANSWER_42), task, probs)
    assert [p["c"] for p in res["per_problem"]] == [4, 0]


def test_evaluate_checks_ks_before_sampling():
    class Exploding:
        def parameters(self):
            raise AssertionError("sampled before checking ks")

    with pytest.raises(ValueError, match="eval.n_samples"):
        run_eval(Exploding(), Exact(), problems("42"), n_samples=8, ks=[1, 64])


def test_write_eval_is_atomic_and_round_trips(tmp_path):
    res = run_eval(bigram_model(ANSWER_42), Exact(), problems("42"), ks=[1])
    path = tmp_path / "eval" / "eval.json"
    write_eval({"stale": True}, path)
    write_eval(res, path)
    assert json.loads(path.read_text()) == res
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary left behind
