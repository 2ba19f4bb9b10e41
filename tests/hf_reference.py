"""Tiny random transformers Mistral models: the reference bmx is compared against."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MistralConfig as HFMistralConfig
from transformers import MistralForCausalLM


def tiny_hf_config(**overrides) -> HFMistralConfig:
    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=512,
                    rope_theta=10000.0, rms_norm_eps=1e-5)
    settings.update(overrides)
    return HFMistralConfig(**settings)


def tiny_hf_model(seed: int = 0, **overrides) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(tiny_hf_config(**overrides)).eval()


def save_tiny_hf_model(directory: Path, seed: int = 0, dtype=torch.float32, max_shard_size=None,
                       **overrides) -> MistralForCausalLM:
    model = tiny_hf_model(seed, **overrides).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return model


def hf_logits(model: MistralForCausalLM, input_ids) -> numpy.ndarray:  # noqa: F821
    with torch.no_grad():
        return model(torch.as_tensor(input_ids)).logits.float().numpy()
