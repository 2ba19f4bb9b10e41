"""`QuantizedLinear`: a drop-in for `bmx.model.layers.Linear` that stores a quantized weight.

The packed codes and scales stay packed in device memory; the kernel is rebuilt inside the jitted
forward, one layer at a time under the model's layer scan, and immediately multiplied, so the
float weight of the whole model never exists. The matmul itself is `Linear`'s, so a quantized
model computes exactly what the float model with the dequantized kernels computes.
"""

from __future__ import annotations

from math import prod
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bmx.model import products
from bmx.quant.schemes import Scheme


class QuantizedArray(nnx.Variable):
    """Codes, scales or zeros of a quantized weight: stored, never trained."""


class QuantizedLinear(nnx.Module):
    """A bias-free projection `[*in_shape] -> [*out_shape]` whose weight is held by `scheme`'s arrays.

    `arrays` may carry leading axes (e.g. the stacked `layers` axis): `leading_axes` names them,
    and the layer scan hands `__call__` one layer's slice.
    """

    def __init__(self, scheme: Scheme, arrays: dict[str, jax.Array], in_shape: Sequence[int],
                 out_shape: Sequence[int], *, dtype, leading_axes: Sequence[str] = ()):
        self.scheme = scheme
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.num_contracted = len(self.in_shape)
        self.dtype = dtype
        self.leading_axes = tuple(leading_axes)
        self.array_names = tuple(sorted(arrays))
        for name in self.array_names:
            value = jnp.asarray(arrays[name])
            axes = (*leading_axes, *([None] * (value.ndim - len(leading_axes))))
            setattr(self, name, QuantizedArray(value, logical_axes=axes))

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """`[*leading, *in_shape, *out_shape]`: the float kernel these arrays stand for (LoRA adapts it)."""
        leading = getattr(self, self.array_names[0]).shape[:len(self.leading_axes)]
        return (*leading, *self.in_shape, *self.out_shape)

    @property
    def kernel_axes(self) -> tuple[str | None, ...]:
        return (*self.leading_axes, *([None] * (len(self.in_shape) + len(self.out_shape))))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.array_names}

    def dequantized_kernel(self) -> jax.Array:
        """The kernel `[*in_shape, *out_shape]` in the computation dtype (one layer's arrays)."""
        matrix = self.scheme.kernel_matrix(self.arrays(), prod(self.out_shape), prod(self.in_shape))
        return matrix.reshape(*self.in_shape, *self.out_shape).astype(self.dtype)

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        kernel = self.dequantized_kernel()
        contracted = self.num_contracted
        dimensions = ((tuple(range(x.ndim - contracted, x.ndim)), tuple(range(contracted))), ((), ()))
        return products.dot_general(x.astype(self.dtype), kernel, dimensions, out_dtype or self.dtype)
