"""bmx checkpoints: an orbax PyTree of parameters plus the architecture, and `load` for models.

Layout of a checkpoint directory:

    bmx_checkpoint.json   {"format": "bmx", "version": 1, "model": <MistralConfig fields>}
    params/               orbax PyTree checkpoint of `nnx.state(model, nnx.Param)` as nested dicts
    tokenizer/            (optional) tokenizer files carried over from a Hugging Face directory

Writing can stream: a leaf may be a `LazyArray`, whose slices are produced one at a time while
orbax writes them, so a whole model never has to sit in memory (see `bmx.convert`). On disk it is
an ordinary array and restores with orbax's standard handlers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils.epath import Path  # local paths and object stores (gs://…) alike
from flax import nnx
from orbax.checkpoint import type_handlers

from bmx.model.config import MistralConfig
from bmx.model.mistral import Mistral, layers_as_list, unstack_layers
from bmx.paths import absolute

METADATA_FILE = "bmx_checkpoint.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


# ---- streamed leaves ----------------------------------------------------------------------------

@dataclass
class LazyArray:
    """An array of `shape`/`dtype` produced as `(index, block)` pieces by `blocks()` when written.

    `per_layer`: the blocks are the slices `[layer]` of a stacked parameter, stored one per chunk so
    that a layer is written and read on its own. Otherwise the array is stored as one chunk.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Iterator[tuple[tuple, np.ndarray]]]
    per_layer: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _LazyArrayHandler(type_handlers.NumpyHandler):
    """Writes a `LazyArray` block by block into the tensorstore array orbax would write for numpy."""

    async def _open_and_write(self, value, tspec, ts_context):
        import tensorstore as ts

        # Weights barely compress (random-looking mantissas) and zstd costs 2-4x in write and read speed.
        if "compressor" in tspec.get("metadata", {}):  # zarr v2, orbax's default here
            tspec = {**tspec, "metadata": {**tspec["metadata"], "compressor": None}}
        store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        for index, block in value.blocks():
            await store[index].write(np.asarray(block, dtype=value.dtype))


def _register_lazy_array_handler() -> None:
    """Register once; orbax logs a (harmless, expected) warning that LazyArray shares numpy's type string."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        type_handlers.register_type_handler(LazyArray, _LazyArrayHandler(), override=True)
    finally:
        absl_logger.setLevel(level)


_register_lazy_array_handler()


def _save_args(leaf) -> ocp.SaveArgs:
    """Per-layer storage chunks for stacked leaves, so each layer is written (and read) on its own.

    Only for stacked leaves: chunking the embedding by its leading axis gave 32,000 chunks of one
    row each, and writing those dominated a whole conversion.
    """
    if isinstance(leaf, LazyArray) and leaf.per_layer and leaf.ndim > 1:
        layer_bytes = int(np.prod(leaf.shape[1:], dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        return ocp.SaveArgs(chunk_byte_size=max(layer_bytes, 1), shard_axes=(0,))
    return ocp.SaveArgs()


# ---- writing and reading ------------------------------------------------------------------------

def write_checkpoint(directory: str | os.PathLike, config: MistralConfig, params: dict[str, Any],
                     write_metadata: bool = True) -> None:
    """Write `params` (nested dict of arrays or `LazyArray`s) and the config into `directory`.

    In a multi-process run every process calls this (each writes its shards); only one writes the metadata.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(absolute(directory / PARAMS_DIR), params,
                      save_args=jax.tree.map(_save_args, params, is_leaf=lambda x: isinstance(x, LazyArray)))
    metadata = {"format": "bmx", "version": FORMAT_VERSION, "model": config.to_dict()}
    if write_metadata:  # written last: its presence marks a complete checkpoint
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def read_config(directory: str | os.PathLike) -> MistralConfig:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        hint = " (it looks like a Hugging Face directory: run `python -m bmx.convert hf-to-bmx` first)" if (
            Path(directory) / "config.json").is_file() else ""
        raise FileNotFoundError(f"{path} not found: {directory} is not a complete bmx checkpoint{hint}")
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}): a damaged bmx checkpoint") from None
    if not isinstance(metadata, dict):
        metadata = {"format": metadata}
    if metadata.get("format") != "bmx" or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {metadata.get('format')!r} "
                         f"version {metadata.get('version')!r} (expected bmx version {FORMAT_VERSION})")
    try:
        return MistralConfig.from_dict(metadata["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad model architecture ({error})") from None


def params_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Nested dict of the stored arrays' metadata (shape, dtype) without reading any data."""
    params_dir = absolute(Path(directory) / PARAMS_DIR)
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(params_dir)
    except Exception as error:  # noqa: BLE001 - orbax raises many types; all mean "damaged"
        raise ValueError(f"{params_dir}: unreadable parameter metadata ({_first_line(error)}): a damaged "
                         "bmx checkpoint") from None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not jax.tree.leaves(tree):  # orbax only warns when the metadata files are missing
        raise ValueError(f"{params_dir}: no parameters found (missing or damaged metadata): a damaged or "
                         "incomplete bmx checkpoint")
    return tree


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def read_params(directory: str | os.PathLike, target: dict[str, Any] | None = None,
                dtype=None) -> dict[str, Any]:
    """Restore parameters: all of them, or only the leaves present in `target` (partial restore).

    `target` leaves may be `jax.ShapeDtypeStruct`s with shardings, to restore straight onto a mesh.
    """
    path = absolute(Path(directory) / PARAMS_DIR)
    checkpointer = ocp.PyTreeCheckpointer()
    if target is None:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), params_metadata(directory))

    def restore_args(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=dtype or leaf.dtype)

    args = ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(restore_args, target), partial_restore=True)
    try:
        return checkpointer.restore(path, args=args)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # tensorstore reports damaged files as ValueError
        raise ValueError(f"{path}: cannot read the parameters ({_first_line(error)}): a damaged bmx "
                         "checkpoint") from None


def open_param(directory: str | os.PathLike, keys: tuple[str, ...]):
    """A tensorstore handle on one stored parameter, for reading slices (e.g. one layer) lazily."""
    from bmx.private_api import open_orbax_array

    params_dir = absolute(Path(directory) / PARAMS_DIR)
    stored = json.loads((params_dir / "_METADATA").read_text())
    return open_orbax_array(str(params_dir), ".".join(keys), use_zarr3=stored.get("use_zarr3", False),
                            use_ocdbt=stored.get("use_ocdbt", True))


def default_compute_dtype(param_dtype=None):
    """What a loaded model computes in unless told: bfloat16 on GPU/TPU; on CPU the parameters' own
    dtype when it is a 16-bit float (as transformers does), otherwise float32.

    Why 16-bit on CPU: `bmx.model.products` takes its products on the AVX512-BF16/AMX kernels, several
    times faster than float32 ones, and a float32 computation of 16-bit weights also converts every
    weight at every use.
    """
    if jax.default_backend() in ("gpu", "tpu"):
        return jnp.bfloat16
    if param_dtype is not None and jnp.dtype(param_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return jnp.dtype(param_dtype)
    return jnp.float32


def load(ckpt_dir: str | os.PathLike, dtype=None, *, compute_dtype=None, remat: str = "none",
         shardings: dict[str, Any] | None = None, decoding_layout: bool = False) -> tuple[Mistral, MistralConfig]:
    """`(model, config)` from a bmx checkpoint.

    `dtype`: parameter dtype (default: as stored). `compute_dtype`: `default_compute_dtype(param dtype)`.
    `shardings`: optional nested dict of `jax.sharding.Sharding`s per parameter. `decoding_layout`: the
    model as `unstack_layers` lays it out, read one layer at a time (peak: the model plus one layer's
    array; not with `shardings`).
    Quantized checkpoints and Hugging Face directories load through `bmx.checkpoints.load`.
    """
    config = read_config(ckpt_dir)
    if "quantization" in json.loads((Path(ckpt_dir) / METADATA_FILE).read_text()):
        raise ValueError(f"{ckpt_dir}: a quantized checkpoint; load it with `bmx.checkpoints.load`")
    stored = params_metadata(ckpt_dir)
    param_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(jax.tree.leaves(stored)[0].dtype)
    compute_dtype = compute_dtype or default_compute_dtype(param_dtype)
    abstract_model = nnx.eval_shape(lambda: Mistral(config, dtype=compute_dtype, param_dtype=param_dtype,
                                                    remat=remat))
    graph, abstract_state = nnx.split(abstract_model)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), abstract_state.to_pure_dict())
    if shardings is not None:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    check_same_structure(ckpt_dir, target, stored)
    if decoding_layout and shardings is None:
        return _load_layer_by_layer(ckpt_dir, graph, abstract_state, target, param_dtype), config
    restored = read_params(ckpt_dir, target, dtype=param_dtype)
    restored = jax.tree.map(jnp.asarray, restored)
    abstract_state.replace_by_pure_dict(restored)
    model = nnx.merge(graph, abstract_state)
    return (unstack_layers(model, consume=True) if decoding_layout else model), config


def _load_layer_by_layer(ckpt_dir, graph, abstract_state, target: dict, param_dtype) -> Mistral:
    """The decoding layout straight from the checkpoint: everything but the layers restored whole, each
    stacked layer parameter read one layer's slice at a time (a stacked array is never in memory)."""
    outside_layers = {**target, "model": {k: v for k, v in target["model"].items() if k != "layers"}}
    nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, read_params(ckpt_dir, outside_layers,
                                                                                   dtype=param_dtype)))
    handles: dict[tuple[str, ...], Any] = {}

    def read_layer(path, _abstract, layer: int) -> jax.Array:
        keys = ("model", "layers", *(entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)))
        if keys not in handles:
            handles.clear()  # one parameter at a time
            handles[keys] = open_param(ckpt_dir, keys)
        try:
            array = handles[keys][layer].read().result()
        except (OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"{ckpt_dir}: cannot read parameter {'.'.join(keys)} ({_first_line(error)}): "
                             "a damaged bmx checkpoint") from None
        return jnp.asarray(array.astype(param_dtype, copy=False))

    return layers_as_list(nnx.merge(graph, abstract_state), read_layer)


def check_same_structure(ckpt_dir, expected: dict, stored: dict) -> None:
    """Refuse `stored` arrays (named `ckpt_dir` in errors) whose names or shapes differ from `expected`'s."""
    expected_shapes = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    stored_shapes = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(stored)}
    for name in sorted(set(expected_shapes) | set(stored_shapes)):
        if name not in stored_shapes:
            raise ValueError(f"{ckpt_dir}: parameter {name} is missing from the checkpoint")
        if name not in expected_shapes:
            raise ValueError(f"{ckpt_dir}: unexpected parameter {name} in the checkpoint")
        if expected_shapes[name] != stored_shapes[name]:
            raise ValueError(f"{ckpt_dir}: parameter {name} has shape {stored_shapes[name]}, "
                             f"the config implies {expected_shapes[name]}")


def model_from_params(config: MistralConfig, params: dict[str, Any], *, compute_dtype=None, remat: str = "none",
                      shardings: dict[str, Any] | None = None, source: str = "params") -> Mistral:
    """A float model from a nested dict of host arrays laid out as `nnx.state(model, nnx.Param)`.

    The parameter dtype is the arrays'; each array goes to its sharding (if given) as it is placed,
    so a sharded model never exists whole on one device. `source` names the arrays in errors.
    """
    param_dtype = jnp.dtype(params["model"]["embed_tokens"]["weight"].dtype)
    compute_dtype = compute_dtype or default_compute_dtype(param_dtype)
    graph, abstract_state = nnx.split(nnx.eval_shape(
        lambda: Mistral(config, dtype=compute_dtype, param_dtype=param_dtype, remat=remat)))
    expected = abstract_state.to_pure_dict()
    check_same_structure(source, expected, params)
    if shardings is None:
        placed = jax.tree.map(jnp.asarray, params)
    else:
        placed = jax.tree.map(lambda array, sharding: jax.device_put(array, sharding), params, shardings)
    abstract_state.replace_by_pure_dict(placed)
    return nnx.merge(graph, abstract_state)
