"""`python -m bmx.convert merge-lora`: fold a PEFT LoRA adapter into its base and write a Hugging Face model.

Streams like `bmx_to_hf`: each base tensor (from an HF directory or a bmx checkpoint, under HF names)
is read, has W + B·A·scale added in float32 when the adapter touches it, and is appended to the
current safetensors shard; the output is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bmx.convert.hf import (
    HF_SIDECAR_DIR,
    TOKENIZER_FILES,
    BmxCheckpointReader,
    hf_config_json,
    numpy_dtype,
    open_checkpoint,
)
from bmx.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec, atomic_output_dir, parse_size
from bmx.lora.peft_format import PeftAdapter, module_name, read_peft_adapter
from bmx.model.checkpoint import TOKENIZER_DIR
from bmx.model.config import MistralConfig


def _base_config(base: Path, reader) -> MistralConfig:
    if isinstance(reader, BmxCheckpointReader):
        return reader.config
    return MistralConfig.from_hf(json.loads((base / "config.json").read_text()))


def _merge_plan(adapter: PeftAdapter, config: MistralConfig, reader) -> dict[str, tuple[str, int]]:
    """HF weight name -> (projection, layer) for every weight the adapter changes, shapes checked."""
    plan = {}
    for projection in adapter.config.targets:
        for layer in range(config.num_hidden_layers):
            name = module_name(projection, layer) + ".weight"
            if name not in reader:
                raise ValueError(f"the base has no tensor {name!r} for the adapter's {projection}")
            a, b = adapter.pair(projection, layer)
            out_features, in_features = reader.spec(name).shape
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise ValueError(f"{adapter.directory}: lora_A {a.shape} / lora_B {b.shape} of {name!r} do not fit "
                                 f"its shape {(out_features, in_features)} in the base")
            plan[name] = (projection, layer)
    return plan


def merged_weight(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """W + B·A·scale, computed in float32, returned in float32: W [out, in], A [r, in], B [out, r]."""
    return weight.astype(np.float32) + (lora_b.astype(np.float32) @ lora_a.astype(np.float32)) * np.float32(scale)


def merge_lora_to_hf(base: str | os.PathLike, adapter_dir: str | os.PathLike, dst: str | os.PathLike, *,
                     dtype=None, max_shard_size: str | int = "5GB", progress: bool = True) -> Path:
    """Write the HF `MistralForCausalLM` directory `dst` = `base` with the PEFT adapter in `adapter_dir` folded in."""
    base, dst = Path(base), Path(dst)
    reader = open_checkpoint(base)
    config = _base_config(base, reader)
    adapter = read_peft_adapter(adapter_dir, config.num_hidden_layers)
    plan = _merge_plan(adapter, config, reader)
    out_dtype = numpy_dtype(dtype)
    specs = [TensorSpec(name, reader.spec(name).shape, out_dtype or reader.spec(name).dtype) for name in reader.names()]
    with atomic_output_dir(dst) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, parse_size(max_shard_size))
        for spec in tqdm(specs, unit="tensor", desc="merge-lora", disable=not progress):
            weight = reader.read(spec.name)
            if spec.name in plan:
                weight = merged_weight(weight, *adapter.pair(*plan[spec.name]), adapter.config.scale)
            writer.write(spec.name, weight.astype(spec.dtype, copy=False))
        writer.finish()
        main_dtype = max({s.dtype for s in specs}, key=lambda d: sum(s.nbytes for s in specs if s.dtype == d))
        _write_sidecar_files(base, reader, config, main_dtype, staging)
    return dst


def _write_sidecar_files(base: Path, reader, config: MistralConfig, dtype: np.dtype, staging: Path) -> None:
    """config.json, generation_config.json and the tokenizer, from whichever kind of base it is."""
    if isinstance(reader, BmxCheckpointReader):
        hf_config = hf_config_json(base, config, dtype)
        sidecar_dir, tokenizer_dir = base / HF_SIDECAR_DIR, base / TOKENIZER_DIR
        tokenizer_files = list(tokenizer_dir.iterdir()) if tokenizer_dir.is_dir() else []
    else:
        hf_config = json.loads((base / "config.json").read_text())
        hf_config["torch_dtype"] = dtype.name if dtype.name in ("float32", "float16", "bfloat16") else str(dtype)
        sidecar_dir = base
        tokenizer_files = [base / name for name in TOKENIZER_FILES if (base / name).is_file()]
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if (sidecar_dir / "generation_config.json").is_file():
        shutil.copy2(sidecar_dir / "generation_config.json", staging / "generation_config.json")
    for file in tokenizer_files:
        shutil.copy2(file, staging / file.name)
