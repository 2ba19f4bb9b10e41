"""Quantize a bmx checkpoint without loading it: each linear's layers read, quantized and written in turn.

Round-to-nearest methods (int8 without outliers, NF4, FP4, RTN) need nothing but each weight, so the
float model never has to be in memory: a 7B model in bf16 (14.5 GB) plus its int8 copy (7 GB) does
not fit in a 24 GB machine, one layer's weight does. The output is the checkpoint `save_quantized`
writes for the same model, array for array (tested); its layout comes from `quantize_abstractly`.
"""

from __future__ import annotations

import os
from math import prod
from pathlib import Path

import numpy as np
from flax import nnx

from bmx.convert.safetensors_io import atomic_output_dir
from bmx.model.checkpoint import (
    LazyArray,
    open_param,
    params_metadata,
    read_config,
    write_checkpoint,
)
from bmx.model.mistral import Mistral
from bmx.quant.checkpoint import finish_quantized_dir
from bmx.quant.model import LINEAR_PATHS, linear_at, quantize_abstractly
from bmx.quant.schemes import Scheme


def can_stream(method: str, calib, outlier_threshold) -> bool:
    """Whether the method quantizes each weight on its own (no calibration, no activation statistics)."""
    return method in ("nf4", "fp4", "rtn") or (method == "int8" and outlier_threshold is None and calib is None)


class _QuantizedLayers:
    """One linear's quantized arrays, computed a layer at a time and handed out array by array.

    orbax writes every array of the checkpoint concurrently, each asking for its layers in order:
    a layer is quantized when the first of its arrays asks and forgotten once all have taken theirs.
    """

    def __init__(self, ckpt, path: str, num_contracted: int, scheme: Scheme):
        self.store = open_param(ckpt, ("model", "layers", *path.split("."), "kernel"))
        self.num_contracted, self.scheme = num_contracted, scheme
        self.pending: dict[int, dict[str, np.ndarray]] = {}

    def take(self, layer: int, name: str) -> np.ndarray:
        if layer not in self.pending:
            kernel = np.asarray(self.store[layer].read().result())
            matrix = kernel.reshape(prod(kernel.shape[:self.num_contracted]), -1)  # [in, out]
            self.pending[layer] = dict(self.scheme.quantize_kernel(matrix))
        arrays = self.pending[layer]
        value = arrays.pop(name)
        if not arrays:
            del self.pending[layer]
        return value


def stream_quantize(ckpt: str | os.PathLike, out: str | os.PathLike, scheme: Scheme) -> Path:
    """Write the quantized checkpoint of the float bmx checkpoint `ckpt` into `out`."""
    import jax

    config = read_config(ckpt)
    stored = params_metadata(ckpt)
    param_dtype = jax.tree.leaves(stored)[0].dtype
    abstract = nnx.eval_shape(lambda: quantize_abstractly(Mistral(config, param_dtype=param_dtype), scheme))
    layout = nnx.state(abstract).to_pure_dict()
    layers = abstract.model.layers
    sources = {path: _QuantizedLayers(ckpt, path, linear_at(layers, path).num_contracted, scheme)
               for path in LINEAR_PATHS}

    def quantized_leaf(path: str, name: str, spec) -> LazyArray:
        def blocks():
            for layer in range(spec.shape[0]):
                yield (layer,), sources[path].take(layer, name)

        return LazyArray(tuple(spec.shape), np.dtype(spec.dtype), blocks, per_layer=True)

    def float_leaf(keys: tuple[str, ...], spec) -> LazyArray:
        def blocks():
            yield (Ellipsis,), np.asarray(open_param(ckpt, keys).read().result())

        return LazyArray(tuple(spec.shape), np.dtype(spec.dtype), blocks)

    def build(node: dict, keys: tuple[str, ...] = ()) -> dict:
        tree = {}
        for key, value in node.items():
            here = (*keys, str(key))
            if isinstance(value, dict):
                tree[key] = build(value, here)
                continue
            linear = ".".join(here[2:-1]) if here[:2] == ("model", "layers") else None
            tree[key] = quantized_leaf(linear, here[-1], value) if linear in LINEAR_PATHS else float_leaf(here, value)
        return tree

    params = build(layout)
    with atomic_output_dir(out) as staging:
        write_checkpoint(staging, config, params)
        finish_quantized_dir(staging, scheme, source=ckpt)
    return Path(out)
