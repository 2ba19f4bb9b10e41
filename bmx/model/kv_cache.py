"""The key/value cache `Mistral` decodes with: a rolling buffer of `sliding_window` slots when the window is set.

A query at sequence index i sees keys i - window + 1 .. i (transformers' sliding-window semantics), so
keeping only the last `window` keys loses nothing: the key of index i lives in slot `i % slots` and
overwrites the key of index i - slots, which no later query can see. Memory is therefore bounded by
the window however long the generation runs. Without a window the buffer holds the whole sequence.

Indices are positions in the left-padded batch (the same for every row), so every row writes the
same slot at each step; `key_index` records which index each slot holds per row, with EMPTY for an
empty slot or a padding token, and is what the attention mask is built from. Rotary positions are
per row (they count real tokens only), kept in `next_position`.

Each layer has its own keys and values array (a tuple over layers, not one stacked array), so that
a decode step writes one slot of each in place and reads it without slicing a copy out of a stack.
Keys are `[batch, kv_heads, head_dim, slots]` and values `[batch, kv_heads, slots, head_dim]`: each
the layout of the right-hand side of a plain matrix product (query × keys, probabilities × values),
which XLA:CPU multiplies three times faster than the transposed one (it otherwise transposed the
whole buffer at every step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

EMPTY = -1  # key_index of a slot holding nothing a query may attend to
KEY_SLOT_AXIS, VALUE_SLOT_AXIS = 3, 2  # where the slots are in a layer's keys and values buffers


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [batch, kv_heads, head_dim, slots]
    values: tuple[jax.Array, ...]  # per layer [batch, kv_heads, slots, head_dim]
    key_index: jax.Array  # [batch, slots] int32: sequence index held by each slot, EMPTY if none
    next_index: jax.Array  # [] int32: the padded-batch index the next token is written at
    next_position: jax.Array  # [batch] int32: the rotary position of each row's next token
    # A fresh cache is filled from a whole prompt; a filled one is extended one token per call.
    filled: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, config, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        """A cache for `batch` rows of `slots` slots (`cache_slots`), before the prompt."""
        keys = (batch, config.num_key_value_heads, config.head_dim, slots)
        values = (batch, config.num_key_value_heads, slots, config.head_dim)
        layers = config.num_hidden_layers
        return cls(tuple(jnp.zeros(keys, dtype) for _ in range(layers)),
                   tuple(jnp.zeros(values, dtype) for _ in range(layers)),
                   jnp.full((batch, slots), EMPTY, jnp.int32), jnp.int32(0), jnp.zeros((batch,), jnp.int32))

    @property
    def slots(self) -> int:
        return self.key_index.shape[1]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (*self.keys, *self.values, self.key_index))


def cache_slots(sliding_window: int | None, total_length: int) -> int:
    """Slots needed for sequences of `total_length` indices: the window, or fewer if nothing wraps."""
    return total_length if sliding_window is None else min(sliding_window, total_length)


def prompt_slot_layout(prompt_length: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices kept, their slots): the last `slots` prompt indices and where each one is stored."""
    kept = np.arange(max(prompt_length - slots, 0), prompt_length)
    return kept, kept % slots


def prompt_key_index(key_is_valid: jax.Array, slots: int) -> jax.Array:
    """key_index after the prompt: `key_is_valid [batch, prompt]` (True = real token) → [batch, slots]."""
    kept, slot_of = prompt_slot_layout(key_is_valid.shape[1], slots)
    indices = jnp.where(key_is_valid[:, kept], jnp.asarray(kept, jnp.int32), EMPTY)
    return jnp.full((key_is_valid.shape[0], slots), EMPTY, jnp.int32).at[:, slot_of].set(indices)


def _to_buffer_layout(x: jax.Array, slot_axis: int) -> jax.Array:
    """`[batch, seq, kv_heads, head_dim]` → the buffer's layout, `seq` at `slot_axis`."""
    return x.transpose((0, 2, 3, 1) if slot_axis == KEY_SLOT_AXIS else (0, 2, 1, 3))


def store_prompt(buffer: jax.Array, prompt_keys: jax.Array, slot_axis: int) -> jax.Array:
    """One layer's prompt keys (or values) `[batch, prompt, kv_heads, head_dim]` written into its `buffer`."""
    kept, slot_of = prompt_slot_layout(prompt_keys.shape[1], buffer.shape[slot_axis])
    where = (slice(None),) * slot_axis + (slot_of,)
    return buffer.at[where].set(_to_buffer_layout(prompt_keys[:, kept], slot_axis).astype(buffer.dtype))


def store_step(buffer: jax.Array, new: jax.Array, index: jax.Array, slot_axis: int) -> jax.Array:
    """Write one step's keys (or values) `[batch, 1, kv_heads, head_dim]` for sequence `index` into its slot."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, _to_buffer_layout(new, slot_axis).astype(buffer.dtype),
                                               index % buffer.shape[slot_axis], axis=slot_axis)


def step_key_index(key_index: jax.Array, index: jax.Array) -> jax.Array:
    """key_index after every row writes sequence `index` (a scalar) into its slot."""
    column = jnp.full((key_index.shape[0], 1), index, jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(key_index, column, index % key_index.shape[1], axis=1)


def visible_keys(key_index: jax.Array, query_index: jax.Array, sliding_window: int | None) -> jax.Array:
    """[batch, slots] bool: the slots a query at sequence `query_index` attends (causal, windowed, real)."""
    allowed = (key_index != EMPTY) & (key_index <= query_index)
    if sliding_window is not None:
        allowed &= query_index - key_index < sliding_window
    return allowed
