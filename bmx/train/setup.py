"""Everything a run needs before its first step, from abstract shapes only (nothing allocated).

`build(config)` gives the mesh, the shardings, the abstract parameters and optimizer state, and the
jitted train and eval steps. The training loop uses it, and so can ahead-of-time compilation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bmx.config_io import ConfigError
from bmx.lora.adapters import apply_lora, merge_lora
from bmx.checkpoints import read_model_config
from bmx.model.config import MistralConfig, preset
from bmx.model.kernels import default_attention
from bmx.model.mistral import Mistral
from bmx.train.config import RunConfig
from bmx.train.mesh import batch_sharding, make_mesh, param_shardings, replicated, rules_for
from bmx.train.optimizer import learning_rate_schedule, make_optimizer
from bmx.train.step import make_eval_step, make_loss_fn, make_train_step

AUTO_CHUNK = 8192
AUTO_CHUNK_ABOVE_BYTES = 2**30  # chunk the loss when one device's float32 logits would exceed this


@dataclass
class TrainSetup:
    mesh: jax.sharding.Mesh
    rules: dict
    model_config: MistralConfig
    seq_len: int
    build_model: Callable[[int], Mistral]
    graphdef: nnx.GraphDef  # merged with the params (and, for sft, the frozen params) into the model
    param_sharding: Any
    opt_sharding: Any
    abstract_params: Any  # ShapeDtypeStructs with shardings
    abstract_opt_state: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    data_sharding: jax.sharding.NamedSharding
    train_step: Callable  # (params, opt_state, batch[, frozen]) -> (params, opt_state, metrics)
    eval_step: Callable  # (params, batch[, frozen]) -> (loss sum, token count); frozen only for sft
    abstract_base: Any = None  # sft: the base model's parameters, as `init.from` stores them
    attach_adapters: Callable | None = None  # sft: base params -> (LoRA params, frozen params), sharded
    merge_adapters: Callable | None = None  # sft: (LoRA params, frozen, read_base) -> merged float params


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


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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

    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: build_model(config.init.seed)))
    sft = _sft_parts(config, build_model, graphdef, mesh, rules) if config.task == "sft" else None
    if sft is not None:
        base_sharding = nnx.State(param_shardings(abstract_state, mesh, rules)).to_pure_dict()
        abstract_base = _with_shardings(abstract_state.to_pure_dict(), base_sharding)
        graphdef, abstract_state, frozen, attach_adapters, merge_adapters = sft
        frozen_sharding = (frozen,)  # the steps take the frozen params as a 4th (eval: 3rd) argument
    else:
        abstract_base, frozen_sharding, attach_adapters, merge_adapters = None, (), None, None
    param_sharding = nnx.State(param_shardings(abstract_state, mesh, rules)).to_pure_dict()
    abstract_params = _with_shardings(abstract_state.to_pure_dict(), param_sharding)
    schedule = learning_rate_schedule(config.optimizer, config.schedule, config.train.steps)
    optimizer = make_optimizer(config.optimizer, schedule)
    unsharded_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    # Moments are sharded like their parameters; step counters are replicated.
    opt_sharding = optax.tree_utils.tree_map_params(optimizer, lambda _, sharding: sharding, unsharded_opt_state,
                                                    param_sharding, transform_non_params=lambda _: replicated(mesh))
    data_sharding = batch_sharding(mesh, rules)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    loss_sums = make_loss_fn(graphdef, vocab_chunk=loss_vocab_chunk(config, model_config, seq_len, batch_devices),
                             z_loss_weight=config.train.z_loss, document_masking=config.data.document_masking)
    dropout_seed = config.init.seed if sft is not None and config.lora.dropout > 0 else None
    train_step = jax.jit(make_train_step(loss_sums, optimizer, config.train.grad_accumulation, mesh, rules,
                                         dropout_seed=dropout_seed),
                         in_shardings=(param_sharding, opt_sharding, data_sharding, *frozen_sharding),
                         out_shardings=(param_sharding, opt_sharding, replicated(mesh)), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(loss_sums, mesh, rules),
                        in_shardings=(param_sharding, data_sharding, *frozen_sharding), out_shardings=replicated(mesh))
    return TrainSetup(mesh=mesh, rules=rules, model_config=model_config, seq_len=seq_len, build_model=build_model,
                      graphdef=graphdef, param_sharding=param_sharding, opt_sharding=opt_sharding,
                      abstract_params=abstract_params, abstract_opt_state=_with_shardings(unsharded_opt_state, opt_sharding), optimizer=optimizer,
                      schedule=schedule, data_sharding=data_sharding, train_step=train_step, eval_step=eval_step,
                      abstract_base=abstract_base, attach_adapters=attach_adapters, merge_adapters=merge_adapters)


def _sft_parts(config: RunConfig, build_model: Callable[[int], Mistral], plain_graphdef, mesh, rules):
    """For `task: sft`: (graphdef of the adapted model, abstract LoRA state, shardings of the frozen
    params, attach_adapters, merge_adapters). Only A and B are trained; the base (quantized with
    `lora.base_quantization`: QLoRA) and the dropout keys are frozen."""
    if config.init.from_ is None:
        raise ValueError("task: sft trains LoRA adapters on a base model: set init.from to a bmx checkpoint")
    from bmx.quant.model import quantize_abstractly, quantize_model
    from bmx.quant.schemes import make_scheme

    seed, method = config.init.seed, config.lora.base_quantization
    # QLoRA quantizes NF4/FP4 with double quantization, as the QLoRA paper does.
    scheme = None if method == "none" else make_scheme(method, double_quant=method in ("nf4", "fp4"))

    def adapted(model: Mistral, quantize: Callable) -> Mistral:
        return apply_lora(model if scheme is None else quantize(model, scheme), config.lora, seed=seed)

    abstract = nnx.eval_shape(lambda: adapted(build_model(seed), quantize_abstractly))
    graphdef, abstract_lora, abstract_frozen = nnx.split(abstract, nnx.LoRAParam, ...)
    frozen_sharding = nnx.State(param_shardings(abstract_frozen, mesh, rules)).to_pure_dict()
    lora_sharding = nnx.State(param_shardings(abstract_lora, mesh, rules)).to_pure_dict()

    def attach_adapters(base_params):
        """Base params (as `init.from` stores them) -> (initial LoRA params, frozen params), sharded."""
        quantize = functools.partial(quantize_model, progress=jax.process_index() == 0)
        model = adapted(nnx.merge(plain_graphdef, base_params), quantize)
        _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
        return (jax.device_put(lora.to_pure_dict(), lora_sharding),
                jax.device_put(frozen.to_pure_dict(), frozen_sharding))

    def merge_adapters(adapters, frozen, read_base: Callable[[], Any]):
        """The float model's params with the adapters folded in; under QLoRA into the float base
        (`read_base()`), never into its quantized copy."""
        if scheme is None:
            model = nnx.merge(graphdef, adapters, frozen)
        else:
            model = apply_lora(nnx.merge(plain_graphdef, read_base()), config.lora, seed=seed)
            adapter_state = nnx.state(model, nnx.LoRAParam)
            adapter_state.replace_by_pure_dict(adapters)
            nnx.update(model, adapter_state)
        return nnx.state(merge_lora(model)).to_pure_dict()

    return graphdef, abstract_lora, frozen_sharding, attach_adapters, merge_adapters
