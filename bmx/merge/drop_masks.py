"""The merge's randomness (DARE's and DELLA's keep masks, Arcee Fusion's quantile sample), from a seed alone.

Each mask's key is derived from the seed, a stable hash of the tensor's output name and the
input's position, never from a running RNG state: the same seed gives the same masks on any
device (JAX's threefry generator is backend-independent) and in any tensor order.
mergekit draws from PyTorch's global generator instead, so its DARE merges cannot be reproduced
bit for bit; parity with it is tested by injecting the same masks into both (see tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import jax


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


@partial(jax.jit, static_argnames=("shape",))
def _bernoulli(key: jax.Array, density: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.bernoulli(key, density, shape)


@dataclass(frozen=True)
class SeededDropMasks:
    """Bernoulli(density) keep masks keyed by (seed, tensor name, input position)."""

    seed: int

    def __call__(self, tensor_name: str, input_index: int, shape: tuple[int, ...], density) -> jax.Array:
        return _bernoulli(tensor_key(self.seed, tensor_name, input_index), density, tuple(shape))

    def sample_indices(self, tensor_name: str, size: int, count: int) -> jax.Array:
        key = tensor_key(self.seed, tensor_name, 0x7FFF_FFFF)  # a stream no input's mask uses
        return jax.random.randint(key, (count,), 0, size)
