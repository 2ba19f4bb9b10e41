"""What the evaluation asks of a model: two reductions of its logits over a padded batch.

- `next_token`: the log-probability distribution after each row's last real token, reduced to a
  few requested token ids plus the top token (the letter protocol; one-token continuations).
- `continuation`: the summed log-probability of target tokens read at given positions, and whether
  each was the greedy choice (lm-eval's loglikelihood for multi-token continuations). Only the
  target positions go through the vocabulary projection, not the whole prompt.

`JaxModelScorer` runs them jitted on a bmx model, batch rows split over all local devices.
`LogitsFnScorer` runs them in NumPy on any `logits_fn(input_ids, attention_mask) -> logits`, e.g.
a PyTorch model, as a reference.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol
from collections.abc import Callable

import numpy as np

NextTokenScores = tuple[np.ndarray, np.ndarray, np.ndarray]  # logprobs [B, K], top id [B], top logprob [B]
ContinuationScores = tuple[np.ndarray, np.ndarray]  # summed logprob [B], all greedy [B]


class Scorer(Protocol):
    max_length: int  # longest input the model accepts (lm-eval truncates on the left to it)
    row_multiple: int  # batch rows must be a multiple of this (the data-parallel device count)

    def next_token(self, input_ids: np.ndarray, attention_mask: np.ndarray, last_index: np.ndarray,
                   token_ids: np.ndarray) -> NextTokenScores: ...

    def continuation(self, input_ids: np.ndarray, attention_mask: np.ndarray, target_positions: np.ndarray,
                     target_ids: np.ndarray, target_mask: np.ndarray) -> ContinuationScores: ...


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class LogitsFnScorer:
    """Scores with `logits_fn(input_ids [B,S] int32, attention_mask [B,S]) -> logits [B,S,V]` in NumPy."""

    def __init__(self, logits_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], max_length: int,
                 row_multiple: int = 1):
        self.logits_fn = logits_fn
        self.max_length = max_length
        self.row_multiple = row_multiple

    def module(self):
        """There is no bmx model behind a logits function: generation (which needs one, with its KV
        cache) cannot run on this scorer."""
        raise ValueError(f"LogitsFnScorer over {getattr(self.logits_fn, '__name__', self.logits_fn)!r} has no bmx "
                         "model to generate with: generate_until needs a JaxModelScorer (load_eval_model)")

    def next_token(self, input_ids, attention_mask, last_index, token_ids) -> NextTokenScores:
        logits = np.asarray(self.logits_fn(input_ids, attention_mask))
        logprobs = _log_softmax(logits[np.arange(len(last_index)), last_index])  # [B, V]
        top = logprobs.argmax(axis=-1)
        return (np.take_along_axis(logprobs, token_ids, axis=1), top,
                np.take_along_axis(logprobs, top[:, None], axis=1)[:, 0])

    def continuation(self, input_ids, attention_mask, target_positions, target_ids, target_mask) -> ContinuationScores:
        logits = np.asarray(self.logits_fn(input_ids, attention_mask))  # [B, S, V]
        logprobs = _log_softmax(np.take_along_axis(logits, target_positions[..., None], axis=1))  # [B, T, V]
        picked = np.take_along_axis(logprobs, target_ids[..., None], axis=-1)[..., 0]
        greedy = (logprobs.argmax(axis=-1) == target_ids) | (target_mask == 0)
        return (picked * target_mask).sum(axis=1), greedy.all(axis=1)


class JaxModelScorer:
    """Scores with a bmx `Mistral` (any NNX module with `hidden_states` and `logits`), data-parallel.

    Parameters are replicated on every local device and each batch's rows are split across them:
    evaluation is embarrassingly parallel, and a 7B model fits on one accelerator.
    """

    def __init__(self, model, max_length: int | None = None, devices=None):
        import jax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.row_multiple = len(devices)
        self.max_length = max_length or model.config.max_position_embeddings
        graphdef, state = nnx.split(model)
        self._graphdef = graphdef
        replicated = NamedSharding(self.mesh, PartitionSpec())
        rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self._state = jax.device_put(state, replicated)
        self._next_token = jax.jit(partial(_jax_next_token, graphdef),
                                   in_shardings=(replicated, rows, rows, rows, rows), out_shardings=rows)
        self._continuation = jax.jit(partial(_jax_continuation, graphdef),
                                     in_shardings=(replicated, rows, rows, rows, rows, rows), out_shardings=rows)

    def module(self):
        """The scored model itself (sharing the replicated parameters), e.g. for generation."""
        from flax import nnx

        return nnx.merge(self._graphdef, self._state)

    def next_token(self, input_ids, attention_mask, last_index, token_ids) -> NextTokenScores:
        outputs = self._next_token(self._state, input_ids, attention_mask, last_index, token_ids)
        return tuple(np.asarray(x) for x in outputs)

    def continuation(self, input_ids, attention_mask, target_positions, target_ids, target_mask) -> ContinuationScores:
        outputs = self._continuation(self._state, input_ids, attention_mask, target_positions, target_ids, target_mask)
        return tuple(np.asarray(x) for x in outputs)


def _jax_next_token(graphdef, state, input_ids, attention_mask, last_index, token_ids):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(input_ids, attention_mask)  # [batch, seq, embed]
    # Only the last real position's logits are needed: [batch, 1, vocab] instead of [batch, seq, vocab].
    last_hidden = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)
    logprobs = jax.nn.log_softmax(model.logits(last_hidden)[:, 0].astype(jnp.float32))  # [batch, vocab]
    top = jnp.argmax(logprobs, axis=-1)
    return (jnp.take_along_axis(logprobs, token_ids, axis=1), top,
            jnp.take_along_axis(logprobs, top[:, None], axis=1)[:, 0])


def _jax_continuation(graphdef, state, input_ids, attention_mask, target_positions, target_ids, target_mask):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(input_ids, attention_mask)  # [batch, seq, embed]
    target_hidden = jnp.take_along_axis(hidden, target_positions[..., None], axis=1)  # [batch, targets, embed]
    logprobs = jax.nn.log_softmax(model.logits(target_hidden).astype(jnp.float32))  # [batch, targets, vocab]
    picked = jnp.take_along_axis(logprobs, target_ids[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logprobs, axis=-1) == target_ids) | (target_mask == 0)
    return jnp.sum(picked * target_mask, axis=1), jnp.all(greedy, axis=1)
