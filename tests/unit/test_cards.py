"""Model cards: published architectures, parameter counts, builders, pair compatibility, inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from factory.config import StudentConfig, TeacherConfig
from factory.errors import CardError, CompatibilityError
from factory.flops import flops_params, forward_flops, train_flops, weights_bytes
from students.builders import build_model, count_params, hf_config
from students.compat import check_pair

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"

# REFERENCE.md "Qwen3 architectures", typed in: billions of parameters
# (group, card, layers, Q heads, KV heads, hidden, intermediate or moe intermediate, tied,
#  total, non-embedding, active, active non-embedding)
REFERENCE = [
    ("student", "qwen3-0.6b", 28, 16, 8, 1024, 3072, True, 0.596, 0.440, None, None),
    ("student", "qwen3-1.7b", 28, 16, 8, 2048, 6144, True, 1.721, 1.409, None, None),
    ("student", "qwen3-4b", 36, 32, 8, 2560, 9728, True, 4.022, 3.634, None, None),
    ("student", "qwen3-8b", 36, 32, 8, 4096, 12288, False, 8.191, 6.946, None, None),
    ("student", "qwen3-14b", 40, 40, 8, 5120, 17408, False, 14.768, 13.212, None, None),
    ("teacher", "qwen3-32b", 64, 64, 8, 5120, 25600, False, 32.762, 31.206, None, None),
    ("teacher", "qwen3-30b-a3b", 48, 32, 4, 2048, 768, False, 30.532, 29.910, 3.353, 2.731),
    ("teacher", "qwen3-235b-a22b", 94, 64, 4, 4096, 1536, False, 235.094, 233.849, 22.191, 20.946),
]
HUB_IDS = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B-Base", "qwen3-1.7b": "Qwen/Qwen3-1.7B-Base", "qwen3-4b": "Qwen/Qwen3-4B-Base",
    "qwen3-8b": "Qwen/Qwen3-8B-Base", "qwen3-14b": "Qwen/Qwen3-14B-Base", "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B", "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
}
IDS = [row[1] for row in REFERENCE]


def card(group: str, name: str):
    """A card as composition makes it: the group YAML merged into its typed schema node."""
    schema = TeacherConfig if group == "teacher" else StudentConfig
    values = OmegaConf.load(CONF / group / f"{name}.yaml")
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("row", REFERENCE, ids=IDS)
def test_param_counts_match_reference(row):
    group, name, *_, total, non_emb, active, active_non_emb = row
    counts = count_params(card(group, name))
    expected = {
        "total": total,
        "non_embedding": non_emb,
        "active": active if active is not None else total,
        "active_non_embedding": active_non_emb if active_non_emb is not None else non_emb,
    }
    hidden = row[5]
    assert counts["flops_params"] == counts["active_non_embedding"] + 151936 * hidden
    for key, billions in expected.items():
        assert counts[key] == pytest.approx(billions * 1e9, rel=5e-3), key


@pytest.mark.parametrize("row", REFERENCE, ids=IDS)
def test_card_carries_published_architecture(row):
    group, name, layers, q, kv, hidden, inter, tied, *_ = row
    c = card(group, name)
    assert c.name == name and c.pretrained == HUB_IDS[name] and c.dtype == "bfloat16"
    cfg = hf_config(c.arch)
    moe = name in ("qwen3-30b-a3b", "qwen3-235b-a22b")
    assert cfg.model_type == ("qwen3_moe" if moe else "qwen3")
    published = {
        "num_hidden_layers": layers, "num_attention_heads": q, "num_key_value_heads": kv,
        "hidden_size": hidden, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "hidden_act": "silu",
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "eos_token_id": 151645, "pad_token_id": 151643, "bos_token_id": 151643,
    }
    if moe:
        published |= {
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": inter,
            "norm_topk_prob": True, "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    else:
        published |= {"intermediate_size": inter, "layer_types": ["full_attention"] * layers}
    for key, value in published.items():
        assert getattr(cfg, key) == value, key
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    # survives config.json: head_dim is not in Qwen3MoeConfig's signature
    reloaded = type(cfg).from_dict(cfg.to_dict())
    assert reloaded.head_dim == 128 and reloaded.rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize(
    "group,name,tied", [("student", "qwen3-0.6b", True), ("student", "qwen3-8b", False)]
)
def test_tied_embeddings_per_card(group, name, tied):
    model = build_model(card(group, name), "meta")
    assert model.config.tie_word_embeddings is tied
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert shared is tied


def test_meta_build_of_235b_allocates_nothing():
    before = rss_bytes()
    model = build_model(card("teacher", "qwen3-235b-a22b"), "meta")
    grown = rss_bytes() - before
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "meta" for t in tensors)
    assert sum(p.numel() for p in model.parameters()) > 2e11
    assert grown < 512 * 2**20  # module objects only; the bf16 weights would be 438 GiB


def test_tiny_cards_scratch_forward():
    torch.manual_seed(0)
    for group, name in [("student", "tiny"), ("teacher", "tiny-moe")]:
        c = card(group, name)
        assert c.pretrained is None and c.tokenizer == "tiny" and c.dtype == "float32"
        model = build_model(c, "scratch")
        ids_bt = torch.randint(0, c.arch.vocab_size, (2, 8))
        logits_btv = model(input_ids=ids_bt).logits
        assert logits_btv.shape == (2, 8, c.arch.vocab_size)
        assert logits_btv.dtype == torch.float32 and torch.isfinite(logits_btv).all()
    tiny_moe = count_params(card("teacher", "tiny-moe"))
    assert tiny_moe["active"] < tiny_moe["total"]  # top-2 of 8 experts


def test_tiny_moe_bootstrap_and_sampling():
    t = card("teacher", "tiny-moe")
    boot = t.bootstrap
    # the bank must build it: both bootstrap phases have a budget and data
    assert boot.enabled and boot.pretrain_steps > 0 and boot.sft_steps > 0
    assert boot.sft_examples >= boot.batch_size > 0 and boot.lr > 0
    assert (t.thinking.temperature, t.thinking.top_p, t.thinking.top_k) == (0.6, 0.95, 20)
    # the tiny world's traces are ~35 tokens: the caps bound a weak model's rambling
    assert (t.thinking.max_new_tokens, t.non_thinking.max_new_tokens) == (96, 32)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen3-235b-a22b", "qwen3-32b"])
def test_real_teacher_sampling_is_qwen3s(name):
    t = card("teacher", name)
    th, nt = t.thinking, t.non_thinking
    assert (th.temperature, th.top_p, th.top_k, th.min_p) == (0.6, 0.95, 20, 0.0)
    assert th.max_new_tokens == 32768
    assert (nt.temperature, nt.top_p, nt.top_k, nt.min_p) == (0.7, 0.8, 20, 0.0)
    assert t.tensor_parallel * t.expert_parallel >= 2


def test_pretrained_local_dir_round_trip(tmp_path):
    torch.manual_seed(0)
    c = card("student", "tiny")
    saved = build_model(c, "scratch")
    saved.save_pretrained(tmp_path)
    c.pretrained = str(tmp_path)
    loaded = build_model(c, "pretrained")
    want, got = saved.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_pretrained_checkpoint_must_match_card(tmp_path):
    torch.manual_seed(0)
    c = card("student", "tiny")
    build_model(c, "scratch").save_pretrained(tmp_path)
    c.pretrained = str(tmp_path)
    c.arch.num_hidden_layers = 3
    with pytest.raises(CardError, match=r"num_hidden_layers 2 \(card: 3\)"):
        build_model(c, "pretrained")


def test_unreachable_hub_source_names_the_override(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    c = card("student", "qwen3-0.6b")
    c.pretrained = "Qwen/not-a-cached-checkpoint"
    with pytest.raises(CardError) as err:
        build_model(c, "pretrained")
    message = str(err.value)
    assert "qwen3-0.6b" in message and "student.pretrained=/path/to/local/dir" in message
    assert err.value.__suppress_context__  # raised from None: no trace through the hub client


def test_teacher_error_names_teacher_override():
    with pytest.raises(CardError, match=r"teacher card tiny-moe .*teacher\.pretrained="):
        build_model(card("teacher", "tiny-moe"), "pretrained")


def test_local_dir_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    c = card("student", "qwen3-4b")
    c.pretrained = str(tmp_path)
    with pytest.raises(CardError, match="no config.json"):
        build_model(c, "pretrained")
    c.pretrained = str(tmp_path / "absent")
    with pytest.raises(CardError, match="does not exist"):
        build_model(c, "pretrained")


def test_check_pair_refuses_mismatched_vocab():
    with pytest.raises(CompatibilityError) as err:
        check_pair(card("student", "qwen3-4b"), card("teacher", "tiny-moe"))
    message = str(err.value)
    assert "151936" in message and "128" in message
    assert "teacher=qwen3-30b-a3b" in message and "student=tiny" in message


def test_check_pair_refuses_mismatched_special_ids_and_accepts_families():
    student, teacher = card("student", "tiny"), card("teacher", "tiny-moe")
    check_pair(student, teacher)
    check_pair(card("student", "qwen3-8b"), card("teacher", "qwen3-235b-a22b"))
    teacher.arch.eos_token_id = 3
    with pytest.raises(CompatibilityError, match="eos id 2 but teacher tiny-moe has 3"):
        check_pair(student, teacher)


def test_flops_formulas():
    n = flops_params(active_non_embedding=1000, vocab_size=10, hidden_size=4)
    assert n == 1040
    assert train_flops(n, 3) == 6 * 1040 * 3 and forward_flops(n, 3) == 2 * 1040 * 3
    assert weights_bytes(10, "bfloat16") == 20 and weights_bytes(10, "float32") == 40


def test_inspect_prints_one_json_object():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "factory.inspect", "student=qwen3-8b", "teacher=qwen3-235b-a22b"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    student, teacher = summary["student"], summary["teacher"]
    assert summary["compatible"] is True and summary["compatibility_error"] is None
    assert student["name"] == "qwen3-8b" and teacher["name"] == "qwen3-235b-a22b"
    assert student["params"]["total"] == pytest.approx(8.191e9, rel=5e-3)
    assert student["params"]["non_embedding"] == pytest.approx(6.946e9, rel=5e-3)
    assert teacher["params"]["total"] == pytest.approx(235.094e9, rel=5e-3)
    assert teacher["params"]["active"] == pytest.approx(22.191e9, rel=5e-3)
    # FLOPs count the 22B active parameters (less the embedding lookup), not 235B
    n = teacher["params"]["active_non_embedding"] + 151936 * 4096
    assert teacher["params"]["flops_params"] == n
    assert teacher["flops_per_token"] == {"train": 6.0 * n, "forward": 2.0 * n}
    assert teacher["weights_gib"]["bfloat16"] == pytest.approx(235.094e9 * 2 / 2**30, rel=5e-3)
    assert teacher["arch"]["num_experts"] == 128 and student["pretrained"] == "Qwen/Qwen3-8B-Base"


def test_inspect_reports_incompatible_pair():
    from factory.inspect import compose, describe_pair

    summary = describe_pair(compose(["student=qwen3-0.6b", "teacher=tiny-moe"]))
    assert summary["compatible"] is False
    assert "151936" in summary["compatibility_error"] and "128" in summary["compatibility_error"]
