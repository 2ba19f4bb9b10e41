"""`python -m bmx.merge extract-lora BASE FINETUNED OUT --rank R`: a PEFT LoRA adapter from a fine-tune.

mergekit 0.1.5's `mergekit-extract-lora`, for Mistral: every projection's difference
W_finetuned − W_base is factored by a truncated SVD, U_r S_r V_rᵀ, into lora_A = S_r^½ V_rᵀ [r, in]
and lora_B = U_r S_r^½ [out, r] (`--no-distribute-scale`: lora_A = S_r V_rᵀ, lora_B = U_r), with
lora_alpha = r so PEFT's scale is 1. Modules that are not linear layers or that index the
vocabulary (embeddings, LM head, the RMSNorms) are saved at full rank from the fine-tune, in
`modules_to_save`, as mergekit does. Applying the adapter to the base reproduces the fine-tune up to
the rank truncation.

Each projection is read, factored and dropped in turn; the factors (r · (in + out) numbers per
projection) are kept until the single adapter file is written with the full-rank modules streamed
into it, so memory holds the adapter's factors plus one tensor of the model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bmx.convert.safetensors_io import SINGLE_FILE, ShardedSafetensorsWriter, TensorSpec, atomic_output_dir
from bmx.merge.models import IncompatibleModelsError, InputModel, check_compatible, open_model

LOG = logging.getLogger("bmx.merge")
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# mergekit visits transformers' modules in definition order: a layer's attention, MLP, then norms.
LORA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class ExtractReport:
    out_dir: Path
    ranks: dict[str, int]  # module -> rank actually kept
    modules_to_save: list[str]


@jax.jit
def _svd(delta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD in float32, each component's sign fixed (largest |u| entry positive) so any device agrees."""
    u, s, vh = jnp.linalg.svd(delta.astype(jnp.float32), full_matrices=False)
    pivot = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None], axis=0)[0]
    sign = jnp.where(pivot < 0, -1.0, 1.0).astype(jnp.float32)
    return u * sign[None], s, vh * sign[:, None]


def lora_factors(delta: jax.Array, max_rank: int, distribute_scale: bool, sv_epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A [r, in], lora_B [out, r]) in the delta's dtype, r = min(max_rank, #singular values > sv_epsilon)."""
    u, s, vh = _svd(delta)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(int(jnp.sum(s > sv_epsilon)), rank)
    if distribute_scale:
        root = jnp.sqrt(s[:rank])
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None]
    else:
        a, b = s[:rank, None] * vh[:rank], u[:, :rank]
    return np.asarray(a.astype(delta.dtype)), np.asarray(b.astype(delta.dtype))


def _full_rank_names(model: InputModel) -> list[tuple[str, str]]:
    """(module key for modules_to_save, tensor name) of what is saved at full rank, in mergekit's order."""
    names = [("embed_tokens", "model.embed_tokens.weight")]
    for layer in range(model.num_layers):
        names += [(norm, f"model.layers.{layer}.{norm}.weight") for norm in LAYER_NORMS]
    names.append(("norm", "model.norm.weight"))
    if "lm_head.weight" in model.weights:
        names.append(("lm_head", "lm_head.weight"))
    return names


def adapter_config(base_reference: str, ranks: dict[str, int], modules_to_save: list[str]) -> dict:
    """mergekit's `make_config_dict`: r and lora_alpha are the largest rank; other ranks go in rank_pattern."""
    max_rank = max(ranks.values())
    different = {module: rank for module, rank in ranks.items() if rank != max_rank}
    return {
        "base_model_name_or_path": base_reference, "peft_type": "LORA", "use_rslora": False,
        "target_modules": sorted({module.split(".")[-1] for module in ranks}), "modules_to_save": modules_to_save,
        "task_type": "CAUSAL_LM", "r": max_rank, "lora_alpha": max_rank, "rank_pattern": different,
        "alpha_pattern": different, "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
    }


def _read_delta(base: InputModel, finetuned: InputModel, name: str, device: jax.Device) -> jax.Array:
    spec_base, spec_tuned = base.weights.spec(name), finetuned.weights.spec(name)
    if spec_base.shape != spec_tuned.shape:
        raise IncompatibleModelsError(f"tensor {name!r}: shape {spec_base.shape} in `{base.reference}` but {spec_tuned.shape} in `{finetuned.reference}`")
    dtype = jnp.promote_types(spec_base.dtype, spec_tuned.dtype)
    tuned = jax.device_put(np.asarray(finetuned.weights.read(name)), device).astype(dtype)
    return tuned - jax.device_put(np.asarray(base.weights.read(name)), device).astype(dtype)


def extract_lora(base: str | os.PathLike, finetuned: str | os.PathLike, out_dir: str | os.PathLike, rank: int, *,
                 distribute_scale: bool = True, sv_epsilon: float = 0.0, device: str = "cpu") -> ExtractReport:
    """Write a PEFT adapter to `out_dir` that turns `base` into (approximately) `finetuned`."""
    from bmx.merge.run import merge_device

    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    jax_device = merge_device(device)
    base_model, tuned_model = open_model(str(base), None), open_model(str(finetuned), None)
    check_compatible([base_model, tuned_model], same_vocabulary=False)  # embeddings are saved whole
    if base_model.num_layers != tuned_model.num_layers:
        raise IncompatibleModelsError(f"`{base}` has {base_model.num_layers} layers, `{finetuned}` {tuned_model.num_layers}")

    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with jax.default_device(jax_device):
        for layer in range(tuned_model.num_layers):
            for projection in LORA_PROJECTIONS:
                module = f"model.layers.{layer}.{projection}"
                delta = _read_delta(base_model, tuned_model, f"{module}.weight", jax_device)
                factors[module] = lora_factors(delta, rank, distribute_scale, sv_epsilon)
                del delta
    full_rank = _full_rank_names(tuned_model)
    specs = []
    for module, (a, b) in factors.items():
        specs += [TensorSpec(f"{PEFT_PREFIX}{module}.lora_A.weight", a.shape, a.dtype), TensorSpec(f"{PEFT_PREFIX}{module}.lora_B.weight", b.shape, b.dtype)]
    specs += [TensorSpec(PEFT_PREFIX + name, tuned_model.weights.spec(name).shape, tuned_model.weights.spec(name).dtype) for _, name in full_rank]
    modules_to_save = list(dict.fromkeys(key for key, _ in full_rank))
    ranks = {module: a.shape[0] for module, (a, _) in factors.items()}

    with atomic_output_dir(out_dir) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, max_shard_bytes=2**62)  # one file, as mergekit writes
        for module, (a, b) in factors.items():
            writer.write(f"{PEFT_PREFIX}{module}.lora_A.weight", a)
            writer.write(f"{PEFT_PREFIX}{module}.lora_B.weight", b)
        for _, name in full_rank:
            writer.write(PEFT_PREFIX + name, np.asarray(tuned_model.weights.read(name)))
        writer.finish()
        (staging / SINGLE_FILE).rename(staging / ADAPTER_FILE)
        config = adapter_config(str(base), ranks, modules_to_save)
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=4) + "\n")
    LOG.info("extracted a rank-%d LoRA (%d projections, %d full-rank tensors) into %s", max(ranks.values()), len(ranks), len(full_rank), out_dir)
    return ExtractReport(Path(out_dir), ranks, modules_to_save)
