"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus).

The filters are applied in transformers' order (temperature, then top-k, then top-p) with its
semantics, so a seed-for-seed different but distribution-for-distribution equal sampler results.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. `greedy` (or temperature 0) takes the argmax; `top_k` 0 and `top_p` 1 turn
    those filters off."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """`logits [batch, vocab]` scaled by 1/temperature, with tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k > 0:
        kth_largest = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # As transformers: sort ascending and drop the tokens whose cumulative probability stays
        # within 1 - top_p, always keeping the most likely one.
        order = jnp.argsort(logits, axis=-1)
        ascending = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop_sorted = (cumulative <= 1.0 - sampling.top_p).at[..., -1].set(False)
        drop = jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def next_tokens(logits: jax.Array, sampling: Sampling, key: jax.Array) -> jax.Array:
    """One token id per row `[batch]` (int32) from `logits [batch, vocab]`."""
    if sampling.is_greedy:
        # top_k(1) is argmax (the lowest index among equal maxima) at about half of XLA:CPU's argmax time.
        return jax.lax.top_k(logits, 1)[1][:, 0].astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
