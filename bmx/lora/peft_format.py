"""LoRA adapters in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names each adapted `nn.Linear` of transformers' `MistralForCausalLM`
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...), with lora_A `[r, in]` and
lora_B `[out, r]` over the flattened HF weight `[out, in]`. bmx keeps heads as their own dimensions
(`A [*in_shape, r]`, `B [r, *out_shape]`, stacked over layers), and the row-major flattening of those
dimensions is exactly the HF layout (see `bmx.convert.mistral_table`), so conversion is a reshape and
a transpose per layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bmx.lora.adapters import apply_lora, lora_modules
from bmx.lora.config import ALL_PROJECTIONS, ATTENTION_PROJECTIONS, LoRAConfig
from bmx.model.mistral import Mistral

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_ADAPTER_FILES = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."


def module_name(projection: str, layer: int) -> str:
    """The HF module a projection of a layer is: `model.layers.3.self_attn.q_proj`."""
    block = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{block}.{projection}"


def tensor_names(projection: str, layer: int) -> tuple[str, str]:
    """The lora_A and lora_B tensor names PEFT saves for this projection of this layer."""
    module = PEFT_PREFIX + module_name(projection, layer)
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


# ---- writing ------------------------------------------------------------------------------------

def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets), "use_rslora": config.use_rslora, "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_peft_adapter(model: Mistral, config: LoRAConfig, directory: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None, dtype=None) -> Path:
    """Write the model's adapters as a PEFT adapter directory (`PeftModel.from_pretrained` loads it)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    modules = dict(lora_modules(model))
    if sorted(modules) != sorted(config.targets):
        raise ValueError(f"the model's adapters {sorted(modules)} differ from the config's targets "
                         f"{sorted(config.targets)}")
    tensors = {}
    for projection, module in modules.items():
        a, b = np.asarray(module.lora_a[...]), np.asarray(module.lora_b[...])
        for layer in range(a.shape[0]):
            name_a, name_b = tensor_names(projection, layer)
            tensors[name_a] = np.ascontiguousarray(a[layer].reshape(-1, config.rank).T)  # [r, in]
            tensors[name_b] = np.ascontiguousarray(b[layer].reshape(config.rank, -1).T)  # [out, r]
    if dtype is not None:
        tensors = {name: value.astype(dtype) for name, value in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config_json = peft_config_dict(config, base_model_name_or_path)
    (directory / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    return directory


# ---- reading ------------------------------------------------------------------------------------

# PEFT settings that change what an adapter computes; bmx refuses any value other than these.
_REQUIRED_VALUES = {"peft_type": ("LORA",), "bias": ("none",), "use_dora": (False, None),
                    "fan_in_fan_out": (False, None),
                    "layers_to_transform": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                    "layer_replication": (None,), "lora_bias": (False, None), "target_parameters": (None, []),
                    "trainable_token_indices": (None,), "use_qalora": (False, None)}


# `modules_to_save` bmx can apply: whole replacement weights, as mergekit-extract-lora writes them.
FULL_RANK_MODULES = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
                     "input_layernorm": "model.layers.{layer}.input_layernorm.weight",
                     "post_attention_layernorm": "model.layers.{layer}.post_attention_layernorm.weight"}


def _full_rank_names(directory: Path, modules_to_save, num_layers: int) -> list[str]:
    """HF names of the whole weights an adapter's `modules_to_save` replaces."""
    unknown = [m for m in modules_to_save or [] if m not in FULL_RANK_MODULES]
    if unknown:
        raise ValueError(f"{directory / CONFIG_FILE}: modules_to_save {unknown} is not supported (expected some of {sorted(FULL_RANK_MODULES)})")
    return [FULL_RANK_MODULES[m].format(layer=layer) for m in modules_to_save or [] for layer in range(num_layers)
            if "{layer}" in FULL_RANK_MODULES[m] or layer == 0]


@dataclass
class PeftAdapter:
    config: LoRAConfig
    tensors: dict[str, np.ndarray]  # PEFT tensor name -> float32 array (lora_A [r, in], lora_B [out, r])
    directory: Path
    full_rank: dict[str, np.ndarray] | None = None  # HF name -> replacement weight (`modules_to_save`)

    def pair(self, projection: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        name_a, name_b = tensor_names(projection, layer)
        return self.tensors[name_a], self.tensors[name_b]


def read_lora_config(directory: Path) -> LoRAConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a PEFT adapter directory")
    settings = json.loads(path.read_text())
    for key, allowed in _REQUIRED_VALUES.items():
        if key in settings and settings[key] not in allowed:
            raise ValueError(f"{path}: {key}={settings[key]!r} is not supported (expected one of {list(allowed)})")
    targets = settings.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer but the LM head, i.e. every projection
        targets = list(ALL_PROJECTIONS)
    if not isinstance(targets, list):
        raise ValueError(f"{path}: target_modules={targets!r}: expected a list of projection names from "
                         f"{list(ALL_PROJECTIONS)} (regular expressions are not supported)")
    return LoRAConfig(rank=settings["r"], alpha=settings["lora_alpha"], dropout=settings.get("lora_dropout", 0.0),
                      targets=tuple(t for t in ALL_PROJECTIONS if t in targets) + tuple(
                          t for t in targets if t not in ALL_PROJECTIONS),
                      use_rslora=bool(settings.get("use_rslora", False)))


def read_peft_adapter(directory: str | os.PathLike, num_layers: int) -> PeftAdapter:
    """A PEFT adapter for a `num_layers`-layer Mistral, every tensor checked by name and rank."""
    from safetensors import safe_open

    directory = Path(directory)
    config = read_lora_config(directory)
    full_rank_names = _full_rank_names(directory, json.loads((directory / CONFIG_FILE).read_text()).get("modules_to_save"), num_layers)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [name for name in PICKLED_ADAPTER_FILES if (directory / name).exists()]
        hint = f" (found {pickled}: pickled weights are refused, re-save with safe_serialization)" if pickled else ""
        raise FileNotFoundError(f"{weights} not found{hint}")
    with safe_open(str(weights), framework="flax") as handle:
        # PEFT omits the adapter name when saving; older files may keep ".default".
        stored = {name.replace(".default.", "."): name for name in handle.keys()}
        expected = [name for projection in config.targets for layer in range(num_layers)
                    for name in tensor_names(projection, layer)]
        missing = [name for name in expected if name not in stored]
        if missing:
            raise ValueError(f"{weights}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
        missing = [PEFT_PREFIX + name for name in full_rank_names if PEFT_PREFIX + name not in stored and name != "lm_head.weight"]
        if missing:
            raise ValueError(f"{weights}: modules_to_save tensor {missing[0]!r} is missing")
        full_rank = {name: np.asarray(handle.get_tensor(stored[PEFT_PREFIX + name])) for name in full_rank_names if PEFT_PREFIX + name in stored}
        unexpected = sorted(set(stored) - set(expected) - {PEFT_PREFIX + name for name in full_rank})
        if unexpected:
            raise ValueError(f"{weights}: unexpected tensor {unexpected[0]!r} for a {num_layers}-layer Mistral "
                             f"with targets {list(config.targets)}")
        tensors = {name: np.asarray(handle.get_tensor(stored[name]), np.float32) for name in expected}
    for name, value in tensors.items():
        rank_axis = 0 if ".lora_A." in name else 1
        if value.ndim != 2 or value.shape[rank_axis] != config.rank:
            raise ValueError(f"{weights}: tensor {name!r} has shape {value.shape}, expected rank {config.rank} "
                             f"on axis {rank_axis}")
    return PeftAdapter(config, tensors, directory, full_rank)


def load_peft_adapter(model: Mistral, directory: str | os.PathLike) -> Mistral:
    """Add the PEFT adapter in `directory` to `model` (in place): A and B as PEFT trained them."""
    adapter = read_peft_adapter(directory, model.config.num_hidden_layers)
    apply_lora(model, adapter.config)
    for projection, module in lora_modules(model):
        a_shape, b_shape = module.lora_a.shape[1:], module.lora_b.shape[1:]
        a_layers, b_layers = [], []
        for layer in range(model.config.num_hidden_layers):
            a, b = adapter.pair(projection, layer)
            if a.size != np.prod(a_shape) or b.size != np.prod(b_shape):
                raise ValueError(f"{directory}: {module_name(projection, layer)} lora_A {a.shape} / lora_B {b.shape} "
                                 f"do not fit the model's {projection} (A {a_shape}, B {b_shape} in bmx layout)")
            a_layers.append(a.T.reshape(a_shape))
            b_layers.append(b.T.reshape(b_shape))
        module.lora_a.value = jnp.asarray(np.stack(a_layers), module.lora_a.dtype)
        module.lora_b.value = jnp.asarray(np.stack(b_layers), module.lora_b.dtype)
    _replace_full_rank(model, adapter)
    return model


def _replace_full_rank(model: Mistral, adapter: PeftAdapter) -> None:
    """Put the adapter's whole `modules_to_save` weights in place of the model's (layers stacked on axis 0)."""
    from bmx.convert.mistral_table import mistral_table

    for row in mistral_table(model.config):
        names = [n for n in row.hf_names(model.config.num_hidden_layers) if n in (adapter.full_rank or {})]
        if not names:
            continue
        parameter = model
        for key in row.bmx_path:
            parameter = getattr(parameter, key)
        values = [row.to_bmx(adapter.full_rank[name]) for name in names]
        value = np.stack(values) if row.per_layer else values[0]
        if value.shape != parameter.value.shape:
            raise ValueError(f"{adapter.directory}: {names[0]} has shape {adapter.full_rank[names[0]].shape}, which does not fit the model")
        parameter.value = jnp.asarray(value, parameter.value.dtype)
