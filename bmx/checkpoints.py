"""One loader for every kind of checkpoint bmx reads, and the facts every command needs about one.

A model directory is one of three kinds, told apart by the file that marks it:

    bmx         bmx_checkpoint.json without "quantization"   (`bmx.model` wrote it: training, conversion, merging)
    quantized   bmx_checkpoint.json with "quantization"      (`bmx.quant` wrote it)
    hf          config.json + safetensors                    (a Hugging Face directory, read in memory
                                                              through the conversion table: no temporary copy)

`load(path)` gives `(model, config)` for any of them, so every command that takes a model (`eval`,
`generate`, `quant`, `merge`, `train`'s `init.from`, `convert merge-lora`) takes all three; `find_tokenizer`
is the one rule for where a model's tokenizer lives. This module sits above `bmx.model`, `bmx.convert`
and `bmx.quant` and is the only place that knows all three.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from etils import epath

from bmx.model.checkpoint import METADATA_FILE, TOKENIZER_DIR
from bmx.model.config import MistralConfig
from bmx.tokenizer import MISTRAL_V01

Kind = Literal["bmx", "quantized", "hf"]
HF_CONFIG_FILE = "config.json"
# Any one of these marks a directory as holding a tokenizer (SentencePiece model or HF tokenizer files).
TOKENIZER_MARKERS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def checkpoint_kind(path: str | os.PathLike) -> Kind:
    """Which kind of model directory `path` is; an error naming what was looked for when it is none."""
    path = epath.Path(path)
    metadata_file = path / METADATA_FILE
    if metadata_file.is_file():
        try:
            metadata = json.loads(metadata_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{metadata_file}: not valid JSON ({error})") from None
        return "quantized" if isinstance(metadata, dict) and "quantization" in metadata else "bmx"
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
         shardings: dict[str, Any] | None = None):
    """`(model, config)` from a bmx, quantized or Hugging Face directory, local or `gs://…`.

    `dtype`: parameter dtype (default: as stored). `compute_dtype`: `bmx.model.default_compute_dtype()`
    (bfloat16 on GPU/TPU, float32 on CPU). `shardings`: optional nested dict of `jax.sharding.Sharding`s,
    one per parameter, to place the parameters straight onto a mesh (not for quantized checkpoints).
    """
    kind = checkpoint_kind(path)
    if kind == "quantized":
        if shardings is not None:
            raise ValueError(f"{path}: a quantized checkpoint loads replicated; shardings are not supported")
        from bmx.quant.checkpoint import load_quantized

        return load_quantized(path, dtype, compute_dtype=compute_dtype, remat=remat)
    if kind == "bmx":
        from bmx.model.checkpoint import load as load_bmx

        return load_bmx(path, dtype, compute_dtype=compute_dtype, remat=remat, shardings=shardings)
    from bmx.convert.hf_params import read_hf_params
    from bmx.model.checkpoint import model_from_params

    config, params = read_hf_params(path, dtype=dtype)
    model = model_from_params(config, params, compute_dtype=compute_dtype, remat=remat, shardings=shardings,
                              source=str(path))
    return model, config

