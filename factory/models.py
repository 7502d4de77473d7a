"""Model artifacts: write a model into the store, read one back.

A model artifact is a Hugging Face directory (`save_pretrained`, safetensors, with its tokenizer),
so `AutoModelForCausalLM.from_pretrained` and vLLM load it without this project. A card whose
weights are published is not copied: its artifact is a `source.json` naming the pretrained source.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from factory.store import Artifact

SOURCE = "source.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_source(out: Path, card) -> None:
    (Path(out) / SOURCE).write_text(json.dumps({"name": card.name, "pretrained": card.pretrained}))


def load_model(artifact: Artifact, card, device: str = "cpu", dtype: str | None = None):
    """The model of a model artifact, on `device`, in eval mode."""
    source = artifact.path / SOURCE
    torch_dtype = DTYPES[dtype or card.dtype]
    if source.exists():
        from students.builders import build_model

        model = build_model(card, init="pretrained")
    else:
        model = AutoModelForCausalLM.from_pretrained(artifact.path, dtype=torch_dtype)
    return model.to(device).eval()
