"""A Hugging Face Mistral directory read straight into bmx's parameter layout, in memory.

The same table, validation and layout changes as `hf_to_bmx` (`open_hf`), without writing a
checkpoint: each HF tensor is read (memory-mapped), re-laid-out and copied into its slot of the
stacked bmx parameter, so loading holds the model once plus one tensor, and the result equals
converting then loading.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bmx.convert.hf import bmx_param_shapes, numpy_dtype, open_hf
from bmx.model.config import MistralConfig


def read_hf_params(hf_dir: str | os.PathLike, *, dtype=None) -> tuple[MistralConfig, dict[str, Any]]:
    """`(config, params)`: every tensor of `hf_dir` validated, then laid out as bmx's nested parameter dict
    (per-layer tensors stacked on axis 0) in `dtype` (default: as stored)."""
    config, reader, table = open_hf(hf_dir)
    shapes = bmx_param_shapes(config)
    out_dtype = numpy_dtype(dtype)
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
