"""Breadcrumbs' and DELLA's sparsification of a delta (mergekit 0.1.5's `sparsify.py`).

TIES' top-k and DARE's Bernoulli drop live in `methods.py`; these two complete the set:
- breadcrumbs (`magnitude_outliers`) sorts |delta| and keeps a band: the largest `gamma` fraction
  (outliers) and the smallest entries are dropped, `density` of the entries survive;
- DELLA (`della_magprune`) drops at random, each entry kept with a probability that rises linearly
  with the rank of its magnitude within its row, from density − ε to density + ε.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from bmx.merge.methods import _masked_and_rescaled


def outlier_band(size: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries dropped from the bottom, entries kept), as mergekit counts them (Python floats, truncation)."""
    target = int(density * size)
    top = int(gamma * size)
    return max(0, size - target - top), target


def _ascending_ranks(values: jax.Array, axis: int = -1) -> jax.Array:
    """Each entry's position in an ascending sort along `axis` (0 = smallest).

    The inverse of the sorting permutation, written by a scatter: a second argsort (what mergekit
    does) costs as much as the first, and sorting is most of these methods' time.
    """
    axis = axis % values.ndim
    if values.dtype == jnp.bfloat16 and axis == values.ndim - 1 and values.shape[axis] <= 1 << 16:
        order = _stable_order_of_bf16_magnitudes(values)
    else:
        order = jnp.argsort(values, axis=axis, stable=True)
    positions = jax.lax.broadcasted_iota(order.dtype, order.shape, axis)
    return jnp.put_along_axis(jnp.zeros_like(order), order, positions, axis=axis, inplace=False)


def _stable_order_of_bf16_magnitudes(magnitudes: jax.Array) -> jax.Array:
    """`argsort(magnitudes, axis=-1, stable=True)` for non-negative bfloat16 rows of at most 65536 entries.

    Each entry becomes one uint32 key, its bits (ordered as its value, the sign bit being clear) above its
    column, and one sort of those keys gives the stable order: XLA sorts a plain uint32 array about five
    times faster than it argsorts floats (a comparator over value and index pairs).
    """
    bits = jax.lax.bitcast_convert_type(magnitudes, jnp.uint16).astype(jnp.uint32)
    column = jax.lax.broadcasted_iota(jnp.uint32, magnitudes.shape, magnitudes.ndim - 1)
    return (jnp.sort((bits << 16) | column, axis=-1) & 0xFFFF).astype(jnp.int32)


@partial(jax.jit, static_argnames=("rescale",))
def keep_magnitude_band(delta: jax.Array, dropped_below: jax.Array, kept: jax.Array, rescale: bool) -> jax.Array:
    """Keep the entries ranked [dropped_below, dropped_below + kept) by |delta| (ascending), zero the rest."""
    magnitudes = jnp.abs(delta).astype(jnp.float32).reshape(-1)  # mergekit sorts CPU magnitudes in float32
    ranks = _ascending_ranks(magnitudes).reshape(delta.shape)
    keep = (ranks >= dropped_below) & (ranks < dropped_below + kept)
    return _masked_and_rescaled(delta, keep, rescale)


def della_work_dtype(dtype) -> jnp.dtype:
    """mergekit keeps bfloat16 (its CPU Bernoulli exists for it) and works in float32 otherwise."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


@jax.jit
def della_keep_probabilities(delta: jax.Array, low: jax.Array, epsilon: jax.Array) -> jax.Array:
    """P(keep) per entry: low + 2ε · (rank − min rank) / (max rank − min rank), ranks of |delta| per row.

    `low` is density − ε (computed in float64 by the caller, as mergekit's Python floats are).
    Vectors are treated as one row. Returns [rows, columns] in DELLA's work dtype.
    """
    work = della_work_dtype(delta.dtype)
    rows = delta if delta.ndim >= 2 else delta[None]
    ranks = _ascending_ranks(jnp.abs(rows), axis=1).astype(work) + 1
    lowest, highest = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
    normalized = jnp.clip((ranks - lowest) / (highest - lowest), 0, 1)
    return low.astype(work) + normalized * 2 * epsilon.astype(work)


@partial(jax.jit, static_argnames=("rescale",))
def della_drop(delta: jax.Array, keep: jax.Array, rescale: bool) -> jax.Array:
    """Apply DELLA's keep mask ([rows, columns], drawn from `della_keep_probabilities`) and rescale."""
    work = della_work_dtype(delta.dtype)
    rows = delta if delta.ndim >= 2 else delta[None]
    kept = _masked_and_rescaled(rows.astype(work), keep, rescale)
    return kept.astype(delta.dtype).reshape(delta.shape)
