"""The one table between Hugging Face Mistral tensor names and bmx parameter paths.

Each row names the HF tensor (per layer where `{layer}` appears), the bmx path, and the pure
layout change between them. Every change is a transpose or reshape, so a round trip is bit-exact.
HF `nn.Linear` weights are `[out, in]`; bmx kernels are `[in, out]` with heads split out.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

from bmx.model.config import MistralConfig

Layout = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorMapping:
    hf_name: str  # contains "{layer}" for per-layer tensors
    bmx_path: tuple[str, ...]  # keys into the params dict; per-layer tensors are stacked on axis 0
    hf_shape: tuple[int, ...]
    to_bmx: Layout
    to_hf: Layout

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        if not self.per_layer:
            return [self.hf_name]
        return [self.hf_name.format(layer=layer) for layer in range(num_layers)]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def mistral_table(config: MistralConfig) -> list[TensorMapping]:
    embed, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                        config.num_key_value_heads, config.head_dim)
    mlp, vocab = config.intermediate_size, config.vocab_size

    def heads_out(num_heads: int) -> tuple[Layout, Layout]:
        """[heads*head_dim, embed] ↔ [embed, heads, head_dim] (q, k, v projections)."""
        return (lambda w: w.T.reshape(embed, num_heads, head_dim),
                lambda k: k.reshape(embed, num_heads * head_dim).T)

    def heads_in() -> tuple[Layout, Layout]:
        """[embed, heads*head_dim] ↔ [heads, head_dim, embed] (o projection)."""
        return (lambda w: w.T.reshape(heads, head_dim, embed),
                lambda k: k.reshape(heads * head_dim, embed).T)

    layer = "model.layers.{layer}."
    stacked = ("model", "layers")
    rows = [
        TensorMapping("model.embed_tokens.weight", ("model", "embed_tokens", "weight"), (vocab, embed),
                      _identity, _identity),
        TensorMapping(layer + "input_layernorm.weight", (*stacked, "input_layernorm", "weight"), (embed,),
                      _identity, _identity),
        TensorMapping(layer + "self_attn.q_proj.weight", (*stacked, "self_attn", "q_proj", "kernel"),
                      (heads * head_dim, embed), *heads_out(heads)),
        TensorMapping(layer + "self_attn.k_proj.weight", (*stacked, "self_attn", "k_proj", "kernel"),
                      (kv_heads * head_dim, embed), *heads_out(kv_heads)),
        TensorMapping(layer + "self_attn.v_proj.weight", (*stacked, "self_attn", "v_proj", "kernel"),
                      (kv_heads * head_dim, embed), *heads_out(kv_heads)),
        TensorMapping(layer + "self_attn.o_proj.weight", (*stacked, "self_attn", "o_proj", "kernel"),
                      (embed, heads * head_dim), *heads_in()),
        TensorMapping(layer + "post_attention_layernorm.weight", (*stacked, "post_attention_layernorm", "weight"),
                      (embed,), _identity, _identity),
        TensorMapping(layer + "mlp.gate_proj.weight", (*stacked, "mlp", "gate_proj", "kernel"), (mlp, embed),
                      _transpose, _transpose),
        TensorMapping(layer + "mlp.up_proj.weight", (*stacked, "mlp", "up_proj", "kernel"), (mlp, embed),
                      _transpose, _transpose),
        TensorMapping(layer + "mlp.down_proj.weight", (*stacked, "mlp", "down_proj", "kernel"), (embed, mlp),
                      _transpose, _transpose),
        TensorMapping("model.norm.weight", ("model", "norm", "weight"), (embed,), _identity, _identity),
    ]
    if not config.tie_word_embeddings:
        rows.append(TensorMapping("lm_head.weight", ("lm_head", "kernel"), (vocab, embed), _transpose, _transpose))
    return rows


def hf_tensor_order(config: MistralConfig) -> list[tuple[str, TensorMapping, int | None]]:
    """Every HF tensor in the order transformers writes them: embedding, layer by layer, norm, head."""
    table = mistral_table(config)
    order = [(row.hf_name, row, None) for row in table if not row.per_layer and row.hf_name.startswith("model.embed")]
    for layer in range(config.num_hidden_layers):
        order += [(row.hf_name.format(layer=layer), row, layer) for row in table if row.per_layer]
    order += [(row.hf_name, row, None) for row in table if not row.per_layer and not row.hf_name.startswith("model.embed")]
    return order
