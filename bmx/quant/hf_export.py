"""Quantized models ⇄ Hugging Face directories in the layouts AutoAWQ and transformers write.

- AWQ / RTN: AutoAWQ's GEMM layout, `<linear>.qweight` int32 `[in, out/8]`, `<linear>.qzeros` int32
  `[in/group, out/8]`, `<linear>.scales` float16 `[in/group, out]`, the other tensors in float16, and
  `quantization_config = {quant_method: awq, bits: 4, group_size, zero_point: true, version: gemm}`.
- NF4 / FP4: what transformers saves for a bitsandbytes 4-bit model: `<linear>.weight` uint8
  `[numel/2, 1]` (packed codes) with `.absmax`, `.quant_map`, optionally `.nested_absmax` and
  `.nested_quant_map`, and `.quant_state.bitsandbytes__<type>` (the remaining fields as UTF-8 JSON);
  the other tensors in the model's dtype; `quantization_config.quant_method: bitsandbytes`.

The float tensors go through `bmx.convert.mistral_table`, the one table of HF names ↔ bmx paths.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from bmx.convert.mistral_table import mistral_table
from bmx.convert.safetensors_io import (
    CheckpointFormatError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    parse_size,
)
from bmx.model.config import MistralConfig
from bmx.model.mistral import Mistral
from bmx.quant import bnb4
from bmx.quant.checkpoint import model_from_arrays
from bmx.quant.model import LINEAR_PATHS, is_quantized, linear_at
from bmx.quant.schemes import AwqScheme, Bnb4Scheme, Scheme

AWQ_TENSORS = ("qweight", "qzeros", "scales")
EXPORTABLE_METHODS = ("awq", "rtn", "nf4", "fp4")
BNB_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                   np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def _linear_name(layer: int, path: str) -> str:
    return f"model.layers.{layer}.{path}"


def _float_rows(config: MistralConfig):
    """Rows of the HF ↔ bmx table that are not quantized linears (embedding, norms, head)."""
    quantized = {("model", "layers", *path.split("."), "kernel") for path in LINEAR_PATHS}
    return [row for row in mistral_table(config) if row.bmx_path not in quantized]


def _array_at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


# ---- export ---------------------------------------------------------------------------------------

EXPORT_FORMATS = ("transformers", "compressed-tensors")


def check_exportable(method: str, export_format: str = "transformers", outlier_threshold: float | None = None) -> None:
    """int8 has no transformers layout here: bnb's 8-bit layout cannot hold bmx's 16-bit outlier columns."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if export_format == "compressed-tensors":
        from bmx.quant.compressed_tensors_export import check_compressed_tensors_exportable

        check_compressed_tensors_exportable(method, outlier_threshold)
        return
    if method not in EXPORTABLE_METHODS:
        raise ValueError(f"{method} checkpoints are kept in bmx's format only; --export-hf supports "
                         f"{', '.join(EXPORTABLE_METHODS)} (int8: --format compressed-tensors)")


def _awq_tensors(arrays: dict, layer: int) -> dict[str, np.ndarray]:
    return {name: np.asarray(arrays[name][layer]) for name in AWQ_TENSORS}


def _bnb_tensors(arrays: dict, layer: int, scheme: Bnb4Scheme, shape: tuple[int, int], dtype: np.dtype):
    state = {"quant_type": scheme.quant_type, "blocksize": scheme.blocksize, "dtype": BNB_DTYPE_NAMES[dtype],
             "shape": list(shape)}
    tensors = {"": np.asarray(arrays["packed"][layer]).reshape(-1, 1), ".absmax": np.asarray(arrays["absmax"][layer]),
               ".quant_map": bnb4.CODES[scheme.quant_type]}
    if scheme.double_quant:
        tensors[".nested_absmax"] = np.asarray(arrays["nested_absmax"][layer])
        tensors[".nested_quant_map"] = bnb4.DYNAMIC_CODE
        state.update(nested_blocksize=bnb4.NESTED_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=float(np.asarray(arrays["nested_offset"][layer])))
    tensors[f".quant_state.bitsandbytes__{scheme.quant_type}"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    return tensors


def _quantization_config(scheme: Scheme, compute_dtype: str) -> dict:
    if isinstance(scheme, AwqScheme):
        return {"quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    return {"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True,
            "load_in_8bit": False, "bnb_4bit_quant_type": scheme.quant_type,
            "bnb_4bit_use_double_quant": scheme.double_quant, "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False}


def export_hf(model: Mistral, out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
              max_shard_size: str | int = "5GB", progress: bool = True, export_format: str = "transformers") -> Path:
    """Write a quantized `model` as an HF directory loadable by AutoAWQ / transformers + bitsandbytes,
    or with `export_format="compressed-tensors"` in llm-compressor's layout for vLLM.

    `source`: the bmx checkpoint it came from, for the tokenizer and generation config.
    """
    if not is_quantized(model):
        raise ValueError("export_hf expects a model quantized by bmx.quant")
    if export_format == "compressed-tensors":
        from bmx.quant.compressed_tensors_export import export_compressed_tensors

        return export_compressed_tensors(model, out_dir, source=source, max_shard_size=max_shard_size,
                                         progress=progress)
    import jax
    from flax import nnx

    config = model.config
    scheme = linear_at(model.model.layers, LINEAR_PATHS[0]).scheme
    check_exportable(scheme.method)
    params = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    float_dtype = np.dtype(np.float16) if isinstance(scheme, AwqScheme) else params["model"]["embed_tokens"]["weight"].dtype
    tensors: dict[str, np.ndarray] = {}
    for row in _float_rows(config):
        stored = _array_at(params, row.bmx_path)
        for layer, name in enumerate(row.hf_names(config.num_hidden_layers)):
            value = row.to_hf(stored[layer] if row.per_layer else stored)
            if float_dtype == np.float16 and np.abs(value.astype(np.float32)).max() > np.finfo(np.float16).max:
                raise ValueError(f"tensor {name} exceeds float16's range; AutoAWQ's layout stores it in float16")
            tensors[name] = np.ascontiguousarray(value.astype(float_dtype))
    for layer in range(config.num_hidden_layers):
        for path in LINEAR_PATHS:
            linear = linear_at(model.model.layers, path)
            arrays = _array_at(params, ("model", "layers", *path.split(".")))
            if isinstance(scheme, AwqScheme):
                for suffix, value in _awq_tensors(arrays, layer).items():
                    tensors[f"{_linear_name(layer, path)}.{suffix}"] = value
            else:
                shape = (int(np.prod(linear.out_shape)), int(np.prod(linear.in_shape)))
                for suffix, value in _bnb_tensors(arrays, layer, scheme, shape, float_dtype).items():
                    tensors[f"{_linear_name(layer, path)}.weight{suffix}"] = value
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = BNB_DTYPE_NAMES[np.dtype(float_dtype)]
    hf_config["quantization_config"] = _quantization_config(scheme, BNB_DTYPE_NAMES[np.dtype(float_dtype)])
    specs = [TensorSpec(name, value.shape, value.dtype) for name, value in tensors.items()]
    with atomic_output_dir(out_dir) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, parse_size(max_shard_size))
        for spec in tqdm(specs, desc=f"export {scheme.method} → hf", unit="tensor", disable=not progress):
            writer.write(spec.name, tensors[spec.name])
        writer.finish()
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _copy_tokenizer_and_generation_config(source, staging)
    return Path(out_dir)


def _copy_tokenizer_and_generation_config(source, staging: Path) -> None:
    generation = {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True}
    if source is not None:
        source = Path(source)
        if (source / "hf" / "generation_config.json").is_file():
            generation = json.loads((source / "hf" / "generation_config.json").read_text())
        tokenizer_dir = source / "tokenizer"
        if tokenizer_dir.is_dir():
            for file in tokenizer_dir.iterdir():
                shutil.copy2(file, staging / file.name)
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ---- import ---------------------------------------------------------------------------------------

def _scheme_from_hf(quantization_config: dict, directory: Path) -> Scheme:
    method = quantization_config.get("quant_method")
    if method == "awq":
        expected = {"bits": 4, "zero_point": True, "version": "gemm"}
        for key, value in expected.items():
            if str(quantization_config.get(key)).lower() != str(value).lower():
                raise CheckpointFormatError(f"{directory}: AWQ {key}={quantization_config.get(key)!r} is not supported "
                                            f"(bmx reads {expected})")
        return AwqScheme(group_size=int(quantization_config["group_size"]))
    if method == "bitsandbytes" and quantization_config.get("load_in_4bit"):
        return Bnb4Scheme(quant_type=quantization_config.get("bnb_4bit_quant_type", "fp4"),
                          double_quant=bool(quantization_config.get("bnb_4bit_use_double_quant", False)))
    raise CheckpointFormatError(f"{directory}: quantization_config {quantization_config!r} is neither AWQ GEMM 4-bit "
                                "nor bitsandbytes 4-bit")


def _read_awq_linear(reader: SafetensorsReader, name: str) -> dict[str, np.ndarray]:
    return {suffix: np.asarray(reader.read(f"{name}.{suffix}")) for suffix in AWQ_TENSORS}


def _read_bnb_linear(reader: SafetensorsReader, name: str, scheme: Bnb4Scheme, shape: tuple[int, int]):
    state_name = f"{name}.weight.quant_state.bitsandbytes__{scheme.quant_type}"
    if state_name not in reader:
        raise CheckpointFormatError(f"{reader.directory}: {state_name} is missing")
    state = json.loads(bytes(np.asarray(reader.read(state_name))).decode())
    if state.get("blocksize") != scheme.blocksize or tuple(state.get("shape", ())) != shape:
        raise CheckpointFormatError(f"{reader.directory}: {name} has blocksize {state.get('blocksize')} and shape "
                                    f"{state.get('shape')}, expected {scheme.blocksize} and {list(shape)}")
    if not np.array_equal(np.asarray(reader.read(f"{name}.weight.quant_map")), bnb4.CODES[scheme.quant_type]):
        raise CheckpointFormatError(f"{reader.directory}: {name}.weight.quant_map is not bitsandbytes' "
                                    f"{scheme.quant_type} code")
    arrays = {"packed": np.asarray(reader.read(f"{name}.weight")).reshape(-1),
              "absmax": np.asarray(reader.read(f"{name}.weight.absmax"))}
    if scheme.double_quant:
        if not np.array_equal(np.asarray(reader.read(f"{name}.weight.nested_quant_map")), bnb4.DYNAMIC_CODE):
            raise CheckpointFormatError(f"{reader.directory}: {name}.weight.nested_quant_map is not bitsandbytes' "
                                        "dynamic 8-bit code")
        arrays["nested_absmax"] = np.asarray(reader.read(f"{name}.weight.nested_absmax"))
        arrays["nested_offset"] = np.asarray(state["nested_offset"], np.float32)
    return arrays


def import_hf(hf_dir: str | os.PathLike, *, compute_dtype=None) -> Mistral:
    """A quantized bmx model from an AutoAWQ GEMM or transformers bitsandbytes 4-bit directory."""
    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {hf_dir} is not a Hugging Face model directory")
    hf_config = json.loads(config_file.read_text())
    if "quantization_config" not in hf_config:
        raise CheckpointFormatError(f"{config_file} has no quantization_config: not a quantized model")
    scheme = _scheme_from_hf(hf_config.pop("quantization_config"), hf_dir)
    config = MistralConfig.from_hf(hf_config)
    reader = SafetensorsReader(hf_dir)
    params: dict = {}

    def put(path: tuple[str, ...], value) -> None:
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for row in _float_rows(config):
        names = row.hf_names(config.num_hidden_layers)
        missing = [name for name in names if name not in reader]
        if missing:
            raise CheckpointFormatError(f"{hf_dir}: tensor {missing[0]!r} is missing")
        blocks = [row.to_bmx(np.asarray(reader.read(name))) for name in names]
        put(row.bmx_path, np.stack(blocks) if row.per_layer else blocks[0])
    shapes = _linear_shapes(config)
    for path in LINEAR_PATHS:
        per_layer = []
        for layer in range(config.num_hidden_layers):
            name = _linear_name(layer, path)
            if isinstance(scheme, AwqScheme):
                per_layer.append(_read_awq_linear(reader, name))
            else:
                per_layer.append(_read_bnb_linear(reader, name, scheme, shapes[path]))
        put(("model", "layers", *path.split(".")), {key: np.stack([arrays[key] for arrays in per_layer])
                                                    for key in per_layer[0]})
    return model_from_arrays(config, scheme, params, compute_dtype=compute_dtype)


def _linear_shapes(config: MistralConfig) -> dict[str, tuple[int, int]]:
    """transformers' `[out, in]` shape of each decoder linear."""
    attention = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    hidden, mlp = config.hidden_size, config.intermediate_size
    return {"self_attn.q_proj": (attention, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, attention), "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
            "mlp.down_proj": (hidden, mlp)}

