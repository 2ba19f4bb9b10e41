"""Hugging Face safetensors ⇄ bmx checkpoints, one tensor at a time.

hf → bmx: every HF tensor is validated (names, shapes, dtypes) before anything is written; then each
bmx parameter is written by orbax while its per-layer HF tensors are read and re-laid-out one by one.
bmx → hf: each HF tensor is read as one layer's slice of the stored parameter and appended to the
current safetensors shard. Either way the output is built under a temporary name and published by
rename, so an interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from collections.abc import Iterator

import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from bmx.convert.contiguous import contiguous_copy
from bmx.convert.mistral_table import TensorMapping, hf_tensor_order, mistral_table
from bmx.convert.safetensors_io import (
    CheckpointFormatError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    dtype_name,
    parse_size,
)
from bmx.model.checkpoint import (
    METADATA_FILE,
    TOKENIZER_DIR,
    LazyArray,
    open_param,
    params_metadata,
    read_config,
    write_checkpoint,
)
from bmx.model.config import MistralConfig
from bmx.model.mistral import Mistral
from bmx.paths import is_local

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
HF_SIDECAR_DIR = "hf"  # the source's config.json and generation_config.json, kept for the way back
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older transformers versions saved; recomputed
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # what a weight may be stored as


def bmx_param_shapes(config: MistralConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every bmx parameter, from the model definition itself (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Mistral(config))
    return {tuple(str(key) for key in path): tuple(variable.shape)
            for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def numpy_dtype(dtype) -> np.dtype | None:
    """`dtype` (a name: float32, bfloat16, float16; or anything numpy takes) as a numpy dtype; None stays None."""
    if dtype is None:
        return None
    import ml_dtypes

    names = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(names)}")
        return np.dtype(names[dtype])
    return np.dtype(dtype)


# ---- hf → bmx -----------------------------------------------------------------------------------

def _validate_hf(reader: SafetensorsReader, config: MistralConfig, table: list[TensorMapping]) -> None:
    expected = {name: row for row in table for name in row.hf_names(config.num_hidden_layers)}
    found = set(reader.names())
    for name in sorted(expected):
        if name not in found:
            raise CheckpointFormatError(f"{reader.directory}: tensor {name!r} is missing "
                                        f"(expected shape {expected[name].hf_shape})")
        spec = reader.spec(name)
        if spec.shape != expected[name].hf_shape:
            raise CheckpointFormatError(f"{reader.directory}: tensor {name!r} has shape {spec.shape}, "
                                        f"expected {expected[name].hf_shape} from config.json")
    for name in sorted(found - set(expected)):
        if name.endswith(IGNORED_HF_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            if not np.array_equal(reader.read(name), reader.read("model.embed_tokens.weight")):
                raise CheckpointFormatError(f"{reader.directory}: tie_word_embeddings is true but lm_head.weight "
                                            "differs from model.embed_tokens.weight")
            continue
        raise CheckpointFormatError(f"{reader.directory}: unexpected tensor {name!r} (shape {reader.spec(name).shape}) "
                                    "is not part of a Mistral model")
    for name in sorted(expected):
        dtype = reader.spec(name).dtype
        if dtype_name(dtype) not in FLOAT_DTYPES:  # an int32 norm weight would convert to nonsense, silently
            raise CheckpointFormatError(f"{reader.file_of(name)}: tensor {name!r} is stored as {dtype_name(dtype)}; "
                                        f"Mistral weights must be floating point ({', '.join(FLOAT_DTYPES)})")
    for row in table:
        dtypes = {reader.spec(name).dtype for name in row.hf_names(config.num_hidden_layers)}
        if len(dtypes) > 1:
            raise CheckpointFormatError(f"{reader.directory}: tensors {row.hf_name!r} mix dtypes {sorted(map(str, dtypes))}")


def read_hf_config(config_file) -> MistralConfig:
    """`MistralConfig` of an HF `config.json`; an error naming the file when it cannot be honoured."""
    try:
        values = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointFormatError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise CheckpointFormatError(f"{config_file}: expected a JSON object of model settings")
    try:
        return MistralConfig.from_hf(values)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointFormatError(f"{config_file}: {error}") from None


def open_hf(src) -> tuple[MistralConfig, SafetensorsReader, list[TensorMapping]]:
    """An HF Mistral directory (local or `gs://…`), every tensor validated against its `config.json`
    before any is read: `(config, reader, table)`."""
    src = Path(src) if is_local(src) else epath.Path(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {src} is not a Hugging Face model directory")
    config = read_hf_config(config_file)
    reader = SafetensorsReader(src)
    table = mistral_table(config)
    _validate_hf(reader, config, table)
    return config, reader, table


def hf_to_bmx(src: str | os.PathLike, dst: str | os.PathLike, dtype=None, *, progress: bool = True) -> Path:
    """Convert an HF Mistral directory (config.json + safetensors) into a bmx checkpoint at `dst`."""
    src, dst = Path(src), Path(dst)
    config, reader, table = open_hf(src)
    shapes = bmx_param_shapes(config)
    out_dtype = numpy_dtype(dtype)
    bar = tqdm(total=sum(len(row.hf_names(config.num_hidden_layers)) for row in table), unit="tensor",
               desc="hf → bmx", disable=not progress)

    failed = []  # orbax writes leaves concurrently: once one fails, the others stop at their next block

    def leaf(row: TensorMapping) -> LazyArray:
        names = row.hf_names(config.num_hidden_layers)
        leaf_dtype = out_dtype or reader.spec(names[0]).dtype

        def blocks() -> Iterator[tuple[tuple, np.ndarray]]:
            for layer, name in enumerate(names):
                if failed:
                    raise RuntimeError(f"conversion stopped before {name}: {failed[0]}")
                try:
                    block = contiguous_copy(row.to_bmx(reader.read(name))).astype(leaf_dtype, copy=False)
                except BaseException as error:
                    failed.append(f"{name}: {error!r}")
                    raise
                bar.update()
                yield ((layer,) if row.per_layer else (Ellipsis,)), block

        return LazyArray(shapes[row.bmx_path], leaf_dtype, blocks, per_layer=row.per_layer)

    params: dict = {}
    for row in table:
        node = params
        for key in row.bmx_path[:-1]:
            node = node.setdefault(key, {})
        node[row.bmx_path[-1]] = leaf(row)

    # On an interrupt, the blocks still being written stop at their next layer (see `leaf`).
    with atomic_output_dir(dst, stop=lambda: failed.append("interrupted")) as staging:
        _copy_sidecar_files(src, staging)
        write_checkpoint(staging, config, params)
    bar.close()
    return dst


def _copy_sidecar_files(src: Path, staging: Path) -> None:
    tokenizer_files = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if tokenizer_files:
        (staging / TOKENIZER_DIR).mkdir()
        for name in tokenizer_files:
            shutil.copy2(src / name, staging / TOKENIZER_DIR / name)
    (staging / HF_SIDECAR_DIR).mkdir()
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, staging / HF_SIDECAR_DIR / name)


# ---- bmx → hf -----------------------------------------------------------------------------------

class BmxCheckpointReader:
    """A bmx checkpoint seen through HF tensor names (the `SafetensorsReader` interface), read lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.config = read_config(directory)
        stored = params_metadata(directory)
        expected = bmx_param_shapes(self.config)
        self._stored_dtypes: dict[tuple[str, ...], np.dtype] = {}
        for path, shape in expected.items():
            node = stored
            for key in path:
                if not isinstance(node, dict) or key not in node:
                    raise CheckpointFormatError(f"{directory}: parameter {'.'.join(path)} is missing")
                node = node[key]
            if tuple(node.shape) != shape:
                raise CheckpointFormatError(f"{directory}: parameter {'.'.join(path)} has shape {tuple(node.shape)}, "
                                            f"expected {shape} from {METADATA_FILE}")
            self._stored_dtypes[path] = np.dtype(node.dtype)
        self._rows = {name: (row, layer) for name, row, layer in hf_tensor_order(self.config)}
        self._stores: dict[tuple[str, ...], object] = {}

    def names(self) -> list[str]:
        return list(self._rows)

    def spec(self, name: str) -> TensorSpec:
        row, _ = self._rows[name]
        return TensorSpec(name, row.hf_shape, self._stored_dtypes[row.bmx_path])

    def read(self, name: str) -> np.ndarray:
        try:
            row, layer = self._rows[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not found in {self.directory}") from None
        if row.bmx_path not in self._stores:
            self._stores[row.bmx_path] = open_param(self.directory, row.bmx_path)
        store = self._stores[row.bmx_path]
        block = (store[layer] if layer is not None else store).read().result()
        return contiguous_copy(row.to_hf(np.asarray(block)))

    def __iter__(self):
        return iter(self._rows)

    def __contains__(self, name: str) -> bool:
        return name in self._rows


def open_checkpoint(path: str | os.PathLike) -> SafetensorsReader | BmxCheckpointReader:
    """Tensors under HF names from either an HF safetensors directory or a bmx checkpoint."""
    if (Path(path) / METADATA_FILE).is_file():
        return BmxCheckpointReader(path)
    return SafetensorsReader(path)


def hf_config_json(src: Path, config: MistralConfig, dtype: np.dtype) -> dict:
    """The `config.json` an HF export of the bmx checkpoint at `src` gets: `config` in HF's terms, the
    source's token ids kept, and `dtype` as its `torch_dtype`."""
    hf_config = config.to_hf()
    original = src / HF_SIDECAR_DIR / "config.json"
    if original.is_file():  # keep the token ids and other bookkeeping the source declared
        previous = json.loads(original.read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache"):
            if key in previous:
                hf_config[key] = previous[key]
    hf_config["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]
    return hf_config


def bmx_to_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype=None, *, max_shard_size: str | int = "5GB",
              progress: bool = True) -> Path:
    """Write an HF `MistralForCausalLM` directory (config, sharded safetensors, tokenizer) from a bmx checkpoint."""
    src, dst = Path(src), Path(dst)
    reader = BmxCheckpointReader(src)
    out_dtype = numpy_dtype(dtype)
    specs = [TensorSpec(name, spec.shape, out_dtype or spec.dtype) for name in reader.names()
             for spec in [reader.spec(name)]]
    dtypes = {spec.dtype for spec in specs}
    with atomic_output_dir(dst) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, parse_size(max_shard_size))
        for spec in tqdm(specs, unit="tensor", desc="bmx → hf", disable=not progress):
            writer.write(spec.name, reader.read(spec.name).astype(spec.dtype, copy=False))
        writer.finish()
        main_dtype = out_dtype or max(dtypes, key=lambda d: sum(s.nbytes for s in specs if s.dtype == d))
        hf_config = hf_config_json(src, reader.config, main_dtype)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = src / HF_SIDECAR_DIR / "generation_config.json"
        if generation.is_file():
            shutil.copy2(generation, staging / "generation_config.json")
        else:
            (staging / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True}, indent=2) + "\n")
        tokenizer_dir = src / TOKENIZER_DIR
        if tokenizer_dir.is_dir():
            for file in tokenizer_dir.iterdir():
                shutil.copy2(file, staging / file.name)
    return dst
