"""The teacher bank's backends (teachers/bank.py) on the tiny-moe teacher, CPU only (seconds).

The hf backend is checked against a plain full forward. The vLLM backends cannot run here (no
GPU, vLLM not installed), so what they share with each other -- request building, the
thinking-budget phases, log-probs -> rows -- is checked on data shaped exactly as vLLM returns
it, computed from the same model's real log-softmax; the in-process backend's glue runs against
a stand-in `vllm` module and the server backend against a real local HTTP server.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import socket
import subprocess
import sys
import threading
import types
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from factory import chat
from factory.errors import ConfigError, FactoryError
from factory.inspect import compose
from factory.sampling import sample, token_kwargs
from factory.store import Artifact
from factory.tokenizer import load_tokenizer
from students.builders import build_model
from teachers.bank import (
    Completion,
    CompletionRequest,
    HFBackend,
    VLLMBackend,
    VLLMServerBackend,
    build_generate_request,
    build_score_request,
    generate_in_phases,
    make_backend,
    rows_from_completion_choices,
    rows_from_completion_outputs,
    rows_from_prompt_logprobs,
)
from teachers.cache import LOGPROB_FLOOR

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
K = 8
# fp32 rounding of a padded, batched forward against an unpadded one, at log-probs down to -20
ATOL = 5e-5
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_new_tokens": 14}


# ----------------------------------------------------------------------------------------------
# The tiny teacher, its tokenizer, sequences
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return compose(["student=tiny"])  # the default teacher: tiny-moe


@pytest.fixture(scope="module")
def tokenizer(cfg):
    return load_tokenizer(cfg.teacher.tokenizer)


@pytest.fixture(scope="module")
def model(cfg):
    threads = torch.get_num_threads()  # module fixtures run before one_torch_thread
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg.teacher, init="scratch").eval()
    # a scratch model's logits are nearly uniform (init std 0.02): top-k order would be decided
    # by rounding noise; a wider (untied) head gives peaked, varied distributions
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(15.0)
    torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def sequences():
    """Mixed lengths (2..41) and starts, one with nothing to score (start == length)."""
    g = torch.Generator().manual_seed(1)
    lengths = [17, 2, 41, 9, 30, 5, 23]
    seqs = [torch.randint(5, 100, (L,), generator=g).tolist() for L in lengths]
    starts = [6, 1, 12, 9, 3, 2, 20]
    return seqs, starts


def full_logprobs(model, seq: list[int]) -> torch.Tensor:
    """log-softmax (fp32, temperature 1) of one unpadded forward: row p is the distribution of
    token p + 1. [L, V]"""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)


def prompts_for(tokenizer) -> list[list[int]]:
    """Two thinking prompts (open: the budget applies) and a non-thinking one (closed)."""
    return [chat.prompt_ids(tokenizer, [chat.user_message(q, mode)],
                            enable_thinking=mode == "think")
            for q, mode in [("12+7=", "think"), ("3*4-1=", "no_think"), ("9-5=", "think")]]


# ----------------------------------------------------------------------------------------------
# hf: scoring against a full forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4, 64])  # 6 sequences to score
def test_hf_topk_rows_equal_a_full_forward(model, tokenizer, sequences, batch_size):
    seqs, starts = sequences
    rows = HFBackend(model, tokenizer, batch_size=batch_size).score(seqs, starts, k=K)
    assert len(rows) == len(seqs)
    for seq, start, r in zip(seqs, starts, rows):
        T = len(seq) - start
        assert r.ids_tk.shape == (T, K) and r.ids_tk.dtype == torch.int64
        assert r.logprobs_tk.dtype == r.tail_t.dtype == r.token_logprob_t.dtype == torch.float32
        assert r.tail_t.shape == r.token_logprob_t.shape == (T,) and len(r) == T
        lp_tv = full_logprobs(model, seq)[start - 1:len(seq) - 1]
        want_lp, want_ids = lp_tv.topk(K, dim=-1)
        assert torch.equal(r.ids_tk, want_ids)
        torch.testing.assert_close(r.logprobs_tk, want_lp, atol=ATOL, rtol=0)
        rest_tv = lp_tv.scatter(-1, want_ids, float("-inf"))
        torch.testing.assert_close(r.tail_t, rest_tv.logsumexp(-1), atol=ATOL, rtol=0)
        realised_t = lp_tv.gather(-1, torch.tensor(seq[start:])[:, None]).squeeze(-1)
        torch.testing.assert_close(r.token_logprob_t, realised_t, atol=ATOL, rtol=0)
        # the k tokens and the tail carry the whole distribution
        mass_t = r.logprobs_tk.double().exp().sum(-1) + r.tail_t.double().exp()
        torch.testing.assert_close(mass_t, torch.ones(T, dtype=torch.float64), atol=ATOL, rtol=0)


def test_hf_padding_and_batching_do_not_change_rows(model, tokenizer, sequences):
    seqs, starts = sequences
    alone = HFBackend(model, tokenizer, batch_size=1).score(seqs, starts, k=K)
    # the short sequences ride in one batch with the 41-token one: most of their row is padding
    together = HFBackend(model, tokenizer, batch_size=len(seqs)).score(seqs, starts, k=K)
    for a, b in zip(alone, together):
        assert torch.equal(a.ids_tk, b.ids_tk)
        for x, y in [(a.logprobs_tk, b.logprobs_tk), (a.tail_t, b.tail_t),
                     (a.token_logprob_t, b.token_logprob_t)]:
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_hf_sampled_rows_are_draws_independent_of_batching(model, tokenizer, sequences):
    seqs, starts = sequences
    k = 16
    runs = [HFBackend(model, tokenizer, batch_size=b).score(seqs, starts, k=k, mode="sampled",
                                                            seed=3) for b in (1, 4, 64)]
    other_seed = HFBackend(model, tokenizer).score(seqs, starts, k=k, mode="sampled", seed=4)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        first = runs[0][i]
        for run in runs[1:]:
            assert torch.equal(run[i].ids_tk, first.ids_tk)
        lp_tv = full_logprobs(model, seq)[start - 1:len(seq) - 1]
        torch.testing.assert_close(first.logprobs_tk, lp_tv.gather(-1, first.ids_tk), atol=ATOL,
                                   rtol=0)
        # tail: the mass outside the row's distinct ids (draws repeat ids)
        rest_tv = lp_tv.scatter(-1, first.ids_tk, float("-inf"))
        torch.testing.assert_close(first.tail_t, rest_tv.logsumexp(-1), atol=ATOL, rtol=0)
    drawn = torch.cat([r.ids_tk for r in runs[0]])
    assert not torch.equal(drawn, torch.cat([r.ids_tk for r in other_seed]))
    assert all(len(set(row)) < k for row in drawn.tolist()[:5])  # with replacement: repeats


def test_hf_score_rejects_bad_arguments(model, tokenizer):
    backend = HFBackend(model, tokenizer)
    with pytest.raises(ValueError, match="start 0"):
        backend.score([[5, 6, 7]], [0], k=K)
    with pytest.raises(ValueError, match="start 4"):
        backend.score([[5, 6, 7]], [4], k=K)
    with pytest.raises(ConfigError, match="mode"):
        backend.score([[5, 6, 7]], [1], k=K, mode="top")
    with pytest.raises(ValueError, match="vocabulary"):
        backend.score([[5, 6, 7]], [1], k=129)
    assert backend.score([], [], k=K) == []


def test_hf_generate_is_the_sampler(model, tokenizer):
    prompts = prompts_for(tokenizer)
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.0, "max_new_tokens": 12}
    got = HFBackend(model, tokenizer).generate(prompts, 2, sampling, seed=5, thinking_budget=4,
                                               batch_size=3)
    want = sample(model, prompts, 2, **sampling, thinking_budget=4, batch_size=3,
                  generator=torch.Generator().manual_seed(5), **token_kwargs(tokenizer))
    assert got == want
    without_min_p = {k: v for k, v in sampling.items() if k != "min_p"}
    with pytest.raises(ConfigError, match="missing \\['min_p'\\]"):
        HFBackend(model, tokenizer).generate(prompts, 1, without_min_p, seed=0)


# ----------------------------------------------------------------------------------------------
# vLLM-shaped data, built from the model's real log-softmax
# ----------------------------------------------------------------------------------------------


@dataclass
class Logprob:
    """vllm.logprobs.Logprob's shape."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_prompt_logprobs(model, seq: list[int], k: int) -> list[dict[int, Logprob] | None]:
    """What vLLM returns as prompt_logprobs=k: None at position 0, then the top-k entries with
    their vocabulary ranks, plus the realised token's entry when it is not among them."""
    lp_lv = full_logprobs(model, seq)
    out: list[dict[int, Logprob] | None] = [None]
    for p in range(1, len(seq)):
        lp_v = lp_lv[p - 1]
        vals, ids = lp_v.topk(k)
        entries = {int(i): Logprob(float(v), r + 1, chr(int(i))) for r, (v, i)
                   in enumerate(zip(vals, ids))}
        tok = seq[p]
        if tok not in entries:
            entries[tok] = Logprob(float(lp_v[tok]), int((lp_v > lp_v[tok]).sum()) + 1, chr(tok))
        out.append(entries)
    return out


def as_json(position_dicts) -> list:
    """The server's JSON form of prompt log-probs: token ids as string keys."""
    return json.loads(json.dumps([
        None if d is None else {str(t): {"logprob": e.logprob, "rank": e.rank,
                                         "decoded_token": e.decoded_token} for t, e in d.items()}
        for d in position_dicts
    ]))


def assert_rows_close(got, want):
    assert torch.equal(got.ids_tk, want.ids_tk)
    torch.testing.assert_close(got.logprobs_tk, want.logprobs_tk, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.tail_t, want.tail_t, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.token_logprob_t, want.token_logprob_t, atol=ATOL, rtol=0)


def test_prompt_logprobs_give_the_hf_rows(model, tokenizer, sequences):
    seqs, starts = sequences
    want = HFBackend(model, tokenizer).score(seqs, starts, k=K)
    extra = 0
    for seq, start, w in zip(seqs, starts, want):
        dicts = vllm_prompt_logprobs(model, seq, K)
        extra += sum(len(d) == K + 1 for d in dicts[start:])
        assert_rows_close(rows_from_prompt_logprobs(dicts, seq, start, K), w)
        assert_rows_close(rows_from_prompt_logprobs(as_json(dicts), seq, start, K), w)
    assert extra > 0  # some realised tokens fell outside the top k and were dropped from the row


def test_prompt_logprobs_tail_stays_finite_and_errors_name_the_fix():
    seq = [5, 6, 7]
    # a kept mass that rounds to 1 (or above): log(1 - 1) would be -inf
    dicts = [None, {6: Logprob(0.0, 1), 9: Logprob(-30.0, 2)},
             {7: Logprob(1e-7, 1), 8: Logprob(-20.0, 2)}]
    rows = rows_from_prompt_logprobs(dicts, seq, 1, 2)
    assert torch.equal(rows.tail_t, torch.full((2,), LOGPROB_FLOOR))
    assert rows.ids_tk.tolist() == [[6, 9], [7, 8]]
    with pytest.raises(FactoryError, match="fewer than k=3.*max_logprobs"):
        rows_from_prompt_logprobs(dicts, seq, 1, 3)
    with pytest.raises(FactoryError, match="realised token 7"):
        rows_from_prompt_logprobs([None, dicts[1], {8: Logprob(-1.0), 9: Logprob(-2.0)}], seq, 1, 2)
    with pytest.raises(FactoryError, match="no prompt log-probs at position 1"):
        rows_from_prompt_logprobs([None, None, dicts[2]], seq, 1, 2)
    with pytest.raises(ValueError, match="start 0"):
        rows_from_prompt_logprobs(dicts, seq, 0, 2)
    assert len(rows_from_prompt_logprobs(dicts, seq, 3, 2)) == 0


def test_requests_carry_vllm_field_names():
    req = CompletionRequest(prompt=[1, 2], n=3, max_tokens=9, seed=11)
    sampling = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "min_p": 0.05, "max_new_tokens": 99}
    assert build_generate_request(req, sampling, [2, 0]) == {
        "n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "min_p": 0.05, "max_tokens": 9,
        "seed": 11, "logprobs": 1, "stop_token_ids": [2, 0]}
    assert build_generate_request(req, {**sampling, "top_k": 20}, [2])["top_k"] == 20
    with pytest.raises(ConfigError, match="unknown \\['top_a'\\]"):
        build_generate_request(req, {**sampling, "top_a": 1}, [2])
    assert build_score_request(64) == {"max_tokens": 1, "prompt_logprobs": 64, "temperature": 1.0,
                                       "top_p": 1.0, "top_k": -1, "min_p": 0.0}


def test_completions_parse_in_index_order():
    out = types.SimpleNamespace
    outputs = [out(index=1, token_ids=[7, 2], finish_reason="stop",
                   logprobs=[{7: Logprob(-0.5), 3: Logprob(-0.1)}, {2: Logprob(-0.25)}]),
               out(index=0, token_ids=[9], finish_reason="length", logprobs=[{9: Logprob(-1.5)}])]
    assert rows_from_completion_outputs(outputs) == [Completion([9], [-1.5], False),
                                                     Completion([7, 2], [-0.5, -0.25], True)]
    choices = [{"index": 1, "text": "", "finish_reason": "length",
                "logprobs": {"tokens": ["token_id:9"], "token_logprobs": [-1.5]}},
               {"index": 0, "text": "", "finish_reason": "stop",
                "logprobs": {"tokens": ["token_id:7", "token_id:2"],
                             "token_logprobs": [-0.5, -0.25]}}]
    assert rows_from_completion_choices(choices) == [Completion([7, 2], [-0.5, -0.25], True),
                                                     Completion([9], [-1.5], False)]
    with pytest.raises(FactoryError, match="return_tokens_as_token_ids"):
        rows_from_completion_choices([{**choices[0], "logprobs": {"tokens": ["a"],
                                                                  "token_logprobs": [-1.0]}}])


# ----------------------------------------------------------------------------------------------
# The thinking-budget phases, on an engine that is the hf sampler
# ----------------------------------------------------------------------------------------------


def hf_engine(model, tokenizer, log: list | None = None):
    """`complete` for generate_in_phases: each request sampled alone (greedy here)."""
    tk = token_kwargs(tokenizer)

    def complete(requests):
        if log is not None:
            log.append(requests)
        out = []
        for r in requests:
            s = sample(model, [r.prompt], r.n, temperature=0.0, max_new_tokens=r.max_tokens,
                       stop_ids=tk["stop_ids"], pad_id=tk["pad_id"])
            out.append([Completion(t, lp, f) for t, lp, f in zip(s.tokens, s.logprobs, s.finished)])
        return out

    return complete


@pytest.mark.parametrize("budget", [None, 0, 4])
def test_phases_reproduce_the_samplers_thinking_budget(model, tokenizer, budget):
    prompts = prompts_for(tokenizer)
    tk = token_kwargs(tokenizer)
    log = []
    got = generate_in_phases(hf_engine(model, tokenizer, log), prompts, 2, 14, seed=0,
                             thinking_budget=budget, token_ids=tk)
    want = sample(model, prompts, 2, temperature=0.0, max_new_tokens=14, thinking_budget=budget,
                  **tk)
    assert got == want
    if budget is None:
        assert len(log) == 1 and [r.max_tokens for r in log[0]] == [14, 14, 14]
    else:
        # the no_think prompt is closed: never capped, never forced
        assert [r.max_tokens for r in log[0]] == ([14] if budget == 0 else [budget, 14, budget])
        assert not any(any(f) for f in got.forced[2:4])
        assert any(any(f) for f in got.forced)


# ----------------------------------------------------------------------------------------------
# The in-process vLLM backend against a stand-in `vllm` module
# ----------------------------------------------------------------------------------------------

# the fields of the real vllm.SamplingParams and LLM arguments this backend may pass
SAMPLING_PARAMS_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens",
                          "logprobs", "prompt_logprobs", "stop_token_ids", "detokenize"}
LLM_ARGS = {"model", "tensor_parallel_size", "gpu_memory_utilization", "max_logprobs", "dtype",
            "quantization", "enable_expert_parallel"}


def fake_vllm(engines: list) -> tuple[types.ModuleType, types.ModuleType]:
    """`vllm` and `vllm.inputs` answering like vLLM from the Hugging Face checkpoint they load."""

    class SamplingParams:
        def __init__(self, **kwargs):
            assert set(kwargs) <= SAMPLING_PARAMS_FIELDS, set(kwargs) - SAMPLING_PARAMS_FIELDS
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            assert set(kwargs) <= LLM_ARGS, set(kwargs) - LLM_ARGS
            self.kwargs = kwargs
            self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval()
            engines.append(self)

        def generate(self, prompts, sampling_params, use_tqdm=True):
            return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params)]

        def _one(self, prompt, sp):
            assert sp.max_tokens >= 1 and sp.detokenize is False
            if getattr(sp, "prompt_logprobs", None):
                assert sp.prompt_logprobs <= self.kwargs["max_logprobs"]
                return types.SimpleNamespace(
                    prompt_logprobs=vllm_prompt_logprobs(self.model, prompt, sp.prompt_logprobs),
                    outputs=[])
            assert sp.temperature == 0.0 and sp.top_k == -1 and sp.logprobs == 1
            s = sample(self.model, [prompt], sp.n, temperature=0.0, max_new_tokens=sp.max_tokens,
                       stop_ids=sp.stop_token_ids, pad_id=0)
            outputs = [types.SimpleNamespace(
                index=j, token_ids=tuple(t), finish_reason="stop" if f else "length",
                logprobs=[{tok: Logprob(lp)} for tok, lp in zip(t, lps)])
                for j, (t, lps, f) in enumerate(zip(s.tokens, s.logprobs, s.finished))]
            return types.SimpleNamespace(prompt_logprobs=None, outputs=outputs[::-1])

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.__spec__ = importlib.machinery.ModuleSpec("vllm.inputs", None)
    inputs.TokensPrompt = dict  # a TypedDict: calling it builds the dict
    vllm.inputs = inputs
    return vllm, inputs


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    """The tiny teacher as a model artifact: a save_pretrained directory."""
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return Artifact(kind="model", key="tiny-moe", path=path)


def test_vllm_backend_scores_and_generates_like_hf(model, tokenizer, sequences, artifact, cfg,
                                                   monkeypatch):
    engines = []
    vllm, inputs = fake_vllm(engines)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    backend = make_backend(compose(["student=tiny", "backend=vllm"]).backend, cfg.teacher,
                           artifact, tokenizer, batch_size=3)
    assert isinstance(backend, VLLMBackend)
    assert engines[0].kwargs == {"model": str(artifact.path), "tensor_parallel_size": 1,
                                 "gpu_memory_utilization": 0.85, "max_logprobs": 64,
                                 "dtype": "float32"}
    seqs, starts = sequences
    for got, want in zip(backend.score(seqs, starts, k=K),
                         HFBackend(model, tokenizer).score(seqs, starts, k=K)):
        assert_rows_close(got, want)
    prompts = prompts_for(tokenizer)
    got = backend.generate(prompts, 2, GREEDY, seed=0, thinking_budget=4)
    want = HFBackend(model, tokenizer).generate(prompts, 2, GREEDY, seed=0, thinking_budget=4)
    assert got == want
    with pytest.raises(ConfigError, match="backend=hf"):
        backend.score(seqs, starts, k=K, mode="sampled")
    with pytest.raises(ConfigError, match="backend.max_logprobs=65"):
        backend.score(seqs, starts, k=65)


def test_make_backend_hf_and_config_errors(model, tokenizer, sequences, artifact, cfg, monkeypatch):
    backend = make_backend(cfg.backend, cfg.teacher, artifact, tokenizer, batch_size=2)
    assert isinstance(backend, HFBackend) and backend.batch_size == 2
    seqs, starts = sequences
    for got, want in zip(backend.score(seqs, starts, k=K),
                         HFBackend(model, tokenizer).score(seqs, starts, k=K)):
        assert torch.equal(got.ids_tk, want.ids_tk)
        torch.testing.assert_close(got.logprobs_tk, want.logprobs_tk, atol=ATOL, rtol=0)

    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM absent, whatever this machine has
    with pytest.raises(ConfigError, match="pip install 'compact-factory\\[vllm\\]'"):
        make_backend(compose(["student=tiny", "backend=vllm"]).backend, cfg.teacher, artifact,
                     tokenizer)
    with pytest.raises(ConfigError, match="backend.url=http://host:8000/v1"):
        make_backend(compose(["student=tiny", "backend=vllm_server"]).backend, cfg.teacher,
                     artifact, tokenizer)
    server = compose(["student=tiny", "backend=vllm_server", "backend.url=http://h:1/v1/"])
    remote = make_backend(server.backend, cfg.teacher, artifact, tokenizer)
    assert isinstance(remote, VLLMServerBackend) and remote.url == "http://h:1/v1"
    assert remote.request_batch_size == 64 and remote.retry["max_retries"] == 5
    with pytest.raises(ConfigError, match="expected one of hf, vllm, vllm_server"):
        make_backend(types.SimpleNamespace(name="tgi"), cfg.teacher, artifact, tokenizer)


def test_vllm_quantization_maps_or_refuses(tokenizer, artifact, monkeypatch):
    engines = []
    vllm, inputs = fake_vllm(engines)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    four = compose(["student=tiny", "backend=vllm", "teacher.quantization=4bit",
                    "teacher.tensor_parallel=2", "teacher.expert_parallel=2"])
    make_backend(four.backend, four.teacher, artifact, tokenizer)
    assert engines[0].kwargs["quantization"] == "bitsandbytes"
    assert engines[0].kwargs["tensor_parallel_size"] == 2
    assert engines[0].kwargs["enable_expert_parallel"] is True
    eight = compose(["student=tiny", "backend=vllm", "teacher.quantization=8bit"])
    with pytest.raises(ConfigError, match="teacher.quantization=4bit"):
        make_backend(eight.backend, eight.teacher, artifact, tokenizer)


def test_importing_the_bank_never_imports_vllm(tmp_path):
    poisoned = tmp_path / "vllm"
    poisoned.mkdir()
    (poisoned / "__init__.py").write_text("raise ImportError('vllm was imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
           "HF_HUB_OFFLINE": "1"}
    code = "import sys, teachers.bank; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)


# ----------------------------------------------------------------------------------------------
# The server backend against a real local HTTP server
# ----------------------------------------------------------------------------------------------


class FakeServer:
    """An OpenAI-compatible /v1 server answering like vLLM from the tiny model. The first
    `fail_first` POSTs get HTTP 503 (a server still loading); prompt_logprobs above
    `max_logprobs` get vLLM's HTTP 400."""

    def __init__(self, model, fail_first: int = 0, max_logprobs: int = 20):
        self.model, self.fail_first, self.max_logprobs = model, fail_first, max_logprobs
        self.posts, self.gets = [], 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.gets += 1
                assert self.path == "/v1/models"
                self.reply(200, {"object": "list", "data": [{"id": "tiny-moe", "object": "model"}]})

            def do_POST(self):
                assert self.path == "/v1/completions"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.posts.append(body)
                    fail = len(server.posts) <= server.fail_first
                    status, answer = (503, {"object": "error", "message": "loading"}) if fail \
                        else server.answer(body)
                self.reply(status, answer)

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, body: dict) -> tuple[int, dict]:
        assert body["model"] == "tiny-moe"
        if body.get("prompt_logprobs"):
            k = body["prompt_logprobs"]
            if k > self.max_logprobs:
                return 400, {"object": "error", "message": f"Requested prompt logprobs of {k}, "
                             f"which is greater than max allowed: {self.max_logprobs}"}
            logprobs = vllm_prompt_logprobs(self.model, body["prompt"], k)
            choice = {"index": 0, "text": "x", "finish_reason": "length", "logprobs": None,
                      "prompt_logprobs": as_json(logprobs)}
            return 200, {"object": "text_completion", "model": "tiny-moe", "choices": [choice]}
        assert body["return_tokens_as_token_ids"] and body["logprobs"] == 1
        s = sample(self.model, [body["prompt"]], body["n"], temperature=body["temperature"],
                   top_k=max(body["top_k"], 0), top_p=body["top_p"], min_p=body["min_p"],
                   max_new_tokens=body["max_tokens"], stop_ids=body["stop_token_ids"], pad_id=0,
                   generator=torch.Generator().manual_seed(body["seed"]))
        choices = [{"index": j, "text": "", "finish_reason": "stop" if f else "length",
                    "logprobs": {"tokens": [f"token_id:{t}" for t in toks], "token_logprobs": lps,
                                 "top_logprobs": None, "text_offset": []}}
                   for j, (toks, lps, f) in enumerate(zip(s.tokens, s.logprobs, s.finished))]
        return 200, {"object": "text_completion", "model": "tiny-moe", "choices": choices[::-1]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_retries_503_then_scores_like_hf(model, tokenizer, sequences):
    seqs, starts = sequences
    with FakeServer(model, fail_first=2) as server:
        backend = VLLMServerBackend(server.url, tokenizer, request_batch_size=3, max_retries=3,
                                    backoff_s=0.001)
        rows = backend.score(seqs, starts, k=K)
    scored = sum(len(s) > st for s, st in zip(seqs, starts))
    assert len(server.posts) == scored + 2 and server.gets == 1
    assert all(p["prompt_logprobs"] == K and p["max_tokens"] == 1 for p in server.posts)
    for got, want in zip(rows, HFBackend(model, tokenizer).score(seqs, starts, k=K)):
        assert_rows_close(got, want)


def test_server_generates_with_the_thinking_budget(model, tokenizer):
    prompts = prompts_for(tokenizer)
    with FakeServer(model) as server:
        backend = VLLMServerBackend(server.url, tokenizer, model="tiny-moe", request_batch_size=2)
        got = backend.generate(prompts, 2, GREEDY, seed=0, thinking_budget=4)
    assert server.gets == 0  # the model was named
    assert got == HFBackend(model, tokenizer).generate(prompts, 2, GREEDY, seed=0,
                                                       thinking_budget=4)
    first = server.posts[:3]
    assert sorted(p["max_tokens"] for p in first) == [4, 4, 14]
    assert all(p["stop_token_ids"] == token_kwargs(tokenizer)["stop_ids"] for p in first)


def test_server_client_errors_fail_at_once_with_the_servers_message(model, tokenizer, sequences):
    seqs, starts = sequences
    with FakeServer(model, max_logprobs=4) as server:
        backend = VLLMServerBackend(server.url, tokenizer, model="tiny-moe", max_retries=3,
                                    backoff_s=0.001)
        with pytest.raises(FactoryError, match="HTTP 400.*greater than max allowed: 4"):
            backend.score(seqs[:1], starts[:1], k=K)
    assert len(server.posts) == 1  # not retried
    with pytest.raises(ConfigError, match="--max-logprobs 65"):
        backend.score(seqs, starts, k=65)


def test_server_unreachable_fails_after_the_retries(tokenizer):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    backend = VLLMServerBackend(url, tokenizer, model="tiny-moe", max_retries=2, backoff_s=0.001)
    with pytest.raises(FactoryError) as err:
        backend.score([[5, 6, 7]], [1], k=2)
    message = str(err.value)
    assert f"{url}/completions" in message and "after 3 attempts" in message
    assert "refused" in message.lower() and "backend.url=" in message and "vllm serve" in message
