"""Fold a softmax temperature into a checkpoint: `python -m bmx.convert calibrate CKPT OUT --temperature T`.

The LM head is divided by `T`, so every token's logit is `z / T` and the model runs calibrated in any
tool that loads it (transformers, vLLM, llama.cpp's GGUF conversion), not only in `bmx.eval`. The
letter probabilities it gives, renormalised over a question's options, are then exactly
`softmax(log p / T)`: what `python -m bmx.eval --calibrate temperature` reports (`--from-eval` reads
`T` from that run's results.json).

Input: a bmx checkpoint or an HF directory (read through `open_checkpoint`). Output: an HF
safetensors directory; `T` is recorded in `calibration.json` and in the safetensors metadata
(`bmx_calibration_temperature`), not in config.json, whose keys must all mean something to a loader.
A model with tied embeddings is untied: dividing the shared matrix would also scale the inputs.
Each tensor keeps its dtype; the head is divided in float32 and rounded back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from bmx.convert.hf import (
    HF_SIDECAR_DIR,
    TOKENIZER_FILES,
    hf_config_json,
    open_checkpoint,
)
from bmx.convert.safetensors_io import (
    CheckpointFormatError,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    parse_size,
)
from bmx.model.checkpoint import METADATA_FILE, TOKENIZER_DIR

LM_HEAD = "lm_head.weight"
EMBEDDINGS = "model.embed_tokens.weight"
CALIBRATION_FILE = "calibration.json"


def temperature_from_eval(results_json: str | os.PathLike) -> float:
    """The model temperature a `bmx.eval --calibrate temperature` run fitted (results.json)."""
    path = Path(results_json)
    if not path.is_file():
        raise FileNotFoundError(f"--from-eval {path}: no such file")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--from-eval {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    calibration = document.get("calibration") if isinstance(document, dict) else None
    if not isinstance(calibration, dict):
        raise ValueError(f"--from-eval {path}: no 'calibration' section; run python -m bmx.eval with --calibrate "
                         "temperature")
    if calibration.get("method") != "temperature" or "model_temperature" not in calibration:
        raise ValueError(f"--from-eval {path}: calibrated with {calibration.get('method')!r}; only a temperature can "
                         "be folded into an LM head (its per-letter biases have no place there): use --calibrate "
                         "temperature")
    return float(calibration["model_temperature"])


def calibrate_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, temperature: float, *,
                         source: str | None = None, max_shard_size: str | int = "5GB") -> Path:
    """Write `src` with its LM head divided by `temperature` as an HF directory at `dst`."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a positive number, got {temperature!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    reader = open_checkpoint(src)
    config = _source_config(src, reader)
    names = reader.names()
    tied = LM_HEAD not in names
    if tied and EMBEDDINGS not in names:
        raise CheckpointFormatError(f"{src}: neither {LM_HEAD} nor {EMBEDDINGS} found")
    order = names + [LM_HEAD] if tied else names
    specs = [TensorSpec(name, reader.spec(EMBEDDINGS if name == LM_HEAD and tied else name).shape,
                        reader.spec(EMBEDDINGS if name == LM_HEAD and tied else name).dtype) for name in order]
    record = {"temperature": float(temperature), "model": str(src), "temperature_from": str(source or "--temperature"),
              "untied_embeddings": tied}
    with atomic_output_dir(dst) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, parse_size(max_shard_size),
                                          metadata={"bmx_calibration_temperature": repr(float(temperature))})
        for spec in specs:
            tensor = reader.read(EMBEDDINGS if spec.name == LM_HEAD and tied else spec.name)
            if spec.name == LM_HEAD:
                tensor = (tensor.astype(np.float32) / np.float32(temperature)).astype(spec.dtype)
            writer.write(spec.name, tensor)
        writer.finish()
        config["tie_word_embeddings"] = False
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / CALIBRATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _copy_tokenizer_and_generation_config(src, staging)
    return dst


def _source_config(src: Path, reader) -> dict:
    if (src / METADATA_FILE).is_file():
        dtypes = [reader.spec(name).dtype for name in reader.names()]
        return hf_config_json(src, reader.config, max(set(dtypes), key=dtypes.count))
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{src}: neither a bmx checkpoint ({METADATA_FILE}) nor an HF directory (config.json)")
    return json.loads(config_file.read_text())


def _copy_tokenizer_and_generation_config(src: Path, staging: Path) -> None:
    for folder in (src / TOKENIZER_DIR, src):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file() and not (staging / name).exists():
                shutil.copy2(folder / name, staging / name)
    for generation in (src / HF_SIDECAR_DIR / "generation_config.json", src / "generation_config.json"):
        if generation.is_file():
            shutil.copy2(generation, staging / "generation_config.json")
            break
