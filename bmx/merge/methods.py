"""The merge methods' math: pure, jitted JAX functions on one tensor's inputs.

Each follows mergekit 0.1.5 operation for operation, including the dtype it computes in:
linear and SLERP work in float32 (float64 for float64 inputs) and cast back; the task-vector
methods work in the merge dtype itself, as mergekit does. Reductions over the model axis
accumulate in float32 and round once, as PyTorch does for bfloat16/float16.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from bmx.merge.model_axis import compute_dtype, sum_models

SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: the vectors are collinear, interpolate linearly
SLERP_NORM_EPS = 1e-8
RESCALE_EPS = 1e-7


@partial(jax.jit, static_argnames=("normalize",))
def linear(tensors: tuple[jax.Array, ...], weights: jax.Array, normalize: bool) -> jax.Array:
    """Weighted sum of the inputs, divided by the sum of weights when `normalize`. weights: [inputs]."""
    dtype = compute_dtype(tensors[0].dtype)
    weights = weights.astype(dtype)
    result = jnp.zeros(tensors[0].shape, dtype)
    for tensor, weight in zip(tensors, weights):
        result = result + tensor.astype(dtype) * weight
    if normalize:
        result = result / jnp.sum(weights)
    return result.astype(tensors[0].dtype)


@jax.jit
def slerp(t: jax.Array, base: jax.Array, other: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Spherical interpolation from `base` (t = 0) to `other` (t = 1), whole tensor as one vector.

    Both tensors are divided by their L2 norms only to measure the angle; the weights
    sin((1-t)θ)/sin θ and sin(tθ)/sin θ multiply the unnormalised tensors. Nearly collinear
    pairs (|cos θ| > 0.9995) fall back to linear interpolation.
    Returns (merged, cos θ, whether the linear fallback was taken).
    """
    dtype = compute_dtype(base.dtype)
    a = base.reshape(-1).astype(dtype)
    b = other.reshape(-1).astype(dtype)
    t = t.astype(dtype)
    norm_a = jnp.linalg.norm(a)
    norm_b = jnp.linalg.norm(b)
    norm_a = jnp.where(norm_a > SLERP_NORM_EPS, norm_a, 1)
    norm_b = jnp.where(norm_b > SLERP_NORM_EPS, norm_b, 1)
    cosine = jnp.clip(jnp.sum((a / norm_a) * (b / norm_b)), -1, 1)
    use_linear = jnp.abs(cosine) > SLERP_DOT_THRESHOLD
    theta = jnp.arccos(jnp.where(use_linear, 0, cosine))  # keep acos away from ±1 on the unused branch
    sin_theta = jnp.sin(theta)
    weight_a = jnp.where(use_linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    weight_b = jnp.where(use_linear, t, jnp.sin(t * theta) / sin_theta)
    merged = (weight_a * a + weight_b * b).reshape(base.shape).astype(base.dtype)
    return merged, cosine, use_linear


def _masked_and_rescaled(delta: jax.Array, keep: jax.Array, rescale: bool) -> jax.Array:
    """Zero the dropped entries; with `rescale`, scale the rest so the L1 norm is unchanged."""
    masked = delta * keep.astype(delta.dtype)
    if not rescale:
        return masked
    accumulate = compute_dtype(delta.dtype)
    before = jnp.sum(jnp.abs(delta).astype(accumulate)).astype(delta.dtype)
    after = jnp.sum(jnp.abs(masked).astype(accumulate)).astype(delta.dtype)
    scale = (before.astype(accumulate) / after.astype(accumulate)).astype(delta.dtype)
    degenerate = (before.astype(accumulate) < RESCALE_EPS) | (after.astype(accumulate) < RESCALE_EPS)
    return jnp.where(degenerate, masked, masked * scale)


def _counts_at_or_above(keys: jax.Array, weights: jax.Array) -> jax.Array:
    """For each 16-bit key value b, how many (weighted) entries have a key ≥ b."""
    counts = jnp.zeros(1 << 16, jnp.int32).at[keys].add(weights)
    return jnp.cumsum(counts[::-1])[::-1]


def _highest_key_reaching(at_or_above: jax.Array, count: jax.Array) -> jax.Array:
    """The largest key b with at least `count` entries at or above it (-1 when none)."""
    return jnp.sum(at_or_above >= count) - 1


def kth_largest_magnitude(magnitudes: jax.Array, k: jax.Array) -> jax.Array:
    """`jnp.sort(magnitudes)[magnitudes.size - k]` for non-negative float32 or 16-bit magnitudes, unsorted.

    Non-negative floats are ordered as their bit patterns, so the k-th largest is found by two 16-bit
    histograms (a radix select): the high half's bucket that holds it, then its low half within that
    bucket; 16-bit magnitudes need only the one histogram of their bits. Linear in the size; XLA's
    CPU sort of a 7B MLP matrix (58.7M entries) takes ~28× longer.
    """
    if jnp.dtype(magnitudes.dtype).itemsize == 2:  # bfloat16 or float16: one histogram of the bits
        keys = jax.lax.bitcast_convert_type(magnitudes, jnp.uint16)
        key = _highest_key_reaching(_counts_at_or_above(keys, jnp.ones(keys.shape, jnp.int32)), k)
        return jax.lax.bitcast_convert_type(key.astype(jnp.uint16), magnitudes.dtype)
    bits = jax.lax.bitcast_convert_type(magnitudes, jnp.uint32)
    high, low = (bits >> 16).astype(jnp.int32), (bits & 0xFFFF).astype(jnp.int32)
    high_at_or_above = _counts_at_or_above(high, jnp.ones_like(high))
    bucket = _highest_key_reaching(high_at_or_above, k)
    strictly_above = jnp.where(bucket + 1 < 1 << 16, high_at_or_above[jnp.minimum(bucket + 1, (1 << 16) - 1)], 0)
    low_at_or_above = _counts_at_or_above(low, (high == bucket).astype(jnp.int32))
    rest = _highest_key_reaching(low_at_or_above, k - strictly_above)
    return jax.lax.bitcast_convert_type((bucket.astype(jnp.uint32) << 16) | rest.astype(jnp.uint32), jnp.float32)


TIE_BLOCK = 4096  # entries per block when keeping the earliest tied entries (`earliest_set`)


def earliest_set(flags: jax.Array, count: jax.Array) -> jax.Array:
    """`flags & (jnp.cumsum(flags) <= count)` for a flat boolean array: the first `count` set flags.

    Without a cumulative sum over the whole array (XLA:CPU's took most of a TIES tensor's time):
    per-block counts find the one block where `count` runs out, blocks before it keep their flags,
    blocks after it lose them, and only that block is summed cumulatively.
    """
    size = flags.size
    blocks = -(-size // TIE_BLOCK)
    padded = jnp.pad(flags, (0, blocks * TIE_BLOCK - size)).reshape(blocks, TIE_BLOCK)
    through = jnp.cumsum(jnp.sum(padded, axis=1, dtype=jnp.int32))  # flags up to the end of each block
    cut = jnp.sum(through <= count)  # blocks kept whole; the next one (if any) is cut inside
    row = jax.lax.dynamic_index_in_dim(padded, jnp.minimum(cut, blocks - 1), keepdims=False)
    before = jnp.where(cut > 0, through[jnp.maximum(cut - 1, 0)], 0)
    row_kept = row & (jnp.cumsum(row, dtype=jnp.int32) <= count - before)
    block = jnp.arange(blocks)[:, None]
    kept = padded & ((block < cut) | ((block == cut) & row_kept[None, :]))
    return kept.reshape(-1)[:size]


@partial(jax.jit, static_argnames=("rescale",))
def keep_largest(delta: jax.Array, keep_count: jax.Array, rescale: bool) -> jax.Array:
    """TIES sparsification: keep the `keep_count` entries of largest magnitude, zero the rest.

    Among entries tied at the threshold the earliest (flat index) are kept, so exactly
    `keep_count` survive, deterministically.
    """
    # 16-bit magnitudes stay 16-bit: ordered as their bits like float32's, and half the memory.
    magnitudes = jnp.abs(delta).reshape(-1)
    if magnitudes.dtype == jnp.float64:
        magnitudes = magnitudes.astype(jnp.float32)
    threshold = kth_largest_magnitude(magnitudes, keep_count)
    above = magnitudes > threshold
    tied = magnitudes == threshold
    tied_kept = earliest_set(tied, keep_count - jnp.sum(above))
    keep = (above | tied_kept).reshape(delta.shape)
    return _masked_and_rescaled(delta, keep, rescale)


@partial(jax.jit, static_argnames=("rescale",))
def drop_random(delta: jax.Array, keep: jax.Array, rescale: bool) -> jax.Array:
    """DARE sparsification with a given Bernoulli(density) keep mask (see `drop_masks.py`)."""
    # PyTorch has no CPU Bernoulli for float16, so mergekit works in float32 there.
    work = jnp.float32 if delta.dtype == jnp.float16 else delta.dtype
    return _masked_and_rescaled(delta.astype(work), keep, rescale).astype(delta.dtype)


@partial(jax.jit, static_argnames=("sign_consensus", "normalize", "int8_mask"))
def merge_task_vectors(
    base: jax.Array,
    deltas: tuple[jax.Array, ...],
    weights: jax.Array,
    scale: jax.Array,
    sign_consensus: bool,
    normalize: bool,
    int8_mask: bool,
) -> jax.Array:
    """base + scale · combine(weight_i · delta_i): task arithmetic, or TIES with `sign_consensus`.

    With sign consensus each entry's sign is elected by the sum of weighted deltas and only
    deltas agreeing with it are added (a disjoint merge); `normalize` then divides by the sum
    of the agreeing weights (by the sum of all weights without consensus).
    deltas: one [*shape] per non-base input; weights: [inputs]; scale is mergekit's `lambda`.
    """
    dtype = base.dtype
    weights = weights.astype(dtype).reshape((-1,) + (1,) * base.ndim)  # [inputs, 1, ...]
    weighted = jnp.stack(deltas) * weights  # [inputs, *shape]
    if sign_consensus:
        sign_dtype = jnp.int8 if int8_mask else dtype
        signs = jnp.sign(weighted).astype(sign_dtype)
        elected = jnp.where(sum_models(weighted) >= 0, 1, -1).astype(sign_dtype)
        agrees = signs == elected  # a zero delta agrees with no sign
        mixed = sum_models(weighted * agrees)
        divisor = sum_models(weights * agrees)
        divisor = jnp.where(divisor == 0, jnp.ones_like(divisor), divisor)
    else:
        mixed = sum_models(weighted)
        divisor = sum_models(weights)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, jnp.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    mixed = (mixed.astype(compute_dtype(dtype)) * scale).astype(dtype)
    return (base + mixed).astype(dtype)
