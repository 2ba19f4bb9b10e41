"""Matrix products of 16-bit operands, accumulated and returned the way each platform computes them fastest.

XLA:CPU multiplies bfloat16 operands into a bfloat16 result through a slow generic loop, but into a
float32 result with its AVX512-BF16/AMX library kernels: 6-19x faster for a 7B model's projections
(`bench/at_7b.py`, README). So on CPU the product is taken in float32 and cast to the requested
dtype. On TPU and GPU the result type stays as requested: they accumulate in float32 inside the
product anyway, and a float32 result would make the backward pass multiply float32 cotangents
(several times slower there). `jax.lax.platform_dependent` picks the branch when the program is
lowered for its platform, so an AOT compile for TPU on a CPU host gets the TPU branch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dot_general(x: jax.Array, y: jax.Array, dimensions, out_dtype) -> jax.Array:
    """`jax.lax.dot_general(x, y, dimensions)` with an `out_dtype` result."""
    if jnp.result_type(x, y).itemsize >= 4:
        return jax.lax.dot_general(x, y, dimensions, preferred_element_type=out_dtype)

    def through_float32(x, y):
        return _one_row_padded(x, y, dimensions).astype(out_dtype)

    def as_requested(x, y):
        return jax.lax.dot_general(x, y, dimensions, preferred_element_type=out_dtype)

    return jax.lax.platform_dependent(x, y, cpu=through_float32, default=as_requested)


def _one_row_padded(x: jax.Array, y: jax.Array, dimensions) -> jax.Array:
    """The float32 product; a one-row `x` is multiplied as two rows (the second zeros).

    Why: XLA:CPU takes a one-row bfloat16 product (batch-1 decoding) as a float32 copy of all of `y`
    followed by a float32 product, 16x slower than the same product with two rows.
    """
    (x_contracted, y_contracted), (x_batch, y_batch) = dimensions
    free = [d for d in range(x.ndim) if d not in x_contracted and d not in x_batch]
    if math.prod(x.shape[d] for d in free) != 1:
        return jax.lax.dot_general(x, y, dimensions, preferred_element_type=jnp.float32)
    two_rows = jnp.stack([x, jnp.zeros_like(x)])
    shifted = ((tuple(d + 1 for d in x_contracted), y_contracted), (tuple(d + 1 for d in x_batch), y_batch))
    out = jax.lax.dot_general(two_rows, y, shifted, preferred_element_type=jnp.float32)
    return jnp.take(out, 0, axis=len(x_batch))  # the new axis: x's first free one, after the batch axes


def einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype) -> jax.Array:
    """`jnp.einsum(spec, x, y)` with an `out_dtype` result, as `dot_general`."""
    if jnp.dtype(out_dtype).itemsize >= 4 or jnp.result_type(x, y).itemsize >= 4:
        return jnp.einsum(spec, x, y, preferred_element_type=out_dtype)
    return jax.lax.platform_dependent(
        x, y, cpu=lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype),
        default=lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=out_dtype))
