"""The merge's randomness (DARE's and DELLA's keep masks, Arcee Fusion's quantile sample), from a seed alone.

Each mask's key is derived from the seed, a stable hash of the tensor's output name and the
input's position, never from a running RNG state: the same seed gives the same masks on any
device and in any tensor order. The key's two words come from JAX's threefry generator; the mask
itself is a keyed hash of each entry's index (`keyed_counter_bits`: integer multiplies, shifts and
xors, the same bits on every backend). Why not `jax.random.bernoulli`: threefry's 20 rounds per
word made drawing the masks the largest part of a DARE merge on CPU (`bench/merge_kernels.py`).
mergekit draws from PyTorch's global generator instead, so its DARE merges cannot be reproduced
bit for bit; parity with it is tested by injecting the same masks into both (see tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np


class DropMasks(Protocol):
    """Where DARE and DELLA get their keep masks: True keeps an entry of the delta.

    `density` is the keep probability: one number (DARE) or one per entry, shaped `shape` (DELLA).
    """

    def __call__(self, tensor_name: str, input_index: int, shape: tuple[int, ...], density) -> jax.Array: ...

    def sample_indices(self, tensor_name: str, size: int, count: int) -> jax.Array:
        """`count` indices drawn uniformly from range(size), with replacement."""


def stable_name_hash(name: str) -> int:
    """A 31-bit hash of a tensor name that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFF_FFFF


def tensor_key(seed: int, tensor_name: str, input_index: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), stable_name_hash(tensor_name))
    return jax.random.fold_in(key, input_index)


def _triple32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with near-ideal avalanche (Chris Wellons' "triple32",
    github.com/skeeto/hash-prospector): each output bit flips with probability ~1/2 for any input bit."""
    x ^= x >> 17
    x *= jnp.uint32(0xED5AD4BB)
    x ^= x >> 11
    x *= jnp.uint32(0xAC4C1B51)
    x ^= x >> 15
    x *= jnp.uint32(0x31848BAB)
    return x ^ (x >> 14)


MAX_MASK_ENTRIES = 1 << 32  # one counter per entry, in uint32


def keyed_counter_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 `shape` of random-looking bits: entry i (row-major) gets triple32(triple32(i ^ k0) + k1).

    For one key the map from index to bits is a permutation of the 32-bit integers, so no two
    entries share a value and the kept fraction of a mask is within one entry in 2^32 of a draw
    without replacement.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if size > MAX_MASK_ENTRIES:
        raise ValueError(f"a drop mask of shape {shape} has {size} entries, more than the {MAX_MASK_ENTRIES} "
                         "its 32-bit counters can number")
    words = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return _triple32(_triple32(index ^ words[0]) + words[1])


@partial(jax.jit, static_argnames=("shape",))
def _bernoulli(key: jax.Array, density: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """True with probability `density` (a number or an array broadcasting to `shape`) at each entry."""
    density = jnp.broadcast_to(jnp.asarray(density, jnp.float32), shape)
    # bits < density * 2^32, computed in float32 (resolution 2^-24 of the density, finer than a
    # float32 uniform's 2^-23 in jax.random.bernoulli); a density of 1 or more keeps every entry.
    threshold = jnp.clip(density * jnp.float32(2.0 ** 32), 0, jnp.float32(2.0 ** 32 - 256)).astype(jnp.uint32)
    return (keyed_counter_bits(key, shape) < threshold) | (density >= 1)


@dataclass(frozen=True)
class SeededDropMasks:
    """Bernoulli(density) keep masks keyed by (seed, tensor name, input position)."""

    seed: int

    def __call__(self, tensor_name: str, input_index: int, shape: tuple[int, ...], density) -> jax.Array:
        return _bernoulli(tensor_key(self.seed, tensor_name, input_index), density, tuple(shape))

    def sample_indices(self, tensor_name: str, size: int, count: int) -> jax.Array:
        key = tensor_key(self.seed, tensor_name, 0x7FFF_FFFF)  # a stream no input's mask uses
        return jax.random.randint(key, (count,), 0, size)
