"""`LoRALinear`: a frozen `Linear` plus a trainable low-rank update, y = W·x + (B·A)·dropout(x)·scale.

Shapes follow the wrapped kernel `[*in_shape, *out_shape]` (e.g. q: `[embed, heads, head_dim]`,
o: `[heads, head_dim, embed]`): A is `[*in_shape, rank]` and B `[rank, *out_shape]`, so heads stay a
dimension of their own and the trainer's logical-axis rules shard A and B like the kernel. In the
scanned layer stack every array also has the leading `layers` axis. A and B are `nnx.LoRAParam`s,
so `nnx.state(model, nnx.LoRAParam)` is exactly what an optimizer should update.

Dropout needs a fresh key every step, but the model's layer scan does not hand RNG state back; so
the key is data of the model's state, one per layer: `dropout_key` is empty (`[*leading, 0]`, dropout
off) as `apply_lora` makes it, and a training forward merges the model from a state whose keys
`with_lora_dropout` filled in (pure: no module is changed). Whether a key is there is its shape, so
it is known while tracing. Masks are drawn with the `rbg` generator (XLA's RngBitGenerator):
threefry masks for seven projections cost more compile time than the rest of the training step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmx.model import products
from bmx.model.layers import Linear

LORA_RANK_AXIS = "lora_rank"  # a logical axis no sharding rule names: A and B stay whole along the rank


DROPOUT_KEY_IMPL = "rbg"
DROPOUT_KEY_WORDS = 4  # uint32 words of an `rbg` key


class LoRADropoutKey(nnx.Variable):
    """Raw `rbg` key data `[*leading, 4]` uint32 for this projection's dropout, or `[*leading, 0]`: no key,
    dropout off (not a parameter)."""


def kernel_shape_and_axes(base) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
    """Shape `[*leading, *in, *out]` and logical axes of the kernel `base` multiplies by: a float `Linear`'s
    own, or the one a `bmx.quant` `QuantizedLinear` stores (QLoRA: adapters on a quantized base)."""
    if isinstance(base, Linear):
        return tuple(base.kernel.shape), tuple(base.kernel.get_metadata()["logical_axes"])
    return tuple(base.kernel_shape), tuple(base.kernel_axes)


def lora_a_shape(base, rank: int, num_leading: int) -> tuple[int, ...]:
    """A's shape for `base`: `[*leading, *in_shape, rank]`."""
    return (*kernel_shape_and_axes(base)[0][:num_leading + base.num_contracted], rank)


class LoRALinear(nnx.Module):
    def __init__(self, base, *, rank: int, scale: float, dropout: float, leading_axes: tuple[str, ...],
                 unit_noise: jax.Array):
        """`base`: a `Linear`, or a `QuantizedLinear` (QLoRA). `unit_noise` ~ U(-1, 1) of A's shape
        (`lora_a_shape`): the caller draws it, so that all the adapters of a model can come from one
        draw (one compiled sampler whatever the shapes)."""
        kernel_shape, axes = kernel_shape_and_axes(base)
        lead = len(leading_axes)
        in_end = lead + base.num_contracted
        a_shape = lora_a_shape(base, rank, lead)
        if tuple(unit_noise.shape) != a_shape:
            raise ValueError(f"LoRA A noise has shape {tuple(unit_noise.shape)}, expected {a_shape}")
        # PEFT's default: A ~ kaiming_uniform(a=√5) = U(±1/√fan_in), B = 0, so training starts at the base model.
        bound = 1.0 / math.sqrt(int(np.prod(kernel_shape[lead:in_end])))
        self.base = base
        # A and B are float32 whatever the base's storage dtype: they are the trained (master) weights.
        self.lora_a = nnx.LoRAParam((unit_noise * bound).astype(jnp.float32),
                                    logical_axes=(*leading_axes, *axes[lead:in_end], LORA_RANK_AXIS))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*kernel_shape[:lead], rank, *kernel_shape[in_end:]), jnp.float32),
                                    logical_axes=(*leading_axes, LORA_RANK_AXIS, *axes[in_end:]))
        self.dropout_key = LoRADropoutKey(jnp.zeros((*kernel_shape[:lead], 0), jnp.uint32))  # no key yet
        self.rank = rank
        self.scale = scale
        self.dropout = dropout

    def delta_kernel(self) -> jax.Array:
        """(A·B)·scale in float32, shaped like the base kernel: what merging adds to it."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        leading = a.shape[:a.ndim - 1 - self.base.num_contracted]  # (layers,) in the stack, () alone
        fan_in_by_rank = a.reshape(*leading, -1, self.rank)
        rank_by_fan_out = b.reshape(*leading, self.rank, -1)
        return (fan_in_by_rank @ rank_by_fan_out).reshape(kernel_shape_and_axes(self.base)[0]) * self.scale

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        dtype = self.base.dtype
        out_dtype = out_dtype or dtype
        if self.dropout > 0 and self.dropout_key.shape[-1] == DROPOUT_KEY_WORDS:  # a training forward
            key = jax.random.wrap_key_data(self.dropout_key[...], impl=DROPOUT_KEY_IMPL)
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x_lora = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        else:
            x_lora = x
        contracted = self.base.num_contracted
        into_rank = ((tuple(range(x.ndim - contracted, x.ndim)), tuple(range(contracted))), ((), ()))
        low_rank = products.dot_general(x_lora.astype(dtype), self.lora_a[...].astype(dtype), into_rank,
                                        dtype)  # [..., rank]
        out_of_rank = (((low_rank.ndim - 1,), (0,)), ((), ()))
        update = products.dot_general(low_rank, self.lora_b[...].astype(dtype), out_of_rank, out_dtype)
        return self.base(x, out_dtype) + update * jnp.asarray(self.scale, out_dtype)
