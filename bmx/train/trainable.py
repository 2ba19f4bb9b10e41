"""What a run trains, and what it holds frozen beside it: one `Trainable` per task.

`pretrain` trains every parameter of the model. `sft` trains LoRA adapters (only A and B) on a base
model read from `init.from` and held frozen, quantized with `lora.base_quantization` (QLoRA). The
trainer treats both alike: the model is `nnx.merge(graphdef, params, frozen)` with `frozen = {}` when
everything trains, every step takes `frozen` as an argument, checkpoints hold `params` (and the
optimizer state) only, and `export` gives the float parameters `RUN_DIR/model` stores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx

from bmx.lora.adapters import apply_lora, merge_lora
from bmx.model.mistral import Mistral
from bmx.train.config import RunConfig
from bmx.train.mesh import param_shardings


@dataclass(frozen=True)
class Trainable:
    graphdef: nnx.GraphDef  # nnx.merge(graphdef, params, frozen) is the model
    abstract_params: Any  # what the optimizer updates: ShapeDtypeStructs with shardings
    abstract_frozen: Any  # the rest of the model, the steps' last argument ({} when everything trains)
    abstract_base: Any  # what `init.from` is read as
    start: Callable[[Any], tuple[Any, Any]]  # params read from init.from, or None -> (params, frozen), sharded
    export: Callable[[Any, Any, Callable[[], Any]], Any]  # (params, frozen, read_base) -> float model params
    dropout_seed: int | None = None  # set when training forwards drop inputs (bmx.lora.with_lora_dropout)


def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _abstract(state: nnx.State, mesh, rules):
    """A state's arrays as ShapeDtypeStructs (a pure dict) sharded by their logical axes."""
    return with_shardings(state.to_pure_dict(), nnx.State(param_shardings(state, mesh, rules)).to_pure_dict())


def make_trainable(config: RunConfig, build_model: Callable[[int], Mistral], mesh, rules) -> Trainable:
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: build_model(config.init.seed)))
    abstract_model = _abstract(abstract_state, mesh, rules)
    if config.task == "sft":
        return _adapters(config, build_model, graphdef, abstract_model, mesh, rules)
    return _whole_model(config, build_model, graphdef, abstract_model)


def _whole_model(config: RunConfig, build_model, graphdef, abstract_model) -> Trainable:
    """`task: pretrain`: every parameter trains, from `init.from` or initialised with `init.seed`."""
    initialise = jax.jit(lambda: nnx.state(build_model(config.init.seed)).to_pure_dict(),
                         out_shardings=shardings_of(abstract_model))

    def start(base_params):
        return (initialise() if base_params is None else base_params), {}

    return Trainable(graphdef=graphdef, abstract_params=abstract_model, abstract_frozen={},
                     abstract_base=abstract_model, start=start, export=lambda params, frozen, read_base: params)


def _adapters(config: RunConfig, build_model, plain_graphdef, abstract_base, mesh, rules) -> Trainable:
    """`task: sft`: only the adapters' A and B train; the base (quantized for QLoRA) and the dropout keys
    are frozen."""
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
    abstract_lora, abstract_frozen = _abstract(abstract_lora, mesh, rules), _abstract(abstract_frozen, mesh, rules)

    def start(base_params):
        """Base params (as `init.from` stores them) -> (initial adapters, frozen params), sharded."""
        if base_params is None:
            raise ValueError("task: sft starts from the base model read from init.from; got none")
        quantize = functools.partial(quantize_model, progress=jax.process_index() == 0)
        _, lora, frozen = nnx.split(adapted(nnx.merge(plain_graphdef, base_params), quantize), nnx.LoRAParam, ...)
        return (jax.device_put(lora.to_pure_dict(), shardings_of(abstract_lora)),
                jax.device_put(frozen.to_pure_dict(), shardings_of(abstract_frozen)))

    def export(adapters, frozen, read_base: Callable[[], Any]):
        """The float model's params with the adapters folded in; under QLoRA into the float base
        (`read_base()`), never into its quantized copy (that would add full-rank rounding error)."""
        if scheme is None:
            model = nnx.merge(graphdef, adapters, frozen)
        else:
            model = apply_lora(nnx.merge(plain_graphdef, read_base()), config.lora, seed=seed)
            adapter_state = nnx.state(model, nnx.LoRAParam)
            adapter_state.replace_by_pure_dict(adapters)
            nnx.update(model, adapter_state)
        return nnx.state(merge_lora(model)).to_pure_dict()

    return Trainable(graphdef=graphdef, abstract_params=abstract_lora, abstract_frozen=abstract_frozen,
                     abstract_base=abstract_base, start=start, export=export,
                     dropout_seed=seed if config.lora.dropout > 0 else None)
