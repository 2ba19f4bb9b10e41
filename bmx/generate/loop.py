"""Token-level generation: left-pad a batch of prompts, prefill once, then decode one token per step.

Both are calls of the model itself with a `bmx.model.KVCache` (a rolling buffer of `sliding_window`
slots), on the model's layers unstacked (`bmx.model.unstack_layers`). Prefill and the decode step
are jitted with static shapes (batch, padded prompt length, cache slots), so a whole generation
compiles two programs, reused across calls with the same shapes; the decode step donates the cache,
which it updates in place.
Prompt lengths are rounded up to a multiple of `prompt_bucket` so that prompts of similar length
share them. The host loop dispatches step n + 1 before reading step n's tokens, so the device never
waits for the host's bookkeeping (stop checks, streaming).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from bmx.generate.sampling import Sampling, next_tokens
from bmx.model.kv_cache import KVCache, cache_slots
from bmx.model.mistral import Mistral, unstack_layers

GREEDY = Sampling(greedy=True)
FINISH_REASONS = ("eos", "stop", "length")

# Called with (row, generated ids so far) after each new token of a running row; True stops that row.
TokenObserver = Callable[[int, list[int]], bool]


@dataclass
class TokenGeneration:
    token_ids: list[int]  # generated ids only, ending with the EOS or the token that completed a stop
    finish_reason: str  # one of FINISH_REASONS


@functools.lru_cache(maxsize=8)
def compiled_steps(graphdef, sampling: Sampling):
    """(prefill, decode step) for one model structure and sampling setting, each jitted once.

    `prefill(state, input_ids, attention_mask, key, slots=...)` → (first tokens, cache);
    `decode(state, tokens, cache, key)` → (next tokens, cache), the cache donated.
    """

    @functools.partial(jax.jit, static_argnames=("slots",))
    def prefill(state, input_ids, attention_mask, key, *, slots: int):
        model = nnx.merge(graphdef, state)
        cache = KVCache.empty(model.config, input_ids.shape[0], slots, model.model.embed_tokens.dtype)
        logits, cache = model(input_ids, attention_mask, cache=cache)
        return next_tokens(logits[:, -1], sampling, key), cache

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def decode(state, tokens, cache, key):
        logits, updated = nnx.merge(graphdef, state)(tokens[:, None], cache=cache)
        return next_tokens(logits[:, -1], sampling, jax.random.fold_in(key, cache.next_index)), updated

    return prefill, decode


def fit_positions(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_positions: int,
                  truncate: bool) -> list[Sequence[int]]:
    """The prompts, each with room for `max_new_tokens` within the model's `max_positions` positions.

    A longer prompt is an error, or with `truncate` loses its first tokens (with a warning).
    """
    room = max_positions - max_new_tokens
    fitted = []
    for row, prompt in enumerate(prompts):
        if len(prompt) <= room:
            fitted.append(prompt)
            continue
        needed = f"{len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} = {len(prompt) + max_new_tokens}"
        if not truncate or room < 1:
            raise ValueError(f"prompt {row}: {needed} positions, past the model's max_position_embeddings "
                             f"{max_positions}; shorten it, lower max_new_tokens"
                             + ("" if truncate else ", or truncate it (--truncate-prompt)"))
        warnings.warn(f"prompt {row}: {needed} positions, past the model's max_position_embeddings "
                      f"{max_positions}; kept its last {room} tokens", stacklevel=3)
        fitted.append(prompt[len(prompt) - room:])
    return fitted


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)` `[batch, padded]`, prompts right-aligned, length a multiple of `bucket`."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    empty = [row for row, prompt in enumerate(prompts) if len(prompt) == 0]
    if empty:
        raise ValueError(f"prompts {empty} have no tokens; a prompt needs at least one (e.g. BOS)")
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    input_ids = np.full((len(prompts), length), pad_id, np.int32)
    attention_mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = prompt
        attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


def generate_token_ids(model: Mistral, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       eos_ids: Sequence[int] = (), sampling: Sampling = GREEDY, seed: int = 0, pad_id: int = 0,
                       prompt_bucket: int = 16, on_token: TokenObserver | None = None,
                       truncate_prompts: bool = False) -> list[TokenGeneration]:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids, any lengths) in one batch.

    A row stops at one of `eos_ids` (kept in its output, as transformers does), when `on_token`
    returns True for it, or after `max_new_tokens`. Sampling is reproducible for a given `seed`.
    A prompt that leaves no room for `max_new_tokens` within `max_position_embeddings` is an error,
    or with `truncate_prompts` keeps only its last tokens.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = fit_positions(prompts, max_new_tokens, model.config.max_position_embeddings, truncate_prompts)
    input_ids, attention_mask = left_pad(prompts, pad_id, prompt_bucket)
    sampling = GREEDY if sampling.is_greedy else sampling  # one compiled program for every greedy setting
    results = [TokenGeneration([], "length") for _ in prompts]
    if max_new_tokens == 0:
        return results
    graphdef, state = nnx.split(unstack_layers(model))
    prefill, decode = compiled_steps(graphdef, sampling)
    slots = cache_slots(model.config.sliding_window, input_ids.shape[1] + max_new_tokens)
    key = jax.random.key(seed)
    tokens, cache = prefill(state, input_ids, attention_mask, jax.random.fold_in(key, 0), slots=slots)
    running = set(range(len(prompts)))
    stop_ids = set(int(i) for i in eos_ids)
    for step in range(max_new_tokens):
        if step + 1 < max_new_tokens:  # dispatched before this step's tokens reach the host
            following, cache = decode(state, tokens, cache, key)
        for row, token in enumerate(np.asarray(tokens).tolist()):
            if row not in running:
                continue
            results[row].token_ids.append(token)
            if token in stop_ids:
                results[row].finish_reason = "eos"
            elif on_token is not None and on_token(row, results[row].token_ids):
                results[row].finish_reason = "stop"
            else:
                continue
            running.discard(row)
        if not running:
            break
        if step + 1 < max_new_tokens:
            tokens = following
    return results
