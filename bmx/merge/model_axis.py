"""Reductions over the model axis of a stacked `[inputs, *shape]` array, written as adds in input order.

Why not `jnp.sum(stacked, axis=0)`: XLA:CPU (jax 0.10's YNNPACK reductions) reduces a short leading
axis over millions of kept entries an order of magnitude slower than the same adds written out
(`python bench/merge_kernels.py`), and every TIES/DARE/SCE/RAM merge reduces each tensor over its
2–3 inputs. Floating inputs accumulate as `jnp.sum` does for them (16-bit in float32, rounded
once); booleans count in int32. Adding in input order is also how PyTorch (mergekit) reduces a
short leading axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """Where mergekit upcasts: float64 stays float64, everything else runs in float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _accumulator(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer):
        return jnp.dtype(jnp.int32)
    return compute_dtype(dtype)


def _total(stacked: jax.Array) -> jax.Array:
    accumulate = _accumulator(stacked.dtype)
    total = stacked[0].astype(accumulate)
    for index in range(1, stacked.shape[0]):
        total = total + stacked[index].astype(accumulate)
    return total


def sum_models(stacked: jax.Array, *, keepdims: bool = False) -> jax.Array:
    """`jnp.sum(stacked, axis=0)`: floating inputs keep their dtype, booleans give int32 counts."""
    total = _total(stacked)
    if jnp.issubdtype(stacked.dtype, jnp.floating):
        total = total.astype(stacked.dtype)
    return total[None] if keepdims else total


def mean_models(stacked: jax.Array) -> jax.Array:
    """`jnp.mean(stacked, axis=0)` for floating inputs."""
    return (_total(stacked) / stacked.shape[0]).astype(stacked.dtype)


def var_models(stacked: jax.Array) -> jax.Array:
    """`jnp.var(stacked, axis=0)` (population variance) for floating inputs: two passes, as jnp.var."""
    accumulate = _accumulator(stacked.dtype)
    mean = _total(stacked) / stacked.shape[0]
    squares = jnp.square(stacked[0].astype(accumulate) - mean)
    for index in range(1, stacked.shape[0]):
        squares = squares + jnp.square(stacked[index].astype(accumulate) - mean)
    return (squares / stacked.shape[0]).astype(stacked.dtype)
