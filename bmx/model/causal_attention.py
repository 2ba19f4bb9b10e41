"""Causal attention in blocks of queries with a hand-written backward pass (flash attention's).

Each block of queries is multiplied with only the keys it can see (causality and the sliding
window leave the rest out): about half the FLOPs of dense attention, and a block's scores are
small enough to stay in cache. The forward pass keeps each query row's log-sum-exp; the backward
pass recomputes the probabilities from it in one exp, instead of storing them (the largest
activations of a layer) or differentiating the softmax's max/sum/divide chain, and takes the
softmax's backward term from rowsum(dO · O) over head_dim rather than over the keys.

Heads go first inside (`[batch, kv_heads, queries_per_kv × queries, head_dim]`), so that every
product is one batched matrix multiply over (batch, kv_heads) with the query heads sharing a KV
head stacked into its rows: no repeated K/V and no transposed copies of the scores.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Span = tuple[int, int, int, int]  # query start, query end, first key, key end


def block_spans(seq: int, block: int, window: int | None) -> tuple[Span, ...]:
    """Per block of `block` queries, the range of keys it can see."""
    spans = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        spans.append((start, end, 0 if window is None else max(0, start - window + 1), end))
    return tuple(spans)


def _heads_first(q, k, v):
    """q [b, s, k, g, d] → [b, k, g, s, d]; k/v [b, t, k, d] → [b, k, t, d]."""
    return q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _block_scores(q_heads, k_heads, allowed, span: Span, scale: float):
    """Masked scores `[b, k, g·queries, keys]` in float32 for one block, and its queries `[b, k, g·q, d]`."""
    start, end, first_key, key_end = span
    b, kv, g = q_heads.shape[:3]
    q_block = q_heads[:, :, :, start:end].reshape(b, kv, g * (end - start), -1)
    scores = jnp.einsum("bkqd,bksd->bkqs", q_block, k_heads[:, :, first_key:key_end],
                        preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, kv, g, end - start, key_end - first_key)
    # A finite floor (not -inf) keeps fully padded query rows finite (uniform) instead of NaN.
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return scores.reshape(b, kv, g * (end - start), key_end - first_key), q_block


def _forward(q, k, v, allowed_blocks, scale: float, spans: tuple[Span, ...]):
    q_heads, k_heads, v_heads = _heads_first(q, k, v)
    b, kv, g = q_heads.shape[:3]
    outputs, log_sum_exps = [], []
    for span, allowed in zip(spans, allowed_blocks):
        start, end, first_key, key_end = span
        scores, _ = _block_scores(q_heads, k_heads, allowed, span, scale)
        row_max = scores.max(axis=-1, keepdims=True)
        weights = jnp.exp(scores - row_max)
        row_sum = weights.sum(axis=-1, keepdims=True)
        out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(v.dtype), v_heads[:, :, first_key:key_end],
                         preferred_element_type=jnp.float32) / row_sum
        outputs.append(out.astype(q.dtype).reshape(b, kv, g, end - start, -1))
        log_sum_exps.append((row_max + jnp.log(row_sum))[..., 0].reshape(b, kv, g, end - start))
    out_heads = jnp.concatenate(outputs, axis=3)  # [b, k, g, s, d]
    log_sum_exp = jnp.concatenate(log_sum_exps, axis=3)  # [b, k, g, s]
    return out_heads.transpose(0, 3, 1, 2, 4), (q_heads, k_heads, v_heads, out_heads, log_sum_exp)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_causal_attention(q, k, v, allowed_blocks, scale: float, spans: tuple[Span, ...]):
    """q [b, s, k, g, d], k/v [b, t, k, d]; `allowed_blocks[i]` `[b, queries, keys]` for `spans[i]`."""
    return _forward(q, k, v, allowed_blocks, scale, spans)[0]


def _forward_with_residuals(q, k, v, allowed_blocks, scale, spans):
    out, heads_first = _forward(q, k, v, allowed_blocks, scale, spans)
    return out, (allowed_blocks, *heads_first)  # heads first, the layout the backward multiplies in


def _backward(scale, spans, residuals, d_out):
    allowed_blocks, q_heads, k_heads, v_heads, out_heads, log_sum_exp = residuals
    b, kv, g, seq, head_dim = q_heads.shape
    d_out_heads = d_out.transpose(0, 2, 3, 1, 4)  # [b, k, g, s, d]
    # Σ_keys P·dP per query row equals dO · O: a sum over head_dim instead of over the keys.
    delta = jnp.sum(d_out_heads.astype(jnp.float32) * out_heads.astype(jnp.float32), axis=-1)
    # dK and dV are accumulated transposed, [b, k, d, t]: P^T·dO as a product of a transposed
    # left operand runs at half speed on CPU, dO^T·P at full speed (the barrier keeps XLA from
    # folding the transposes back into the products).
    d_queries = []
    d_keys_t = jnp.zeros((b, kv, head_dim, k_heads.shape[2]), jnp.float32)
    d_values_t = jnp.zeros((b, kv, head_dim, v_heads.shape[2]), jnp.float32)
    for span, allowed in zip(spans, allowed_blocks):
        start, end, first_key, key_end = span
        rows = g * (end - start)
        scores, q_block = _block_scores(q_heads, k_heads, allowed, span, scale)
        lse = log_sum_exp[:, :, :, start:end].reshape(b, kv, rows, 1)
        probabilities = jnp.exp(scores - lse)
        d_out_block = d_out_heads[:, :, :, start:end].reshape(b, kv, rows, head_dim)
        keys, values = k_heads[:, :, first_key:key_end], v_heads[:, :, first_key:key_end]
        d_values_t = d_values_t.at[..., first_key:key_end].add(jax.lax.optimization_barrier(jnp.einsum(
            "bkdq,bkqs->bkds", jnp.swapaxes(d_out_block, 2, 3), probabilities.astype(v_heads.dtype),
            preferred_element_type=jnp.float32)))
        d_probabilities = jnp.einsum("bkqd,bksd->bkqs", d_out_block, values, preferred_element_type=jnp.float32)
        block_delta = delta[:, :, :, start:end].reshape(b, kv, rows, 1)
        d_scores = (probabilities * (d_probabilities - block_delta) * scale).astype(q_heads.dtype)
        d_queries.append(jnp.einsum("bkqs,bksd->bkqd", d_scores, keys, preferred_element_type=jnp.float32)
                         .reshape(b, kv, g, end - start, head_dim))
        d_keys_t = d_keys_t.at[..., first_key:key_end].add(jax.lax.optimization_barrier(jnp.einsum(
            "bkdq,bkqs->bkds", jnp.swapaxes(q_block, 2, 3), d_scores, preferred_element_type=jnp.float32)))
    d_q = jnp.concatenate(d_queries, axis=3).transpose(0, 3, 1, 2, 4).astype(q_heads.dtype)
    d_k = d_keys_t.transpose(0, 3, 1, 2).astype(k_heads.dtype)
    d_v = d_values_t.transpose(0, 3, 1, 2).astype(v_heads.dtype)
    return d_q, d_k, d_v, tuple(None for _ in allowed_blocks)


blocked_causal_attention.defvjp(_forward_with_residuals, _backward)
