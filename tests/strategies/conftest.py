"""Fixtures for the strategy suite: a tiny random Llama (GQA: 6 query heads over 2 KV heads) with kvtune
attention, so every pipeline runs through the real runtime in milliseconds."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode(False), torch.no_grad():
        yield


@pytest.fixture(scope="session")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtune.runtime import ATTENTION_NAME, register_attention

    register_attention()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(ATTENTION_NAME)
    return model


@pytest.fixture(scope="session")
def tiny_ids():
    """Two unpadded prompts of 41 tokens plus 7 decode tokens each: (2, 48)."""
    return torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(1))
