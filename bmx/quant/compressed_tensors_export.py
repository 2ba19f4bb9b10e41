"""Quantized models → the `compressed-tensors` layout (llm-compressor's), which vLLM serves.

Both bmx schemes that have one are written in `pack-quantized`, the format compressed-tensors
itself infers for weight-only integer schemes and the one vLLM's `CompressedTensorsWNA16` reads
(its `int-quantized` is for schemes that quantize activations too):

- AWQ / RTN → W4A16, group `group_size`, asymmetric: per linear `weight_packed` int32 `[out, in/8]`
  (eight consecutive inputs per int32, input 8j+k in bits 4k..4k+3, stored as q + 8), `weight_scale`
  float16 `[out, in/group]` (AWQ's scales exactly), `weight_zero_point` int32 `[out/8, in/group]`
  (packed the same way along the outputs) and `weight_shape` int64 `[out, in]`. AWQ's code c and
  zero z are compressed-tensors' q = c − 8 and zp = z − 8: (q − zp)·s = (c − z)·s. The other
  tensors are float16, as in AutoAWQ's layout (the scales are float16 already).
- int8 → W8A16, per output channel, symmetric: `weight_packed` int32 `[out, in/4]` (q + 128 in
  each byte), `weight_scale` float32 `[out, 1]` = row absmax × (1/127), `weight_shape`. bmx computes
  (q × absmax) × (1/127) (bitsandbytes' order), compressed-tensors q × scale: within one float32
  rounding of each other. int8 with LLM.int8 outlier columns has no such layout and is refused.

`quantization_config`: `quant_method: compressed-tensors`, one config group targeting `Linear`,
`ignore: [lm_head]`, `quantization_status: compressed`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bmx.convert.mistral_table import hf_tensor_order
from bmx.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec, atomic_output_dir, parse_size
from bmx.model.mistral import Mistral
from bmx.quant import awq_format
from bmx.quant.hf_export import BNB_DTYPE_NAMES, _array_at, _copy_tokenizer_and_generation_config, _linear_shapes
from bmx.quant.int8 import INV_127
from bmx.quant.model import LINEAR_PATHS, is_quantized, linear_at
from bmx.quant.schemes import AwqScheme, Int8Scheme, Scheme

COMPRESSED_TENSORS_METHODS = ("awq", "rtn", "int8")
FORMAT = "pack-quantized"
PACKED_WEIGHT = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def check_compressed_tensors_exportable(method: str, outlier_threshold: float | None = None) -> None:
    if method not in COMPRESSED_TENSORS_METHODS:
        raise ValueError(f"{method} has no compressed-tensors layout here; --format compressed-tensors supports "
                         f"{', '.join(COMPRESSED_TENSORS_METHODS)} (nf4/fp4: use the default format)")
    if method == "int8" and outlier_threshold is not None:
        raise ValueError("int8 with LLM.int8 outlier columns (--calib or --outlier-threshold) has no "
                         "compressed-tensors layout; quantize int8 without calibration for W8A16")


def pack_int32(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Signed `bits`-bit integers → int32, 32/bits consecutive values along `axis` per word, value
    k of each word offset by 2^(bits−1) in bits k·bits..(k+1)·bits − 1 (compressed-tensors' `pack_to_int32`)."""
    per_word = 32 // bits
    values = np.moveaxis(np.asarray(values, np.int64) + (1 << (bits - 1)), axis, -1)
    if values.shape[-1] % per_word:
        raise ValueError(f"{values.shape[-1]} values do not fill whole int32 words of {per_word}")
    words = values.reshape(*values.shape[:-1], -1, per_word).astype(np.uint32)
    packed = np.zeros(words.shape[:-1], np.uint32)
    for k in range(per_word):
        packed |= words[..., k] << np.uint32(bits * k)
    return np.moveaxis(packed.view(np.int32), -1, axis)


def _awq_linear(arrays: dict, layer: int) -> dict[str, np.ndarray]:
    codes = np.asarray(awq_format.unpack_columns(np.asarray(arrays["qweight"][layer]))).T  # [out, in], 0..15
    zeros = np.asarray(awq_format.unpack_columns(np.asarray(arrays["qzeros"][layer]))).T  # [out, in/group]
    offset = 1 << (awq_format.BITS - 1)
    return {"weight_packed": pack_int32(codes - offset, awq_format.BITS, axis=1),
            "weight_scale": np.ascontiguousarray(np.asarray(arrays["scales"][layer]).T),
            "weight_zero_point": pack_int32(zeros - offset, awq_format.BITS, axis=0),
            "weight_shape": np.asarray(codes.shape, np.int64)}


def _int8_linear(arrays: dict, layer: int) -> dict[str, np.ndarray]:
    weight = np.asarray(arrays["weight"][layer])  # [out, in] int8
    scale = (np.asarray(arrays["scale"][layer], np.float32) * INV_127)[:, None]
    return {"weight_packed": pack_int32(weight, 8, axis=1), "weight_scale": scale,
            "weight_shape": np.asarray(weight.shape, np.int64)}


def _weight_args(scheme: Scheme) -> dict:
    common = {"type": "int", "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
              "observer_kwargs": {}}
    if isinstance(scheme, AwqScheme):
        return {**common, "num_bits": 4, "strategy": "group", "group_size": scheme.group_size, "symmetric": False}
    return {**common, "num_bits": 8, "strategy": "channel", "group_size": None, "symmetric": True}


def compressed_tensors_config(scheme: Scheme) -> dict:
    """The `quantization_config` entry of config.json that vLLM and transformers read."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        version = "0.20.1"  # the layout as of this version; the package is not needed to write it
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": _weight_args(scheme),
                                          "input_activations": None, "output_activations": None, "format": FORMAT}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": version}


def export_compressed_tensors(model: Mistral, out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                              max_shard_size: str | int = "5GB", progress: bool = True) -> Path:
    """Write a quantized `model` (AWQ/RTN or plain int8) as a compressed-tensors HF directory."""
    if not is_quantized(model):
        raise ValueError("export_compressed_tensors expects a model quantized by bmx.quant")
    import jax
    from flax import nnx

    config = model.config
    scheme = linear_at(model.model.layers, LINEAR_PATHS[0]).scheme
    params = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    check_compressed_tensors_exportable(scheme.method)
    if isinstance(scheme, Int8Scheme) and any("outlier_columns" in _array_at(params, ("model", "layers", *path.split(".")))
                                              for path in LINEAR_PATHS):
        check_compressed_tensors_exportable("int8", outlier_threshold=scheme.outlier_threshold or 0.0)
    float_dtype = np.dtype(np.float16) if isinstance(scheme, AwqScheme) else params["model"]["embed_tokens"]["weight"].dtype
    linear_tensors = _awq_linear if isinstance(scheme, AwqScheme) else _int8_linear
    quantized_paths = {("model", "layers", *path.split("."), "kernel"): path for path in LINEAR_PATHS}

    def tensors():
        """(name, array) in transformers' order, one layer's slice at a time."""
        for hf_name, row, layer in hf_tensor_order(config):
            if row.bmx_path in quantized_paths:
                arrays = _array_at(params, row.bmx_path[:-1])
                prefix = hf_name.removesuffix(".weight")
                for suffix, value in linear_tensors(arrays, layer).items():
                    yield f"{prefix}.{suffix}", value
                continue
            stored = _array_at(params, row.bmx_path)
            value = row.to_hf(stored[layer] if row.per_layer else stored).astype(float_dtype)
            if float_dtype == np.float16 and not np.isfinite(value).all():
                raise ValueError(f"tensor {hf_name} exceeds float16's range; this layout stores it in float16")
            yield hf_name, np.ascontiguousarray(value)

    linear_shapes = _linear_shapes(config)
    specs = []
    for hf_name, row, _ in hf_tensor_order(config):
        if row.bmx_path in quantized_paths:
            specs += _linear_specs(hf_name.removesuffix(".weight"), scheme, *linear_shapes[quantized_paths[row.bmx_path]])
        else:
            specs.append(TensorSpec(hf_name, row.hf_shape, float_dtype))
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = BNB_DTYPE_NAMES[np.dtype(float_dtype)]
    hf_config["quantization_config"] = compressed_tensors_config(scheme)
    with atomic_output_dir(out_dir) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, parse_size(max_shard_size))
        for name, value in tqdm(tensors(), total=len(specs), desc=f"export {scheme.method} → compressed-tensors",
                                unit="tensor", disable=not progress):
            writer.write(name, value)
        writer.finish()
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _copy_tokenizer_and_generation_config(source, staging)
    return Path(out_dir)


def _linear_specs(prefix: str, scheme: Scheme, out_features: int, in_features: int) -> list[TensorSpec]:
    shape = TensorSpec(f"{prefix}.weight_shape", (2,), np.dtype(np.int64))
    if isinstance(scheme, AwqScheme):
        groups = in_features // scheme.group_size
        return [TensorSpec(f"{prefix}.weight_packed", (out_features, in_features // 8), np.dtype(np.int32)),
                TensorSpec(f"{prefix}.weight_scale", (out_features, groups), np.dtype(np.float16)),
                TensorSpec(f"{prefix}.weight_zero_point", (out_features // 8, groups), np.dtype(np.int32)), shape]
    return [TensorSpec(f"{prefix}.weight_packed", (out_features, in_features // 4), np.dtype(np.int32)),
            TensorSpec(f"{prefix}.weight_scale", (out_features, 1), np.dtype(np.float32)), shape]
