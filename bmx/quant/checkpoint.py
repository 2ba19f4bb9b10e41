"""Quantized bmx checkpoints: the ordinary layout plus a `quantization` entry in the metadata.

    bmx_checkpoint.json   {"format": "bmx", "version": 1, "model": {...},
                           "quantization": {"scheme": {...}, "linears": [...]}}
    params/               orbax PyTree of every array: float parameters and, per quantized
                          linear, its packed arrays stacked over layers
    tokenizer/, hf/       carried over from the source checkpoint

`bmx.checkpoints.load` sees the `quantization` entry and hands the directory to `load_quantized`, so a
quantized checkpoint loads wherever a float one does (`bmx.eval`, `bmx.generate`, the benchmarks).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmx.checkpoints import QUANTIZATION_KEY, register_loader
from bmx.convert.safetensors_io import atomic_output_dir
from bmx.model.checkpoint import METADATA_FILE, params_metadata, read_config, read_params, write_checkpoint
from bmx.model.config import MistralConfig
from bmx.model.mistral import Mistral
from bmx.quant.layers import QuantizedLinear
from bmx.quant.model import LINEAR_PATHS, is_quantized, linear_at, parent_and_name
from bmx.quant.schemes import Scheme, scheme_from_dict, scheme_to_dict

CARRIED_DIRS = ("tokenizer", "hf")  # from the float checkpoint: tokenizer files, HF config sidecar


def quantization_metadata(directory: str | os.PathLike) -> dict | None:
    """The checkpoint's `quantization` entry, or None for a float checkpoint."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(QUANTIZATION_KEY)


def save_quantized(model: Mistral, directory: str | os.PathLike, *, source: str | os.PathLike | None = None,
                   before_publish: Callable[[Path], None] | None = None) -> Path:
    """Write a quantized `model` as a bmx checkpoint; `source`'s tokenizer and HF sidecar come along.

    The directory appears only once complete. `before_publish(staging)` may write more into it
    first (the CLI's HF export inside `--out`), so that the two appear together or not at all.
    """
    if not is_quantized(model):
        raise ValueError("save_quantized expects a model quantized by bmx.quant (see quantize_model)")
    scheme = linear_at(model.model.layers, LINEAR_PATHS[0]).scheme
    params = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    directory = Path(directory)
    with atomic_output_dir(directory) as staging:
        write_checkpoint(staging, model.config, params)
        finish_quantized_dir(staging, scheme, source)
        if before_publish is not None:
            before_publish(staging)
    return directory


def finish_quantized_dir(staging: Path, scheme: Scheme, source: str | os.PathLike | None) -> None:
    """The `quantization` metadata entry, and `source`'s tokenizer and HF sidecar, beside written params."""
    metadata_file = staging / METADATA_FILE
    metadata = json.loads(metadata_file.read_text())
    metadata[QUANTIZATION_KEY] = {"scheme": scheme_to_dict(scheme), "linears": list(LINEAR_PATHS)}
    metadata_file.write_text(json.dumps(metadata, indent=2) + "\n")
    for name in CARRIED_DIRS:
        if source is not None and (Path(source) / name).is_dir():
            shutil.copytree(Path(source) / name, staging / name)


def quantized_skeleton(config: MistralConfig, scheme: Scheme, stored: dict, *, param_dtype, compute_dtype,
                       remat: str = "none") -> Mistral:
    """A model of the right structure with placeholder arrays (call under `nnx.eval_shape`)."""
    model = Mistral(config, dtype=compute_dtype, param_dtype=param_dtype, remat=remat)
    stored_layers = stored["model"]["layers"]
    for path in LINEAR_PATHS:
        node = stored_layers
        for key in path.split("."):
            if key not in node:
                raise ValueError(f"quantized checkpoint: linear {path} is missing")
            node = node[key]
        linear = linear_at(model.model.layers, path)
        kernel_shape = linear.kernel.shape[1:]
        arrays = {name: jnp.zeros(meta.shape, meta.dtype) for name, meta in node.items()}
        parent, name = parent_and_name(model.model.layers, path)
        setattr(parent, name, QuantizedLinear(scheme, arrays, kernel_shape[:linear.num_contracted],
                                              kernel_shape[linear.num_contracted:], dtype=compute_dtype,
                                              leading_axes=("layers",)))
    return model


def load_quantized(ckpt_dir: str | os.PathLike, dtype=None, *, compute_dtype=None,
                   remat: str = "none") -> tuple[Mistral, MistralConfig]:
    """`(model, config)` from a quantized checkpoint; `dtype` applies to the float parameters only."""
    metadata = quantization_metadata(ckpt_dir)
    if metadata is None:
        raise ValueError(f"{ckpt_dir}: not a quantized bmx checkpoint (no {QUANTIZATION_KEY!r} in {METADATA_FILE})")
    config = read_config(ckpt_dir)
    scheme = scheme_from_dict(metadata["scheme"])
    stored = params_metadata(ckpt_dir)
    graph, abstract_state = _abstract_model(config, scheme, stored, dtype, compute_dtype, remat)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state.to_pure_dict())
    _check_stored_shapes(ckpt_dir, target, stored)
    restored = read_params(ckpt_dir, target)  # each array in its stored dtype
    restored = jax.tree.map(lambda array, want: jnp.asarray(array, want.dtype), restored, target)
    abstract_state.replace_by_pure_dict(restored)
    return nnx.merge(graph, abstract_state), config


def model_from_arrays(config: MistralConfig, scheme: Scheme, params: dict, *, dtype=None, compute_dtype=None,
                      remat: str = "none") -> Mistral:
    """A quantized model from a nested dict of arrays laid out as `nnx.state(model).to_pure_dict()`."""
    graph, abstract_state = _abstract_model(config, scheme, params, dtype, compute_dtype, remat)
    target = abstract_state.to_pure_dict()
    _check_stored_shapes("arrays", target, params)
    abstract_state.replace_by_pure_dict(jax.tree.map(lambda array, want: jnp.asarray(array, want.dtype),
                                                     params, target))
    return nnx.merge(graph, abstract_state)


def _abstract_model(config, scheme, stored, dtype, compute_dtype, remat):
    from bmx.model.checkpoint import default_compute_dtype

    param_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(stored["model"]["embed_tokens"]["weight"].dtype)
    compute_dtype = compute_dtype or default_compute_dtype(param_dtype)
    abstract = nnx.eval_shape(lambda: quantized_skeleton(config, scheme, stored, param_dtype=param_dtype,
                                                         compute_dtype=compute_dtype, remat=remat))
    return nnx.split(abstract)


def _check_stored_shapes(ckpt_dir, expected: dict, stored: dict) -> None:
    shapes = lambda tree: {jax.tree_util.keystr(path): tuple(leaf.shape)  # noqa: E731
                           for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    want, have = shapes(expected), shapes(stored)
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            raise ValueError(f"{ckpt_dir}: parameter {name} is stored with shape {have.get(name)}, "
                             f"the config and quantization scheme imply {want.get(name)}")


def _load_registered(path, *, dtype, compute_dtype, remat, shardings) -> tuple[Mistral, MistralConfig]:
    if shardings is not None:
        raise ValueError(f"{path}: a quantized checkpoint loads replicated; shardings are not supported")
    return load_quantized(path, dtype, compute_dtype=compute_dtype, remat=remat)


register_loader("quantized", _load_registered)
