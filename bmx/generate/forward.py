"""Mistral's forward pass split for decoding: a prefill that fills the KV cache, and one-token steps.

Both are assembled from the model's own submodules (norms, projections, MLP, LM head), so whatever a
projection is (a plain `Linear`, a LoRA-wrapped one) decoding runs it unchanged. The layer stack is
scanned over its leading `layers` axis exactly as `bmx.model.mistral` does, with each layer's slice
of the cache carried alongside its parameters.
"""

from __future__ import annotations

import jax
from flax import nnx

from bmx.generate import kv_cache
from bmx.generate.kv_cache import KVCache
from bmx.model.attention import (
    AttentionMasking,
    _masked_softmax_attention,
    apply_rotary,
    grouped_query_attention,
    rotary_cos_sin,
)
from bmx.model.mistral import Mistral, default_positions


def _project_qkv(layer, hidden, cos, sin):
    """Rotated queries `[batch, seq, kv_heads, queries_per_kv, head_dim]`; rotated keys and the values
    `[batch, seq, kv_heads, head_dim]`."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    q = apply_rotary(attention.q_proj(normed), cos, sin)
    k = apply_rotary(attention.k_proj(normed), cos, sin)
    v = attention.v_proj(normed)
    batch, seq = q.shape[:2]
    # Query head h belongs to KV head h // queries_per_kv, as in the model's Attention.
    q = q.reshape(batch, seq, attention.kv_heads, attention.queries_per_kv, q.shape[-1])
    return q, k, v


def _finish_layer(layer, hidden, attended):
    """Output projection, residual, then the MLP block: the rest of `DecoderLayer.__call__`."""
    batch, seq = attended.shape[:2]
    hidden = hidden + layer.self_attn.o_proj(attended.reshape(batch, seq, -1, attended.shape[-1]))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def prefill(model: Mistral, input_ids: jax.Array, attention_mask: jax.Array, slots: int) -> tuple[jax.Array, KVCache]:
    """Run the left-padded prompts `[batch, prompt]`: logits of the last position `[batch, vocab]` and the cache.

    Attention over the prompt is the model's own (block-local once the prompt reaches twice the
    window); only each layer's last `slots` keys and values are kept.
    """
    config = model.config
    positions = default_positions(input_ids, attention_mask)
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)
    masking = AttentionMasking(attention_mask.astype(bool), None, config.sliding_window)
    layer_graph, layer_state = nnx.split(model.model.layers)

    def apply_layer(hidden, state):
        layer = nnx.merge(layer_graph, state)
        q, k, v = _project_qkv(layer, hidden, cos, sin)
        attended = grouped_query_attention(q, k, v, masking, layer.self_attn.scale)
        hidden = _finish_layer(layer, hidden, attended)
        return hidden, (kv_cache.store_prompt(k, slots), kv_cache.store_prompt(v, slots))

    hidden = model.model.embed_tokens(input_ids)
    hidden, (keys, values) = jax.lax.scan(apply_layer, hidden, layer_state)
    logits = model.logits(model.model.norm(hidden[:, -1:]))[:, 0]
    return logits, KVCache(keys, values, kv_cache.prompt_key_index(attention_mask, slots))


def decode_step(model: Mistral, tokens: jax.Array, positions: jax.Array, index: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row: `tokens [batch]` at rotary `positions [batch]` and padded-batch `index` (scalar).

    Returns the next-token logits `[batch, vocab]` and the cache with this step's keys and values.
    """
    config = model.config
    cos, sin = rotary_cos_sin(positions[:, None], config.head_dim, config.rope_theta)
    key_index = kv_cache.step_key_index(cache.key_index, index)
    # [batch, 1 (query), slots], as _masked_softmax_attention takes it.
    allowed = kv_cache.visible_keys(key_index, index, config.sliding_window)[:, None, :]
    layer_graph, layer_state = nnx.split(model.model.layers)

    def apply_layer(hidden, layer_inputs):
        state, layer_keys, layer_values = layer_inputs
        layer = nnx.merge(layer_graph, state)
        q, k, v = _project_qkv(layer, hidden, cos, sin)
        layer_keys = kv_cache.store_step(layer_keys, k, index)
        layer_values = kv_cache.store_step(layer_values, v, index)
        attended = _masked_softmax_attention(q, layer_keys, layer_values, allowed, layer.self_attn.scale)
        return _finish_layer(layer, hidden, attended), (layer_keys, layer_values)

    hidden = model.model.embed_tokens(tokens[:, None])
    hidden, (keys, values) = jax.lax.scan(apply_layer, hidden, (layer_state, cache.keys, cache.values))
    logits = model.logits(model.model.norm(hidden))[:, 0]
    return logits, KVCache(keys, values, key_index)
