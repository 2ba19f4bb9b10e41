"""The jitted train and eval steps: pure functions of (params, optimizer state, batch, frozen).

Parameters travel as nested dicts of arrays (`nnx.State.to_pure_dict()`): `params`, what the optimizer
updates, and `frozen`, the rest of the model (`{}` when every parameter trains; see
`bmx.train.trainable`), merged into the model inside the step, so shardings, donation and
checkpointing all see plain PyTrees and no module is changed while tracing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bmx.lora.adapters import with_lora_dropout
from bmx.model.mistral import Mistral
from bmx.model.sharding import logical_sharding
from bmx.train.loss import chunked_cross_entropy

Batch = dict[str, jax.Array]


def _head_kernel(model: Mistral) -> jax.Array:
    """The LM head as [embed, vocab] (the transposed embedding when tied)."""
    if model.config.tie_word_embeddings:
        return model.model.embed_tokens.weight[...].T
    return model.lm_head.kernel[...]


def make_loss_fn(graphdef, *, vocab_chunk: int, z_loss_weight: float, document_masking: bool) -> Callable:
    def loss_sums(params, batch: Batch, frozen):
        """(loss + z-loss summed over tokens, (loss sum, token count)) of `nnx.merge(graphdef, params, frozen)`."""
        model = nnx.merge(graphdef, params, frozen)
        use_segments = document_masking and "segment_ids" in batch
        hidden = model.hidden_states(batch["inputs"], positions=batch.get("positions") if use_segments else None,
                                     segment_ids=batch["segment_ids"] if use_segments else None)
        loss_sum, z_loss_sum, count = chunked_cross_entropy(
            hidden, _head_kernel(model), batch["targets"], batch["loss_mask"],
            vocab_chunk=vocab_chunk, z_loss_weight=z_loss_weight)
        return loss_sum + z_loss_sum, (loss_sum, count)

    return loss_sums


def _split_microbatches(batch: Batch, accumulation: int) -> Batch:
    """[global, ...] → [accumulation, global / accumulation, ...], microbatch k = rows k, k + A, k + 2A, ….

    Interleaving keeps every device's local rows spread over all microbatches, so no data moves.
    """
    def split(x):
        return x.reshape(x.shape[0] // accumulation, accumulation, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _dropout_key(seed: int, opt_state) -> jax.Array:
    """A fresh dropout key per optimizer step, from the step count the optimizer state keeps (so a
    resumed run draws the masks an uninterrupted one would)."""
    (_, count), *_ = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return jax.random.fold_in(jax.random.key(seed), count)


def make_train_step(loss_sums: Callable, optimizer: optax.GradientTransformation, accumulation: int,
                    mesh, rules, dropout_seed: int | None = None) -> Callable:
    """`train_step(params, opt_state, batch, frozen)`: gradients and updates for `params` only.

    With `dropout_seed`, the LoRA adapters in `frozen` get this step's dropout keys (`with_lora_dropout`).
    """
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def train_step(params, opt_state, batch: Batch, frozen):
        if dropout_seed is not None:
            frozen = with_lora_dropout(frozen, _dropout_key(dropout_seed, opt_state))
        with logical_sharding(mesh, rules):
            if accumulation == 1:
                (_, (loss_sum, count)), grads = grad_fn(params, batch, frozen)
            else:
                def accumulate(carry, microbatch):
                    grads_sum, loss_total, count_total = carry
                    (_, (loss_sum, count)), grads = grad_fn(params, microbatch, frozen)
                    return (jax.tree.map(jnp.add, grads_sum, grads), loss_total + loss_sum, count_total + count), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                (grads, loss_sum, count), _ = jax.lax.scan(
                    accumulate, (zeros, jnp.float32(0), jnp.float32(0)), _split_microbatches(batch, accumulation))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)  # mean over every counted token of the global batch
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss_sum / count, "grad_norm": optax.global_norm(grads), "tokens": count}
        return params, opt_state, metrics

    return train_step


def make_eval_step(loss_sums: Callable, mesh, rules) -> Callable:
    def eval_step(params, batch: Batch, frozen):
        with logical_sharding(mesh, rules):
            _, (loss_sum, count) = loss_sums(params, batch, frozen)
        return loss_sum, count

    return eval_step
