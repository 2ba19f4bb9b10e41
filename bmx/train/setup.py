"""Everything a run needs before its first step, from abstract shapes only (nothing allocated).

`build(config)` gives the mesh, the shardings, what the task trains (`trainable`: params and the
frozen rest, `bmx.train.trainable`), the abstract optimizer state, and the jitted steps
`train_step(params, opt_state, batch, frozen)` and `eval_step(params, batch, frozen)`, whatever the
task (`frozen` is `{}` for pretraining). The training loop uses it, and so can ahead-of-time compilation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bmx.config_io import ConfigError
from bmx.checkpoints import read_model_config
from bmx.model.config import MistralConfig, preset
from bmx.model.kernels import default_attention
from bmx.model.mistral import Mistral
from bmx.train.config import RunConfig
from bmx.train.mesh import batch_sharding, make_mesh, replicated, rules_for
from bmx.train.optimizer import learning_rate_schedule, make_optimizer
from bmx.train.step import make_eval_step, make_loss_fn, make_train_step
from bmx.train.trainable import Trainable, make_trainable, shardings_of, with_shardings

AUTO_CHUNK = 8192
AUTO_CHUNK_ABOVE_BYTES = 2**30  # chunk the loss when one device's float32 logits would exceed this


@dataclass
class TrainSetup:
    mesh: jax.sharding.Mesh
    rules: dict
    model_config: MistralConfig
    seq_len: int
    build_model: Callable[[int], Mistral]
    trainable: Trainable  # what the optimizer updates, what stays frozen, how it starts and is exported
    opt_sharding: Any
    abstract_opt_state: Any  # ShapeDtypeStructs with shardings
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    data_sharding: jax.sharding.NamedSharding
    train_step: Callable  # (params, opt_state, batch, frozen) -> (params, opt_state, metrics)
    eval_step: Callable  # (params, batch, frozen) -> (loss sum, token count)


def resolve_model_config(config: RunConfig) -> MistralConfig:
    if config.init.from_ is not None:
        if config.model.preset is not None or config.model.overrides:
            raise ValueError("model.preset/model.overrides and init.from both set: the architecture of "
                             f"{config.init.from_} is used when continuing from a checkpoint; drop model.preset")
        return read_model_config(config.init.from_)
    if config.model.preset is None:
        raise ValueError("set model.preset (e.g. tiny, mistral-7b-v0.1) or init.from (a bmx checkpoint)")
    return preset(config.model.preset, **config.model.overrides)


def resolve_seq_len(config: RunConfig) -> int:
    if config.data.path is not None:
        from bmx.data.manifest import read_manifest

        seq_len = read_manifest(config.data.path)["seq_len"]
        if config.train.seq_len is not None and config.train.seq_len != seq_len:
            raise ValueError(f"train.seq_len {config.train.seq_len} differs from the data's seq_len {seq_len} "
                             f"({config.data.path}); drop train.seq_len or prepare the data again")
        return seq_len
    if config.train.seq_len is None:
        raise ValueError("data.path is not set: point it at a directory made by `python -m bmx.data prepare`")
    return config.train.seq_len


def compute_dtype(config: RunConfig):
    if config.model.dtype is not None:
        return jnp.dtype(config.model.dtype)
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)


def loss_vocab_chunk(config: RunConfig, model_config: MistralConfig, seq_len: int, batch_devices: int) -> int:
    if config.train.loss_vocab_chunk is not None:
        return config.train.loss_vocab_chunk
    microbatch = config.train.global_batch_size // config.train.grad_accumulation
    logits_bytes = microbatch * seq_len * model_config.vocab_size * 4 / max(batch_devices, 1)
    return AUTO_CHUNK if logits_bytes > AUTO_CHUNK_ABOVE_BYTES else 0


def _check_batch_divides(config: RunConfig, data_sharding: jax.sharding.NamedSharding) -> None:
    """Each microbatch is split over the data-parallel devices: refuse a batch they cannot share."""
    axes = data_sharding.spec[0] if len(data_sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    devices = math.prod(data_sharding.mesh.shape[axis] for axis in axes)
    microbatch = config.train.global_batch_size // config.train.grad_accumulation
    if microbatch % devices:
        per_step = "" if config.train.grad_accumulation == 1 else (
            f" / train.grad_accumulation {config.train.grad_accumulation} = {microbatch} per microbatch")
        raise ConfigError(f"train.global_batch_size: {config.train.global_batch_size}{per_step} is not divisible "
                          f"by the {devices} data-parallel devices of mesh {dict(data_sharding.mesh.shape)}; use a "
                          f"multiple of {devices * config.train.grad_accumulation}")


def build(config: RunConfig, devices=None) -> TrainSetup:
    if config.train.global_batch_size % config.train.grad_accumulation:
        raise ValueError(f"train.global_batch_size {config.train.global_batch_size} is not a multiple of "
                         f"train.grad_accumulation {config.train.grad_accumulation}")
    mesh, rules = make_mesh(config.mesh, devices), rules_for(config.mesh)
    _check_batch_divides(config, batch_sharding(mesh, rules))  # before the shapes and compilation
    model_config, seq_len = resolve_model_config(config), resolve_seq_len(config)
    param_dtype, dtype = jnp.dtype(config.model.param_dtype), compute_dtype(config)
    attention = config.model.attention or default_attention(mesh.devices.flat[0].platform, dtype)

    def build_model(seed: int) -> Mistral:
        return Mistral(model_config, dtype=dtype, param_dtype=param_dtype, remat=config.model.remat,
                       attention=attention, rngs=nnx.Rngs(seed))

    trainable = make_trainable(config, build_model, mesh, rules)
    param_sharding, frozen_sharding = shardings_of(trainable.abstract_params), shardings_of(trainable.abstract_frozen)
    schedule = learning_rate_schedule(config.optimizer, config.schedule, config.train.steps)
    optimizer = make_optimizer(config.optimizer, schedule)
    unsharded_opt_state = jax.eval_shape(optimizer.init, trainable.abstract_params)
    # Moments are sharded like their parameters; step counters are replicated.
    opt_sharding = optax.tree_utils.tree_map_params(optimizer, lambda _, sharding: sharding, unsharded_opt_state,
                                                    param_sharding, transform_non_params=lambda _: replicated(mesh))
    data_sharding = batch_sharding(mesh, rules)
    vocab_chunk = loss_vocab_chunk(config, model_config, seq_len, batch_devices=mesh.shape["data"] * mesh.shape["fsdp"])
    loss_sums = make_loss_fn(trainable.graphdef, vocab_chunk=vocab_chunk, z_loss_weight=config.train.z_loss,
                             document_masking=config.data.document_masking)
    train_step = jax.jit(make_train_step(loss_sums, optimizer, config.train.grad_accumulation, mesh, rules,
                                         dropout_seed=trainable.dropout_seed),
                         in_shardings=(param_sharding, opt_sharding, data_sharding, frozen_sharding),
                         out_shardings=(param_sharding, opt_sharding, replicated(mesh)), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(loss_sums, mesh, rules),
                        in_shardings=(param_sharding, data_sharding, frozen_sharding), out_shardings=replicated(mesh))
    return TrainSetup(mesh=mesh, rules=rules, model_config=model_config, seq_len=seq_len, build_model=build_model,
                      trainable=trainable, opt_sharding=opt_sharding,
                      abstract_opt_state=with_shardings(unsharded_opt_state, opt_sharding), optimizer=optimizer,
                      schedule=schedule, data_sharding=data_sharding, train_step=train_step, eval_step=eval_step)
