"""Merges that decide entry by entry which deltas survive: SCE, NearSwap, Arcee Fusion, RAM, RAM+.

Pure jitted JAX on one tensor's inputs, following mergekit 0.1.5's kernels operation for operation
in the merge dtype. Counts that mergekit derives from the data (SCE's top-k size) stay on the device.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from bmx.merge.model_axis import sum_models, var_models

ARCEE_QUANTILE_SAMPLE = 1_000_000  # above this many entries mergekit estimates quantiles from a sample


def _elected_sign_mask(deltas: jax.Array, mask_dtype) -> jax.Array:
    """TIES' sum election (mergekit's `get_mask(..., "sum")`): which deltas agree with the elected sign."""
    signs = jnp.sign(deltas).astype(mask_dtype)
    elected = (sum_models(deltas) >= 0).astype(mask_dtype) * 2 - 1
    return signs == elected


@partial(jax.jit, static_argnames=("int8_mask",))
def sce(base: jax.Array, others: tuple[jax.Array, ...], select_topk: jax.Array, int8_mask: bool) -> jax.Array:
    """Select (top `select_topk` entries by variance across models), Calculate (energy weights), Erase (signs)."""
    mask_dtype = jnp.int8 if int8_mask else base.dtype
    deltas = jnp.stack([w - base for w in others])  # [inputs, *shape]
    variance = var_models(deltas)
    # int(count_nonzero · density), the product in float32 as PyTorch computes int64 × float.
    k = jnp.floor(jnp.count_nonzero(variance).astype(jnp.float32) * select_topk.astype(jnp.float32)).astype(jnp.int32)
    order = jnp.argsort(-jnp.abs(variance).reshape(-1), stable=True)
    rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    selected = (rank < k).reshape(variance.shape).astype(mask_dtype)
    selected = jnp.where(select_topk <= 0, jnp.zeros_like(selected), selected)
    deltas = jnp.where(select_topk < 1, deltas * selected[None], deltas)

    erase = _elected_sign_mask(deltas, mask_dtype)
    energy = jnp.mean(jnp.square(deltas).reshape(deltas.shape[0], -1), axis=1)
    total = jnp.sum(energy)
    weights = jnp.where(jnp.abs(total) < 1e-6, jnp.ones_like(energy) / energy.shape[0], energy / total)
    weights = weights.reshape((-1,) + (1,) * base.ndim)
    kept_weights = weights * erase
    merged = sum_models(deltas * kept_weights)
    return base + merged / jnp.maximum(sum_models(kept_weights), 1e-6)


@jax.jit
def nearswap(base: jax.Array, other: jax.Array, t: jax.Array) -> jax.Array:
    """Blend weight min(1, t / |base − other|): entries closer than t take the other model's value."""
    t = t.astype(base.dtype)
    weight = jnp.clip(t / jnp.maximum(jnp.abs(base - other), 1e-6), 0, 1)
    return weight * other + (1 - weight) * base


@jax.jit
def arcee_importance(base: jax.Array, other: jax.Array) -> jax.Array:
    """|other − base| times each row's KL(softmax(other) ‖ softmax(base))."""
    p = jax.nn.softmax(other, axis=-1) + 1e-8
    q = jax.nn.softmax(base, axis=-1) + 1e-8
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    return jnp.abs(other - base) * kl


@jax.jit
def arcee_fusion(base: jax.Array, other: jax.Array, importance: jax.Array, sample: jax.Array) -> jax.Array:
    """Keep the deltas whose importance ≥ median + 1.5 · IQR of `sample` (the importances, or a draw of them)."""
    ordered = jnp.sort(sample.reshape(-1))
    quantiles = (jnp.asarray([0.25, 0.5, 0.75], jnp.float32) * (ordered.size - 1)).astype(jnp.int32)
    q1, median, q3 = ordered[quantiles[0]], ordered[quantiles[1]], ordered[quantiles[2]]
    threshold = median + 1.5 * (q3 - q1)
    mask = (importance >= threshold).astype(jnp.float32)
    return base + (other - base) * mask


def _ram_vectors(base: jax.Array, others: tuple[jax.Array, ...], epsilon: jax.Array):
    deltas = jnp.stack([w - base for w in others]).reshape(len(others), -1)  # [inputs, entries]
    nonzero = jnp.abs(deltas) > epsilon.astype(deltas.dtype)
    counts = sum_models(nonzero, keepdims=True)  # [1, entries]: how many models changed each entry
    return deltas * nonzero, nonzero, counts, counts > 1, counts == 1


@jax.jit
def ram(base: jax.Array, others: tuple[jax.Array, ...], epsilon: jax.Array) -> jax.Array:
    """Entries changed by one model take its delta; entries changed by several take their mean."""
    deltas, _, counts, overlap, unique = _ram_vectors(base, others, epsilon)
    merged = sum_models(deltas * unique + deltas * overlap / jnp.maximum(counts, 1).astype(deltas.dtype))
    return base + merged.reshape(base.shape)


@jax.jit
def ramplus_tl(base: jax.Array, others: tuple[jax.Array, ...], r: jax.Array, alpha: jax.Array, epsilon: jax.Array) -> jax.Array:
    """RAM with each model's unique deltas scaled by 1 + r · clip(shared/unique count ratio, 0, alpha)."""
    deltas, nonzero, counts, overlap, unique = _ram_vectors(base, others, epsilon)
    dtype = deltas.dtype
    shared_counts = jnp.sum(nonzero & overlap, axis=1).astype(jnp.float32)
    unique_counts = jnp.sum(nonzero & unique, axis=1).astype(jnp.float32)
    rho = shared_counts / jnp.maximum(unique_counts, epsilon.astype(jnp.float32))
    scale = 1 + r.astype(jnp.float32) * jnp.clip(rho, 0, alpha.astype(jnp.float32))  # float32, as in PyTorch
    merged = sum_models(deltas * unique * scale[:, None] + deltas * overlap / jnp.maximum(counts, 1).astype(dtype))
    return base + merged.reshape(base.shape)
