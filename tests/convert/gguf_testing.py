"""The tiny Mistral the GGUF tests and `bench/gguf_llama_cpp.py` share, and a GGUF file read back.

Its weights come from integer arithmetic, not a random generator, so the same bytes are written on
every machine and NumPy version: the per-tensor hashes that llama.cpp's converter produced from it
(`gguf_llama_cpp_reference.json`) stay comparable. The directory looks like a Mistral-7B-v0.1 repo:
bf16 safetensors, transformers' config.json, `tokenizer.model` (Mistral v0.1's, from
mistral-common), its `tokenizer.json` and the repo's `tokenizer_config.json`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

TINY_NAME = "tiny-mistral"  # general.name in the GGUF comes from the directory name
TINY_CONFIG = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=256,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"
TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "legacy": True, "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
    "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
    "chat_template": CHAT_TEMPLATE,
    "added_tokens_decoder": {str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
                             for i, text in enumerate(["<unk>", "<s>", "</s>"])},
}


def deterministic_weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values in about [-0.1, 0.1) from a multiplicative hash of the index: the same bits everywhere."""
    index = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(seed) * np.uint64(1_000_003)
    hashed = (index * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    return ((hashed.astype(np.float64) / 2**32 - 0.5) * 0.2).astype(np.float32).reshape(shape)


def write_tiny_mistral(parent: Path, name: str = TINY_NAME) -> Path:
    """An HF Mistral directory `parent/name` (bf16 weights), as described above."""
    from transformers import AutoTokenizer, MistralConfig

    from bmx.convert.mistral_table import hf_tensor_order
    from bmx.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec
    from bmx.model.config import MistralConfig as BmxConfig
    from bmx.tokenizer import mistral_v01_model_path

    out = Path(parent) / name
    out.mkdir(parents=True)
    MistralConfig(**TINY_CONFIG, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
                  architectures=["MistralForCausalLM"]).save_pretrained(out)
    order = hf_tensor_order(BmxConfig.from_hf(json.loads((out / "config.json").read_text())))
    specs = [TensorSpec(hf_name, row.hf_shape, np.dtype(ml_dtypes.bfloat16)) for hf_name, row, _ in order]
    writer = ShardedSafetensorsWriter(out, specs, max_shard_bytes=1 << 40)
    for seed, spec in enumerate(specs):
        weight = deterministic_weights(spec.shape, seed)
        if spec.name.endswith("norm.weight"):
            weight = 1.0 + weight  # norms near one, as trained models have them
        writer.write(spec.name, weight.astype(ml_dtypes.bfloat16))
    writer.finish()
    shutil.copy(mistral_v01_model_path(), out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(str(out)).backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return out


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, default=lambda v: v.decode("latin-1")).encode()).hexdigest()


def gguf_summary(file) -> dict:
    """Every metadata key (value types, value; long lists as length + hash) and every tensor (shape, type,
    bytes hash) of a GGUF file (a path or a `GGUFReader`)."""
    from gguf import GGUFReader

    reader = file if isinstance(file, GGUFReader) else GGUFReader(file)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and len(value) > 16:
            value = {"length": len(value), "sha256": _digest(value)}
        metadata[key] = {"types": [kind.name for kind in field.types], "value": value}
    tensors = {tensor.name: {"shape": [int(n) for n in tensor.shape], "type": tensor.tensor_type.name,
                             "sha256": hashlib.sha256(np.ascontiguousarray(tensor.data).tobytes()).hexdigest()}
               for tensor in reader.tensors}
    return {"metadata": metadata, "tensors": tensors}
