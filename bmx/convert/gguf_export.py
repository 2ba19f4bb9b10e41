"""bmx checkpoint or HF directory → one GGUF file for llama.cpp, Ollama and LM Studio.

Written as llama.cpp's own `convert_hf_to_gguf.py` writes a `MistralForCausalLM` (its `LlamaModel`
class, architecture `llama`): the same metadata keys, vocabulary, tensor names and layouts, with
gguf-py's `GGUFWriter` and `gguf.quants.quantize`. Two differences, both deliberate:
- `llama.attention.sliding_window` is written when the model has one (Mistral v0.1: 4096). The
  converter leaves it out and llama.cpp's `llama` architecture does not read it, so llama.cpp
  attends over the whole context: the same model up to `sliding_window` tokens, not beyond.
- `tokenizer.ggml.unknown_token_id` comes from the SentencePiece model when the HF tokenizer files
  do not name it (the converter then writes none).

Types: those gguf-py can quantize in NumPy (its k-quants and i-quants only dequantize). Norms and
other 1-D tensors stay float32, as in the converter; a row length the type's block does not divide
falls back to float16, as there. Quantized checkpoints (AWQ, NF4, int8...) are refused: their
4-bit codes do not map onto GGUF's blocks, and quantizing dequantized codes again would compound
the error; export the float checkpoint they were made from.

The file is streamed: every tensor's name, shape and type is declared up front, then one tensor at
a time is read, re-laid-out, quantized and appended. It is written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm.auto import tqdm

from bmx.convert.gguf_vocab import SENTENCEPIECE_FILE, add_vocab, sentencepiece_vocab
from bmx.convert.hf import HF_SIDECAR_DIR, _validate_hf, open_checkpoint
from bmx.convert.mistral_table import hf_tensor_order, mistral_table
from bmx.convert.safetensors_io import CheckpointFormatError
from bmx.model.checkpoint import METADATA_FILE, TOKENIZER_DIR
from bmx.model.config import MistralConfig

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
}

# HF tensor name → llama.cpp's (gguf's MODEL_TENSOR names for the `llama` architecture).
GGUF_TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER_TENSOR_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str, layer: int | None) -> str:
    if layer is None:
        return GGUF_TENSOR_NAMES[hf_name]
    return f"blk.{layer}." + GGUF_LAYER_TENSOR_NAMES[hf_name.removeprefix(f"model.layers.{layer}.")]


def rotary_rows_interleaved(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF's q/k rows → llama.cpp's: per head, rows (i, i + head_dim/2) become neighbours (2i, 2i + 1).

    HF's rotary embedding rotates the two halves of each head against each other; llama.cpp's
    "normal" RoPE rotates consecutive pairs. This is the converter's `LlamaModel.permute`.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # HF / NumPy order ([out, in]); GGUF stores it reversed
    qtype: gguf.GGMLQuantizationType

    @property
    def stored_dtype(self) -> np.dtype:
        """What `gguf.quants.quantize` returns: float32/float16 arrays, or the bytes of any other type."""
        return np.dtype({Q.F32: np.float32, Q.F16: np.float16}.get(self.qtype, np.uint8))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.stored_dtype != np.uint8:
            return self.shape
        return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored_shape)) * self.stored_dtype.itemsize


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32  # llama.cpp's kernels take norms and 1-D tensors in float32 only
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size:
        print(f"bmx-to-gguf: {gguf_name} rows of {shape[-1]} are not whole {qtype.name} blocks of {block_size}: "
              "written as F16", file=sys.stderr)
        return Q.F16
    return qtype


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointFormatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object")
    return values


def _refuse_quantized(src: Path) -> None:
    metadata, hf_config = src / METADATA_FILE, src / "config.json"
    if metadata.is_file() and "quantization" in (values := _read_json(metadata)):
        method = values["quantization"].get("scheme", {}).get("method")
        raise CheckpointFormatError(f"{src} is a quantized ({method}) bmx checkpoint: GGUF export needs float weights; "
                                    "export the float checkpoint it was quantized from")
    if not metadata.is_file() and hf_config.is_file() and "quantization_config" in (values := _read_json(hf_config)):
        method = values["quantization_config"].get("quant_method")
        raise CheckpointFormatError(f"{hf_config}: a quantized ({method}) model: GGUF export needs float weights; "
                                    "export the float model it was quantized from")


def _source(src: Path):
    """(reader with HF names, config, HF config dict, tokenizer directory or None) of either kind of input."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory (expected a bmx checkpoint or a Hugging Face model directory)")
    _refuse_quantized(src)
    reader = open_checkpoint(src)
    if (src / METADATA_FILE).is_file():
        config = reader.config
        sidecar = src / HF_SIDECAR_DIR / "config.json"
        hf_config = _read_json(sidecar) if sidecar.is_file() else config.to_hf()
        tokenizer_dir = src / TOKENIZER_DIR
    else:
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src / 'config.json'} not found: {src} is neither a bmx checkpoint "
                                    "nor a Hugging Face model directory")
        hf_config = _read_json(src / "config.json")
        try:
            config = MistralConfig.from_hf(hf_config)
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointFormatError(f"{src / 'config.json'}: {error}") from None
        _validate_hf(reader, config, mistral_table(config))
        tokenizer_dir = src
    return reader, config, hf_config, tokenizer_dir if tokenizer_dir.is_dir() else None


def _sentencepiece_file(tokenizer_dir: Path | None, config: MistralConfig, src: Path) -> Path:
    if tokenizer_dir is not None and (tokenizer_dir / SENTENCEPIECE_FILE).is_file():
        return tokenizer_dir / SENTENCEPIECE_FILE
    if tokenizer_dir is not None and any(tokenizer_dir.glob("tokenizer*.json")):
        raise CheckpointFormatError(f"{tokenizer_dir}: no {SENTENCEPIECE_FILE}; bmx writes GGUF vocabularies from "
                                    "the SentencePiece model (Mistral's tokenizer), not from tokenizer.json alone")
    if config.vocab_size != 32000:
        raise CheckpointFormatError(f"{src} has no tokenizer files and a vocab_size of {config.vocab_size}, not the "
                                    "Mistral v0.1 tokenizer's 32000: put its tokenizer.model in the checkpoint")
    from bmx.tokenizer import mistral_v01_model_path

    print(f"bmx-to-gguf: {src} has no tokenizer files; writing the Mistral v0.1 vocabulary (32000 pieces)",
          file=sys.stderr)
    return mistral_v01_model_path()


def _add_general_metadata(writer: gguf.GGUFWriter, src: Path) -> None:
    """general.name, size_label, basename...: gguf's own heuristics over the directory name and any model card."""
    total, shared, experts, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, src, None, total)
    if metadata.name is None:
        metadata.name = src.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, experts, expert_count)
    metadata.set_gguf_meta_model(writer)


def _add_hyperparameters(writer: gguf.GGUFWriter, config: MistralConfig, file_type: gguf.LlamaFileType) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def plan_tensors(config: MistralConfig, qtype: gguf.GGMLQuantizationType) -> list[PlannedTensor]:
    plan = []
    for hf_name, row, layer in hf_tensor_order(config):
        name = gguf_tensor_name(hf_name, layer)
        plan.append(PlannedTensor(hf_name, name, row.hf_shape, _tensor_type(name, row.hf_shape, qtype)))
    return plan


def gguf_tensor_data(weight: np.ndarray, tensor: PlannedTensor, config: MistralConfig) -> np.ndarray:
    """The bytes (as an array) llama.cpp stores for one HF tensor: float32 or float16 in, re-laid-out, quantized."""
    if weight.dtype not in (np.float16, np.float32):
        weight = weight.astype(np.float32)  # bfloat16 exactly, as the converter does
    if tensor.hf_name.endswith("q_proj.weight"):
        weight = rotary_rows_interleaved(weight, config.num_attention_heads)
    elif tensor.hf_name.endswith("k_proj.weight"):
        weight = rotary_rows_interleaved(weight, config.num_key_value_heads)
    return gguf.quants.quantize(np.ascontiguousarray(weight), tensor.qtype)


def bmx_to_gguf(src: str | os.PathLike, dst: str | os.PathLike, gguf_type: str = "f16", *,
                progress: bool = True) -> Path:
    """Write the GGUF file `dst` from a float bmx checkpoint or HF Mistral directory `src`."""
    src, dst = Path(src), Path(dst)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unsupported GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new output file")
    qtype, file_type = GGUF_TYPES[gguf_type]
    reader, config, hf_config, tokenizer_dir = _source(src)
    vocab = sentencepiece_vocab(_sentencepiece_file(tokenizer_dir, config, src), config.vocab_size, tokenizer_dir)
    plan = plan_tensors(config, qtype)

    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        for tensor in plan:
            writer.add_tensor_info(tensor.gguf_name, tensor.stored_shape, tensor.stored_dtype, tensor.nbytes,
                                   raw_dtype=tensor.qtype)
        writer.add_type(gguf.GGUFType.MODEL)
        _add_general_metadata(writer, src)
        _add_hyperparameters(writer, config, file_type)
        add_vocab(writer, tokenizer_dir, hf_config, vocab)
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tqdm(plan, unit="tensor", desc=f"bmx → gguf {gguf_type}", disable=not progress):
            writer.write_tensor_data(gguf_tensor_data(np.asarray(reader.read(tensor.hf_name)), tensor, config))
        writer.close()
        os.replace(partial, dst)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return dst
