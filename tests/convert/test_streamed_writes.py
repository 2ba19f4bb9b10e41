"""The fast write paths of conversion: tiled layout copies, chunking, background safetensors writes."""

import errno

import ml_dtypes
import numpy as np
import pytest
import torch
from hf_reference import save_tiny_hf_model
from safetensors.numpy import load_file

from bmx.convert import hf_to_bmx
from bmx.convert.contiguous import contiguous_copy
from bmx.convert.mistral_table import mistral_table
from bmx.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec
from bmx.model import MistralConfig
from bmx.model.checkpoint import open_param

# Sizes that are no multiple of the tile below, so every layout crosses ragged tile edges.
CONFIG = MistralConfig(vocab_size=70, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_tiled_copy_equals_numpy_for_every_layout_of_the_table(dtype):
    rng = np.random.default_rng(0)
    for row in mistral_table(CONFIG):
        hf = rng.standard_normal(row.hf_shape).astype(dtype)
        to_bmx = row.to_bmx(hf)
        assert same_bits(contiguous_copy(to_bmx, tile=5), np.ascontiguousarray(to_bmx)), row.hf_name
        back = row.to_hf(np.ascontiguousarray(to_bmx))
        assert same_bits(contiguous_copy(back, tile=5), np.ascontiguousarray(back)), row.hf_name
        assert contiguous_copy(to_bmx, tile=5).flags.c_contiguous


def test_stacked_parameters_are_stored_one_layer_per_chunk_and_the_embedding_whole(tmp_path):
    save_tiny_hf_model(tmp_path / "hf", dtype=torch.bfloat16)
    hf_to_bmx(tmp_path / "hf", tmp_path / "bmx", progress=False)
    embedding = open_param(tmp_path / "bmx", ("model", "embed_tokens", "weight"))
    assert tuple(embedding.chunk_layout.read_chunk.shape) == tuple(embedding.shape)
    gate = open_param(tmp_path / "bmx", ("model", "layers", "mlp", "gate_proj", "kernel"))
    assert tuple(gate.chunk_layout.read_chunk.shape) == (1, *gate.shape[1:])


def test_background_writes_read_back_bit_for_bit_with_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.standard_normal((7, 5 + i)).astype(ml_dtypes.bfloat16) for i in range(5)}
    tensors["scalar"] = np.array(3.5, np.float32)
    specs = [TensorSpec(name, value.shape, value.dtype) for name, value in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=150)  # several shards
    for name, value in tensors.items():
        writer.write(name, value)
    writer.finish()
    assert len(writer.file_names) > 1
    loaded = {}
    for file in writer.file_names:
        loaded.update(load_file(tmp_path / file))
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].tobytes() == value.tobytes() and loaded[name].shape == value.shape, name


def test_a_failed_background_write_reaches_the_caller(tmp_path, monkeypatch):
    specs = [TensorSpec(f"t{i}", (4,), np.dtype(np.float32)) for i in range(3)]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=1 << 20)

    def disk_full(self, shard_index, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardedSafetensorsWriter, "_append", disk_full)
    with pytest.raises(OSError, match="No space left"):
        for spec in specs:
            writer.write(spec.name, np.zeros(4, np.float32))
        writer.finish()
