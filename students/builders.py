"""Model cards -> transformers models: the one place a card's architecture becomes a config.

`hf_config` writes every field of the Hugging Face config from the card, because transformers'
defaults match no released Qwen3 checkpoint (e.g. `Qwen3MoeConfig` would derive head_dim 64 for
Qwen3-30B-A3B and leave norm_topk_prob off). `build_model` makes a model three ways: on the meta
device (shapes only, no memory: parameter counts, FLOPs), from scratch (random init; the caller
seeds), or from the card's pretrained source (hub id or local directory, checked against the card
before any weight is read). `count_params` counts parameters from the meta build.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import Qwen3Config, Qwen3MoeConfig

from factory.config import ArchConfig, TeacherConfig
from factory.errors import CardError
from factory.flops import flops_params

INITS = ("meta", "scratch", "pretrained")

# fields a loaded config.json must agree with the card on, per family
_CHECKED_FIELDS = {
    "qwen3": (
        "num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings",
    ),
    "qwen3_moe": (
        "num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
        "moe_intermediate_size", "tie_word_embeddings",
    ),
}


def hf_config(arch: ArchConfig) -> PreTrainedConfig:
    """The transformers config of a card's architecture, every field written out."""
    common: dict[str, Any] = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        hidden_act="silu",  # SwiGLU MLP
        max_position_embeddings=arch.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=arch.rms_norm_eps,
        use_cache=True,
        tie_word_embeddings=arch.tie_word_embeddings,
        # native context; YaRN (factor 4 over 32,768) is a serving-time choice, not the card's
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        bos_token_id=arch.bos_token_id,
        eos_token_id=arch.eos_token_id,
        pad_token_id=arch.pad_token_id,
    )
    if arch.family == "qwen3":
        return Qwen3Config(
            **common,
            max_window_layers=arch.num_hidden_layers,
            layer_types=["full_attention"] * arch.num_hidden_layers,
        )
    if arch.family == "qwen3_moe":
        # head_dim is not in Qwen3MoeConfig's signature; the model reads it with a
        # hidden_size // num_attention_heads fallback that is wrong for every released MoE card
        return Qwen3MoeConfig(
            **common,
            num_experts=arch.num_experts,
            num_experts_per_tok=arch.num_experts_per_tok,
            moe_intermediate_size=arch.moe_intermediate_size,
            norm_topk_prob=arch.norm_topk_prob,
            router_aux_loss_coef=arch.router_aux_loss_coef,
            decoder_sparse_step=arch.decoder_sparse_step,
            mlp_only_layers=[],
            output_router_logits=False,
        )
    raise CardError(f"unknown architecture family {arch.family!r}: expected 'qwen3' or 'qwen3_moe'")


def build_model(card, init: str) -> PreTrainedModel:
    """A causal LM for `card` (a StudentConfig or TeacherConfig node).

    init: "meta" (shapes on the meta device, no memory), "scratch" (random init in the card's
    dtype; seed torch before calling), "pretrained" (weights from `card.pretrained`).
    """
    if init == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config(card.arch))
    if init == "scratch":
        return AutoModelForCausalLM.from_config(hf_config(card.arch), dtype=_dtype(card))
    if init == "pretrained":
        source = resolve_pretrained(card)
        try:
            return AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(card))
        except OSError as err:  # weights missing or unreadable after the config was found
            raise CardError(
                f"{_where(card)}: cannot load weights from {source!r}: {_first_line(err)}. "
                f"{_fix(card)}"
            ) from None
    raise CardError(f"unknown init {init!r}: expected one of {', '.join(INITS)}")


def resolve_pretrained(card) -> str:
    """The card's pretrained source, checked before any weight is read.

    Finds the config (local directory or hub id, offline or online), then compares its
    architecture with the card. Raises CardError naming the override on any failure.
    """
    source = card.pretrained
    if source is None:
        raise CardError(
            f"{_where(card)} has no pretrained weights (pretrained: null): build it with "
            f"init='scratch', or name a checkpoint: {_override(card)}"
        )
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CardError(
                f"{_where(card)}: {str(path)!r} is not a Hugging Face model directory "
                f"(no config.json). Point it at a directory written by save_pretrained "
                f"or downloaded from the hub: {_override(card)}"
            )
        source = str(path)
    elif _looks_like_path(source):
        raise CardError(f"{_where(card)}: local directory {source!r} does not exist. {_fix(card)}")
    try:
        loaded = AutoConfig.from_pretrained(source)
    except Exception as err:  # hub client errors: offline, unreachable, missing repo, bad id
        offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
        raise CardError(
            f"{_where(card)}: cannot reach pretrained source {source!r}{offline}: "
            f"{type(err).__name__}: {_first_line(err)}. {_fix(card)}"
        ) from None
    check_loaded_config(card, loaded, source)
    return source


def check_loaded_config(card, loaded: PreTrainedConfig, source: str) -> None:
    """Refuse a checkpoint whose config.json disagrees with the card's architecture."""
    arch = card.arch
    if loaded.model_type != arch.family:
        raise CardError(
            f"{_where(card)}: {source!r} is a {loaded.model_type!r} model but the card says "
            f"{arch.family!r}. {_fix(card)}"
        )
    mismatches = [
        f"{key} {getattr(loaded, key, None)} (card: {getattr(arch, key)})"
        for key in _CHECKED_FIELDS[arch.family]
        if getattr(loaded, key, None) != getattr(arch, key)
    ]
    if mismatches:
        raise CardError(
            f"{_where(card)}: the checkpoint at {source!r} does not match the card's "
            f"architecture: {'; '.join(mismatches)}. Pick the card that matches the checkpoint, "
            f"or {_override(card)} with a checkpoint of this architecture"
        )


def count_params(card) -> dict[str, int]:
    """Parameter counts from a meta-device build (no weights, no memory).

    total: every parameter once (tied embeddings counted once).
    non_embedding: total minus the input embedding and the untied LM head.
    active: parameters one token uses: for MoE, only num_experts_per_tok of num_experts experts
        per layer (router, attention, norms, embeddings all count); for dense, total.
    active_non_embedding: active minus the input embedding and the untied LM head.
    flops_params: the N of the FLOPs formulas (factory.flops): active_non_embedding plus the
        LM-head matmul (vocab x hidden, also for tied cards), the embedding lookup left out.
    """
    return dict(_count_params(_arch_key(card.arch)))


@functools.lru_cache(maxsize=None)
def _count_params(arch_key: tuple) -> tuple:
    arch = ArchConfig(**dict(arch_key))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(arch))
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = model.get_input_embeddings().weight.numel()
    if not arch.tie_word_embeddings:
        embedding += model.get_output_embeddings().weight.numel()
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    inactive = 0
    if arch.family == "qwen3_moe":
        inactive = experts * (arch.num_experts - arch.num_experts_per_tok) // arch.num_experts
    counts = {
        "total": total,
        "non_embedding": total - embedding,
        "active": total - inactive,
        "active_non_embedding": total - inactive - embedding,
    }
    counts["flops_params"] = flops_params(
        counts["active_non_embedding"], arch.vocab_size, arch.hidden_size
    )
    return tuple(counts.items())


def _arch_key(arch) -> tuple:
    values = OmegaConf.to_container(arch) if isinstance(arch, DictConfig) else vars(arch)
    return tuple(sorted(values.items()))


def _dtype(card) -> torch.dtype:
    dtype = getattr(torch, str(card.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise CardError(
            f"{_where(card)}: unknown dtype {card.dtype!r} (float32, bfloat16, float16)"
        )
    return dtype


def _group(card) -> str:
    kind = OmegaConf.get_type(card) if isinstance(card, DictConfig) else type(card)
    return "teacher" if isinstance(kind, type) and issubclass(kind, TeacherConfig) else "student"


def _where(card) -> str:
    return f"{_group(card)} card {card.name}"


def _override(card) -> str:
    return f"{_group(card)}.pretrained=/path/to/local/dir"


def _fix(card) -> str:
    source = card.pretrained
    hub_id = source if source and not _looks_like_path(source) else "ORG/NAME"
    return (
        f"Download the checkpoint where the hub is reachable (hf download {hub_id} "
        f"--local-dir DIR) and point the card at it: {_override(card)}"
    )


def _looks_like_path(source: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a filesystem path
    return source.startswith(("/", ".", "~")) or source.count("/") > 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0].rstrip(".")
    return line[:300]
