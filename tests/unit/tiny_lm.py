"""The smallest real Qwen3 causal LM, shared by the unit tests that train or save one (imported as
a plain module: pytest puts this directory on sys.path)."""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

VOCAB = 64


def tiny_model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        intermediate_size=32))
