"""One loader for every kind of checkpoint bmx reads, and the facts every command needs about one.

A model directory is one of three kinds, told apart by the file that marks it:

    bmx         bmx_checkpoint.json without "quantization"   (`bmx.model` wrote it: training, conversion, merging)
    quantized   bmx_checkpoint.json with "quantization"      (`bmx.quant` wrote it)
    hf          config.json + safetensors                    (a Hugging Face directory, read in memory
                                                              through the conversion table: no temporary copy)

`load(path)` gives `(model, config)` for any of them, so every command that takes a model (`eval`,
`generate`, `quant`, `train`'s `init.from`) takes all three; `find_tokenizer` is the one rule for where a
model's tokenizer lives. This module sits above `bmx.model` and `bmx.convert`; `bmx.quant`, higher up,
registers the loader of its own kind (`register_loader`), so no lower package imports a higher one.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Literal
from collections.abc import Callable

from etils import epath

from bmx.model.checkpoint import METADATA_FILE, TOKENIZER_DIR
from bmx.model.config import MistralConfig
from bmx.tokenizer import MISTRAL_V01

Kind = Literal["bmx", "quantized", "hf"]
HF_CONFIG_FILE = "config.json"
QUANTIZATION_KEY = "quantization"  # in bmx_checkpoint.json: what makes a bmx checkpoint a quantized one
# Any one of these marks a directory as holding a tokenizer (SentencePiece model or HF tokenizer files).
TOKENIZER_MARKERS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")

# Kinds whose loader a higher package provides: the module that registers it, imported on first need.
PROVIDERS: dict[str, str] = {"quantized": "bmx.quant.checkpoint"}
_LOADERS: dict[str, Callable[..., Any]] = {}


def register_loader(kind: Kind, loader: Callable[..., Any]) -> None:
    """`loader(path, *, dtype, compute_dtype, remat, shardings) -> (model, config)` for `kind`."""
    _LOADERS[kind] = loader


def checkpoint_kind(path: str | os.PathLike) -> Kind:
    """Which kind of model directory `path` is; an error naming what was looked for when it is none."""
    path = epath.Path(path)
    metadata_file = path / METADATA_FILE
    if metadata_file.is_file():
        try:
            metadata = json.loads(metadata_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{metadata_file}: not valid JSON ({error})") from None
        return "quantized" if isinstance(metadata, dict) and QUANTIZATION_KEY in metadata else "bmx"
    if (path / HF_CONFIG_FILE).is_file():
        return "hf"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    raise ValueError(f"{path}: neither a bmx checkpoint ({METADATA_FILE}) nor a Hugging Face model directory "
                     f"({HF_CONFIG_FILE})")


def read_model_config(path: str | os.PathLike) -> MistralConfig:
    """The architecture of any kind of model directory, without reading a weight."""
    if checkpoint_kind(path) == "hf":
        from bmx.convert.hf import read_hf_config

        return read_hf_config(epath.Path(path) / HF_CONFIG_FILE)
    from bmx.model.checkpoint import read_config

    return read_config(path)


def find_tokenizer(path: str | os.PathLike) -> str:
    """Where `path`'s tokenizer is: `tokenizer/` of a bmx checkpoint, the HF directory itself, or, when the
    checkpoint carries none, Mistral v0.1's SentencePiece model (what BioMistral was trained with)."""
    path = epath.Path(path)
    for candidate in (path / TOKENIZER_DIR, path):
        if any((candidate / marker).is_file() for marker in TOKENIZER_MARKERS):
            return str(candidate)
    return MISTRAL_V01


def load(path: str | os.PathLike, *, dtype=None, compute_dtype=None, remat: str = "none",
         shardings: dict[str, Any] | None = None, decoding_layout: bool = False):
    """`(model, config)` from a bmx, quantized or Hugging Face directory, local or `gs://…`.

    `dtype`: parameter dtype (default: as stored). `compute_dtype`: `bmx.model.checkpoint.default_compute_dtype`
    (bfloat16 on GPU/TPU; on CPU a 16-bit model's own dtype, else float32). `shardings`: optional nested
    dict of `jax.sharding.Sharding`s, one per parameter, to place the parameters straight onto a mesh
    (not for quantized checkpoints). `decoding_layout`: the model in `bmx.model.unstack_layers`'s layout
    (generation, and scoring on CPU), never holding two copies of the layers; a bmx checkpoint is read
    into it one layer at a time.
    """
    from bmx.model import unstack_layers

    kind = checkpoint_kind(path)
    if kind in PROVIDERS:
        if kind not in _LOADERS:
            importlib.import_module(PROVIDERS[kind])  # registers its loader
        model, config = _LOADERS[kind](path, dtype=dtype, compute_dtype=compute_dtype, remat=remat,
                                       shardings=shardings)
    elif kind == "bmx":
        from bmx.model.checkpoint import load as load_bmx

        return load_bmx(path, dtype, compute_dtype=compute_dtype, remat=remat, shardings=shardings,
                        decoding_layout=decoding_layout)
    else:
        from bmx.convert.hf_params import read_hf_params
        from bmx.model.checkpoint import model_from_params

        config, params = read_hf_params(path, dtype=dtype)
        model = model_from_params(config, params, compute_dtype=compute_dtype, remat=remat, shardings=shardings,
                                  source=str(path))
        del params
    return (unstack_layers(model, consume=True) if decoding_layout else model), config



def read_params(path: str | os.PathLike, target: dict[str, Any], *, dtype=None) -> dict[str, Any]:
    """The arrays of `target`'s tree (leaves: `jax.ShapeDtypeStruct`s, optionally with shardings) from a bmx
    checkpoint or a Hugging Face directory, each placed on its sharding as it is read (`init.from`)."""
    kind = checkpoint_kind(path)
    if kind == "bmx":
        from bmx.model.checkpoint import read_params as read_bmx_params

        return read_bmx_params(path, target, dtype=dtype)
    if kind != "hf":
        raise ValueError(f"{path}: a {kind} checkpoint holds no float parameters to start from; give its float source")
    import jax

    from bmx.convert.hf_params import read_hf_params
    from bmx.model.checkpoint import check_same_structure

    _, params = read_hf_params(path, dtype=dtype)
    check_same_structure(path, target, params)

    def place(want, array):
        sharding = getattr(want, "sharding", None)
        return jax.device_put(array.astype(dtype or want.dtype), sharding) if sharding is not None else array
    return jax.tree.map(place, target, params)
