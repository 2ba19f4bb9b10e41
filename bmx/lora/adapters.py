"""Adding LoRA adapters to a bmx Mistral, training only them, and folding them back into the base.

The projections live in the stacked decoder layers (`model.model.layers`, leading `layers` axis),
so one `LoRALinear` per projection name adapts every layer at once, with A and B stacked the same
way; the model's layer scan then hands each layer its own slice, and decoding (`bmx.generate`) runs
the adapted projections unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmx.lora.config import ALL_PROJECTIONS, ATTENTION_PROJECTIONS, LoRAConfig
from bmx.lora.layers import DROPOUT_KEY_WORDS, LoRALinear, lora_a_shape
from bmx.model.layers import Linear
from bmx.model.mistral import Mistral

STACKED_AXES = ("layers",)


def _parent_name(projection: str) -> str:
    return "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"


def _parent_module(model: Mistral, projection: str):
    return getattr(model.model.layers, _parent_name(projection))


def lora_modules(model: Mistral) -> Iterator[tuple[str, LoRALinear]]:
    """`(projection name, LoRALinear)` for every adapted projection of the model."""
    for projection in ALL_PROJECTIONS:
        module = getattr(_parent_module(model, projection), projection)
        if isinstance(module, LoRALinear):
            yield projection, module


def apply_lora(model: Mistral, config: LoRAConfig, *, seed: int = 0) -> Mistral:
    """Wrap each of `config.targets` in every layer with a LoRA adapter (B = 0: logits unchanged). In place."""
    if any(True for _ in lora_modules(model)):
        raise ValueError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    bases = {projection: getattr(_parent_module(model, projection), projection) for projection in config.targets}
    shapes = {projection: lora_a_shape(base, config.rank, len(STACKED_AXES)) for projection, base in bases.items()}
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    noise = jax.random.uniform(jax.random.key(seed), (sum(sizes),), jnp.float32, -1.0, 1.0)
    for (projection, base), piece in zip(bases.items(), jnp.split(noise, np.cumsum(sizes)[:-1])):
        adapted = LoRALinear(base, rank=config.rank, scale=config.scale, dropout=config.dropout,
                             leading_axes=STACKED_AXES, unit_noise=piece.reshape(shapes[projection]))
        setattr(_parent_module(model, projection), projection, adapted)
    return model


def lora_params(model: Mistral) -> nnx.State:
    """Only the adapters' A and B: what the optimizer updates (everything else stays frozen)."""
    return nnx.state(model, nnx.LoRAParam)


def split_lora(model: Mistral) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, lora_state, frozen_state)`; `nnx.merge(graphdef, lora_state, frozen_state)` rebuilds the model."""
    return nnx.split(model, nnx.LoRAParam, ...)


def with_lora_dropout(state: dict, key: jax.Array) -> dict:
    """`state` (an adapted model's variables as a pure dict, or its frozen part) with every adapter's
    dropout key drawn from `key`: the model merged from it drops its adapters' inputs. Pure: `state`
    and the model it came from are left as they are (dropout off)."""
    layers = state["model"]["layers"]
    adapted = [(_parent_name(projection), projection) for projection in ALL_PROJECTIONS
               if "dropout_key" in layers.get(_parent_name(projection), {}).get(projection, {})]
    if not adapted:
        raise ValueError("the state has no LoRA adapters (apply_lora or load_peft_adapter first)")
    parent, projection = adapted[0]
    leading = layers[parent][projection]["dropout_key"].shape[:-1]  # (layers,) in the stack
    # One draw for every projection and layer: [projections, *leading, words].
    words = jax.random.bits(key, (len(adapted), *leading, DROPOUT_KEY_WORDS), jnp.uint32)
    layers = dict(layers)
    for (parent, projection), projection_words in zip(adapted, words):
        layers[parent] = {**layers[parent], projection: {**layers[parent][projection], "dropout_key": projection_words}}
    return {**state, "model": {**state["model"], "layers": layers}}


def merge_lora(model: Mistral) -> Mistral:
    """Fold every adapter into its base kernel (W + (A·B)·scale, in float32) and drop the adapters. In place."""
    for projection, module in list(lora_modules(model)):
        if not isinstance(module.base, Linear):
            raise ValueError(f"{projection}: its base is quantized (QLoRA); merge the adapters into the float base "
                             "checkpoint instead (python -m bmx.convert merge-lora BASE ADAPTER OUT)")
        kernel = module.base.kernel
        kernel.value = (kernel[...].astype(jnp.float32) + module.delta_kernel()).astype(kernel.dtype)
        setattr(_parent_module(model, projection), projection, module.base)
    return model
