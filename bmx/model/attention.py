"""Rotary embeddings and grouped-query attention with Mistral's sliding window.

Shapes: queries are `[batch, seq, kv_heads, queries_per_kv, head_dim]` and keys/values
`[batch, seq, kv_heads, head_dim]`, so each group of query heads reads its shared K/V head
directly; the repeated K/V heads are never materialised.

Window semantics are transformers': query i attends key j iff j <= i and i - j < sliding_window,
i.e. itself and the previous `sliding_window - 1` tokens. When the sequence is at least twice the
window, attention is computed block-locally (each block of `window` queries against its own and the
previous block's keys), so cost and memory grow as seq × window rather than seq². Shorter sequences
go in blocks of queries against only the keys causality lets them see.

This module is the math only (the XLA kernel); `bmx.model.kernels` holds the kernel switch and the
fused kernels, `bmx.model.mistral.Attention` the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bmx.model import products
from bmx.model.causal_attention import block_spans, blocked_causal_attention

QUERY_BLOCK = 64  # queries per block of causal attention: fastest on CPU (32: 10% slower, 128: 10%, 256: 30%)
MAX_QUERY_BLOCKS = 16


# ---- rotary position embedding ------------------------------------------------------------------

def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables `[batch, seq, head_dim]` in float32 for integer positions `[batch, seq]`."""
    inverse_frequency = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequency  # [batch, seq, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [batch, seq, ..., head_dim]` by position (the half-split convention of HF Mistral)."""
    extra_dims = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra_dims + cos.shape[2:]).astype(x.dtype)
    sin = sin.reshape(sin.shape[:2] + (1,) * extra_dims + sin.shape[2:]).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ---- masking ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionMasking:
    """What restricts attention besides causality: padding, documents and the sliding window."""

    key_is_valid: jax.Array | None  # [batch, seq] bool; False for padding
    segment_ids: jax.Array | None  # [batch, seq] int; tokens attend only within their segment
    sliding_window: int | None


def _allowed(query_index, key_index, query_segments, key_segments, key_valid, window) -> jax.Array:
    """Boolean mask broadcast from index arrays: causal, windowed, same segment, valid key."""
    allowed = key_index <= query_index
    if window is not None:
        allowed &= query_index - key_index < window
    if key_valid is not None:
        allowed &= key_valid
    if query_segments is not None:
        allowed &= query_segments == key_segments
    return allowed


def _masked_softmax_attention(q, k, v, allowed, scale):
    """q [b, s, k, g, d], k/v [b, t, k, d], allowed broadcastable to [b, s, t] (query, key).

    The backward pass recomputes the scores and probabilities from q and k instead of keeping them,
    as flash attention does: they are the largest activations of a layer, and writing them out
    (into the layer scan's stacked residuals) costs more than the one extra q·k product.
    """
    return _recomputed_softmax_attention(q, k, v, allowed, scale)


def _softmax_attention(q, k, v, allowed, scale):
    """Scores are laid out [b, k, s, g, t]: the order a dot of q's (s, g) against k's t produces."""
    scores = jnp.einsum("bskgd,btkd->bksgt", q, k, preferred_element_type=jnp.float32) * scale
    # A finite floor (not -inf) keeps fully padded query rows finite instead of NaN.
    scores = jnp.where(allowed[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probabilities = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return products.einsum("bksgt,btkd->bskgd", probabilities, v, v.dtype)


_recomputed_softmax_attention = jax.checkpoint(_softmax_attention, static_argnums=(4,))


def blocked_sliding_window_attention(q, k, v, masking: AttentionMasking, scale: float) -> jax.Array:
    """Exact sliding-window attention in blocks of `window` queries against 2 × `window` keys."""
    window = masking.sliding_window
    batch, seq = q.shape[:2]
    blocks = -(-seq // window)
    padded = blocks * window

    def pad_to(x, length, front=0, value=0):
        widths = [(0, 0)] * x.ndim
        widths[1] = (front, length - x.shape[1] - front)
        return jnp.pad(x, widths, constant_values=value)

    q_blocks = pad_to(q, padded).reshape(batch, blocks, window, *q.shape[2:])

    def key_blocks(x, value=0):
        """[batch, blocks, 2*window, ...]: for block i, positions (i-1)*window .. (i+1)*window - 1."""
        x = pad_to(x, padded + window, front=window, value=value).reshape(batch, blocks + 1, window, *x.shape[2:])
        return jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)

    k_blocks, v_blocks = key_blocks(k), key_blocks(v)
    query_index = (jnp.arange(blocks)[:, None] * window + jnp.arange(window)[None, :])  # [blocks, window]
    key_index = (jnp.arange(blocks)[:, None] * window - window + jnp.arange(2 * window)[None, :])  # [blocks, 2w]
    key_valid = (key_index >= 0)[None]  # the front padding of block 0
    if masking.key_is_valid is not None:
        key_valid = key_valid & key_blocks(masking.key_is_valid, value=False)
    query_segments = key_segments = None
    if masking.segment_ids is not None:
        query_segments = pad_to(masking.segment_ids, padded).reshape(batch, blocks, window)[..., :, None]
        key_segments = key_blocks(masking.segment_ids)[..., None, :]
    allowed = _allowed(query_index[..., :, None], key_index[..., None, :], query_segments, key_segments,
                       key_valid[..., None, :], window)  # [batch or 1, blocks, window, 2*window]
    allowed = jnp.broadcast_to(allowed, (batch, blocks, window, 2 * window))

    def attend_block(q_block, k_block, v_block, allowed_block):
        return _masked_softmax_attention(q_block, k_block, v_block, allowed_block, scale)

    out = jax.vmap(attend_block, in_axes=1, out_axes=1)(q_blocks, k_blocks, v_blocks, allowed)
    return out.reshape(batch, padded, *q.shape[2:])[:, :seq]


def causal_blocked_attention(q, k, v, masking: AttentionMasking, scale: float, block: int) -> jax.Array:
    """Exact attention one block of `block` queries at a time, each against only the keys it can see
    (`bmx.model.causal_attention`, which also holds the backward pass)."""
    segments, key_valid = masking.segment_ids, masking.key_is_valid
    spans = block_spans(q.shape[1], block, masking.sliding_window)
    allowed_blocks = []
    for start, end, first_key, key_end in spans:
        allowed = _allowed(
            jnp.arange(start, end)[:, None], jnp.arange(first_key, key_end)[None, :],
            None if segments is None else segments[:, start:end, None],
            None if segments is None else segments[:, None, first_key:key_end],
            None if key_valid is None else key_valid[:, None, first_key:key_end],
            masking.sliding_window,
        )
        allowed_blocks.append(jnp.broadcast_to(allowed, (q.shape[0], end - start, key_end - first_key)))
    return blocked_causal_attention(q, k, v, tuple(allowed_blocks), scale, spans)


def grouped_query_attention(q, k, v, masking: AttentionMasking, scale: float) -> jax.Array:
    window, seq = masking.sliding_window, q.shape[1]
    if window is not None and seq >= 2 * window:
        return blocked_sliding_window_attention(q, k, v, masking, scale)
    # At most MAX_QUERY_BLOCKS blocks, so that long sequences do not unroll into huge programs.
    block = max(QUERY_BLOCK, -(-seq // MAX_QUERY_BLOCKS))
    return causal_blocked_attention(q, k, v, masking, scale, block)


def attention_over_cache(q, keys, values, visible, scale: float) -> jax.Array:
    """One new query per row, q `[b, 1, k, g, d]`, against a KV cache's keys `[b, k, d, slots]` and values
    `[b, k, slots, d]`;
    `visible [b, slots]` says which slots it sees (already causal, windowed and unpadded)."""
    scores = jnp.einsum("bskgd,bkdt->bkgt", q, keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probabilities = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return products.einsum("bkgt,bktd->bkgd", probabilities, values, values.dtype)[:, None]
