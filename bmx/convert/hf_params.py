"""A Hugging Face Mistral directory read straight into bmx's parameter layout, in memory.

The same table, validation and layout changes as `hf_to_bmx`, without writing a checkpoint: each HF
tensor is read (memory-mapped), re-laid-out and copied into its slot of the stacked bmx parameter,
so loading holds the model once plus one tensor, and the result equals converting then loading.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils import epath

from bmx.convert.hf import _resolve_dtype, _validate_hf, bmx_param_shapes
from bmx.convert.mistral_table import mistral_table
from bmx.convert.safetensors_io import SafetensorsReader
from bmx.model.config import MistralConfig

HF_CONFIG_FILE = "config.json"


def read_hf_config(config_file: str | os.PathLike) -> MistralConfig:
    """`MistralConfig` of an HF `config.json`; an error naming the file when it cannot be honoured."""
    config_file = epath.Path(config_file)
    try:
        values = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{config_file}: expected a JSON object of model settings")
    try:
        return MistralConfig.from_hf(values)
    except (TypeError, KeyError) as error:
        raise ValueError(f"{config_file}: {error}") from None


def read_hf_params(hf_dir: str | os.PathLike, *, dtype=None) -> tuple[MistralConfig, dict[str, Any]]:
    """`(config, params)`: every tensor of `hf_dir` validated, then laid out as bmx's nested parameter dict
    (per-layer tensors stacked on axis 0) in `dtype` (default: as stored)."""
    hf_dir = epath.Path(hf_dir)
    config_file = hf_dir / HF_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {hf_dir} is not a Hugging Face model directory")
    config = read_hf_config(config_file)
    reader = SafetensorsReader(hf_dir)
    table = mistral_table(config)
    _validate_hf(reader, config, table)
    shapes = bmx_param_shapes(config)
    out_dtype = _resolve_dtype(dtype)
    params: dict[str, Any] = {}
    for row in table:
        names = row.hf_names(config.num_hidden_layers)
        leaf_dtype = out_dtype or reader.spec(names[0]).dtype
        if row.per_layer:
            array = np.empty(shapes[row.bmx_path], leaf_dtype)
            for layer, name in enumerate(names):
                array[layer] = row.to_bmx(reader.read(name))
        else:
            array = np.array(row.to_bmx(reader.read(names[0])), dtype=leaf_dtype)
        node = params
        for key in row.bmx_path[:-1]:
            node = node.setdefault(key, {})
        node[row.bmx_path[-1]] = array
    return config, params
