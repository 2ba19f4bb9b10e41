"""Parameterised building blocks: linear projections, embedding, RMSNorm and the SwiGLU MLP.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`; `layers` is prepended for the scanned stack). The model never shards anything itself:
the trainer maps these names onto the device mesh (see `bmx.model.sharding`).
"""

from __future__ import annotations

import math
from functools import partial
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bmx.model import products
from bmx.model.sharding import constrain


def logical_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], dtype, std: float | None) -> nnx.Param:
    """A parameter drawn from N(0, std²) (transformers' init) or ones when `std` is None."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """A bias-free projection whose kernel is `[*in_shape, *out_shape]` (e.g. `[embed, heads, head_dim]`).

    Keeping heads as their own kernel dimension lets the sharding rules split them without reshapes.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str], *,
                 std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = logical_param(rngs, (*in_shape, *out_shape), axes, param_dtype, std)
        self.num_contracted = len(in_shape)
        self.outputs_first = False  # the kernel as [*out_shape, *in_shape]: see `store_outputs_first`
        self.dtype = dtype

    def store_outputs_first(self) -> None:
        """Keep the kernel as `[*out_shape, *in_shape]` (a transposed copy), each output's weights contiguous.

        Why: multiplying a few rows (a decode step's batch) by a kernel wider than it is deep streams
        the weights once, and XLA:CPU does that at up to twice the speed when the contracted axes are
        the kernel's last (`bench/generate.py`). Training keeps `[*in, *out]`.
        """
        if self.outputs_first:
            return
        contracted, kernel = self.num_contracted, self.kernel
        order = (*range(contracted, kernel.ndim), *range(contracted))
        axes = kernel.get_metadata().get("logical_axes")
        self.kernel = nnx.Param(jnp.transpose(kernel[...], order),
                                logical_axes=None if axes is None else tuple(axes[i] for i in order))
        self.outputs_first = True

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        contracted = self.num_contracted
        # One flat token axis: with [batch, seq, ...] operands XLA:CPU copies the output gradient
        # transposed before the weight-gradient matmul (12% of a training step).
        leading = x.shape[:x.ndim - contracted]
        tokens = x.reshape(-1, *x.shape[x.ndim - contracted:])
        if self.outputs_first:
            # As one [outputs, inputs] matrix (a free reshape): with the heads as their own axes XLA:CPU
            # copies the kernel into the transposed layout at every call.
            out_shape = kernel.shape[:kernel.ndim - contracted]
            matrix = kernel.reshape(math.prod(out_shape), -1)
            out = products.dot_general(tokens.reshape(tokens.shape[0], -1).astype(self.dtype), matrix,
                                       (((1,), (1,)), ((), ())), out_dtype or self.dtype)
            return out.reshape(*leading, *out_shape)
        dimensions = ((tuple(range(1, 1 + contracted)), tuple(range(contracted))), ((), ()))
        out = products.dot_general(tokens.astype(self.dtype), kernel, dimensions, out_dtype or self.dtype)
        return out.reshape(*leading, *out.shape[1:])


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = logical_param(rngs, (vocab_size, hidden_size), ("vocab", "embed"), param_dtype, std)
        self.dtype = dtype

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], token_ids, axis=0).astype(self.dtype)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Logits against the embedding matrix (tied LM head), in float32."""
        return products.dot_general(hidden, self.weight[...].astype(self.dtype), (((2,), (1,)), ((), ())),
                                    jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, statistics in float32, as transformers' `MistralRMSNorm`."""

    def __init__(self, hidden_size: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.weight = logical_param(rngs, (hidden_size,), ("embed",), param_dtype, None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def _normalised(x, eps):
    x32 = x.astype(jnp.float32)
    inverse_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * inverse_rms, inverse_rms


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) · weight. Its backward pass keeps only x and recomputes the rest (one reduction
    over the features), where autodiff would keep x, the normalised x and 1/rms: two more stacked
    buffers per norm in a layer scan."""
    return _normalised(x, eps)[0].astype(x.dtype) * weight.astype(x.dtype)


def _rms_norm_forward(x, weight, eps):
    return rms_norm(x, weight, eps), (x, weight)


def _rms_norm_backward(eps, residuals, d_out):
    x, weight = residuals
    normed, inverse_rms = _normalised(x, eps)
    d_out32 = d_out.astype(jnp.float32)
    # The output is normed in x's dtype times the weight in x's dtype, as the forward rounds them.
    d_weight = jnp.sum((d_out32 * normed.astype(x.dtype).astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=0)
    d_normed = d_out32 * weight.astype(x.dtype).astype(jnp.float32)
    d_x = inverse_rms * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_weight.astype(weight.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) · up. Its backward pass keeps only gate and up: autodiff would also keep sigmoid(gate)
    and silu(gate), and in a layer scan each kept [tokens, mlp] array is another stacked buffer to
    zero-fill, write and read back."""
    return jax.nn.silu(gate) * up


def _swiglu_forward(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(residuals, d_hidden):
    gate, up = residuals
    gate32, d_hidden32 = gate.astype(jnp.float32), d_hidden.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(gate32)
    d_gate = d_hidden32 * up.astype(jnp.float32) * sigmoid * (1 + gate32 * (1 - sigmoid))
    d_up = d_hidden32 * gate32 * sigmoid
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear((hidden_size,), (intermediate_size,), ("embed", "mlp"), **common)
        self.up_proj = Linear((hidden_size,), (intermediate_size,), ("embed", "mlp"), **common)
        self.down_proj = Linear((intermediate_size,), (hidden_size,), ("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = swiglu(self.gate_proj(x), self.up_proj(x))  # [batch, seq, mlp]
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return self.down_proj(hidden)
