"""GGUF export: the file llama.cpp's own converter writes, read back with gguf-py.

The reference (`gguf_llama_cpp_reference.json`) is what llama.cpp's `convert_hf_to_gguf.py`
(llama-cpp-python 0.3.36's vendored copy) wrote for the tiny Mistral of `gguf_testing.py`; rebuild
it with `python bench/gguf_llama_cpp.py --llama-cpp SRC --write-reference`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from convert.gguf_testing import TINY_NAME, gguf_summary, write_tiny_mistral

gguf = pytest.importorskip("gguf")

REFERENCE = json.loads((Path(__file__).parent / "gguf_llama_cpp_reference.json").read_text())
# What bmx writes beyond the converter, on purpose (see bmx/convert/gguf_export.py).
EXTRA_KEYS = {"llama.attention.sliding_window": {"types": ["UINT32"], "value": 256}}
# Each file read back costs ~2 s of CPU (gguf-py parses the 32000-token vocabulary entry by entry), so CI
# reads three types; BMX_FULL_TESTS=1 reads all of them.
FULL_TESTS = os.environ.get("BMX_FULL_TESTS") == "1"
full_only = pytest.mark.skipif(not FULL_TESTS, reason="BMX_FULL_TESTS=1 checks every type")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return write_tiny_mistral(tmp_path_factory.mktemp("gguf_hf"))


@pytest.fixture(scope="module")
def exported(tiny_hf, tmp_path_factory):
    """type → (path, GGUFReader) of the tiny model's export, each written and read once per module."""
    from bmx.convert.gguf_export import bmx_to_gguf

    out, files = tmp_path_factory.mktemp("gguf_out"), {}

    def get(gguf_type: str):
        if gguf_type not in files:
            path = bmx_to_gguf(tiny_hf, out / f"{gguf_type}.gguf", gguf_type, progress=False)
            files[gguf_type] = (path, gguf.GGUFReader(path))
        return files[gguf_type]

    return get


def interleave_rotary_halves(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's row order, written as an index map: its row (h, 2i + j) is HF's row (h, j·half + i)."""
    head_dim = weight.shape[0] // num_heads
    half = head_dim // 2
    order = [h * head_dim + j * half + i for h in range(num_heads) for i in range(half) for j in range(2)]
    return weight[order]


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", pytest.param("bf16", marks=full_only)])
def test_hf_export_equals_llama_cpp_converter(exported, gguf_type):
    ours = gguf_summary(exported(gguf_type)[1])
    theirs = REFERENCE["types"][gguf_type]
    assert ours["tensors"] == theirs["tensors"]  # names, shapes, types and bytes
    expected = {**theirs["metadata"], **EXTRA_KEYS}
    assert sorted(ours["metadata"]) == sorted(expected)
    for key, entry in expected.items():
        assert ours["metadata"][key] == entry, key


@pytest.fixture(scope="module")
def tiny_bmx(tiny_hf, tmp_path_factory) -> Path:
    from bmx.convert import hf_to_bmx

    # The same directory name: general.name comes from it.
    return hf_to_bmx(tiny_hf, tmp_path_factory.mktemp("gguf_bmx") / TINY_NAME, progress=False)


def test_bmx_checkpoint_exports_the_same_file_as_its_hf_source(tiny_bmx, exported, tmp_path):
    from bmx.convert.gguf_export import bmx_to_gguf

    ours = bmx_to_gguf(tiny_bmx, tmp_path / "from_bmx.gguf", "q8_0", progress=False)
    assert ours.read_bytes() == exported("q8_0")[0].read_bytes()


def test_quantized_bmx_checkpoint_is_refused(tiny_bmx, tmp_path, capsys):
    from bmx.convert.__main__ import main
    from bmx.checkpoints import load
    from bmx.quant import quantize, save_quantized

    quantized = save_quantized(quantize(load(tiny_bmx)[0], "rtn", group_size=64, progress=False), tmp_path / "rtn")
    assert main(["bmx-to-gguf", str(quantized), str(tmp_path / "out.gguf")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "quantized (rtn) bmx checkpoint" in error
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("gguf_type", [
    "q8_0", "q4_0", *(pytest.param(name, marks=full_only) for name in ("q5_1", "q5_0", "q4_1"))])
def test_quantized_tensors_are_gguf_quants_of_the_float_weights(tiny_hf, exported, gguf_type):
    from bmx.convert import open_checkpoint

    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    bits = int(gguf_type[1])
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
             "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
    reader = exported(gguf_type)[1]
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert {tensor.tensor_type for tensor in reader.tensors} == {qtype, gguf.GGMLQuantizationType.F32}
    source = open_checkpoint(tiny_hf)
    for gguf_name, hf_name in names.items():
        weight = np.asarray(source.read(hf_name), np.float32)
        if "attn_q" in gguf_name or "attn_k" in gguf_name:
            weight = interleave_rotary_halves(weight, 4 if "attn_q" in gguf_name else 2)
        stored = np.asarray(tensors[gguf_name].data)
        assert np.array_equal(stored, gguf.quants.quantize(weight, qtype)), gguf_name
        dequantized = gguf.quants.dequantize(stored, qtype)
        # Per block: the error stays within one step of a `bits`-bit grid over the block's range.
        blocks = weight.reshape(-1, block_size)
        step = 2 * np.abs(blocks).max(axis=1, keepdims=True) / 2**bits
        assert np.all(np.abs(dequantized.reshape(-1, block_size) - blocks) <= step * 1.01), gguf_name


def test_norms_stay_float32_and_exact(tiny_hf, exported):
    from bmx.convert import open_checkpoint

    reader = exported("q4_0")[1]
    norms = {tensor.name: tensor for tensor in reader.tensors if tensor.name.endswith("norm.weight")}
    assert len(norms) == 5 and {t.tensor_type for t in norms.values()} == {gguf.GGMLQuantizationType.F32}
    expected = np.asarray(open_checkpoint(tiny_hf).read("model.layers.1.post_attention_layernorm.weight"), np.float32)
    assert np.array_equal(np.asarray(norms["blk.1.ffn_norm.weight"].data), expected)


def test_quantized_checkpoints_are_refused_with_one_line_and_no_file(tiny_hf, tmp_path, capsys):
    from bmx.convert.__main__ import main

    quantized = tmp_path / "awq"
    quantized.mkdir()
    for file in tiny_hf.iterdir():
        (quantized / file.name).symlink_to(file)
    (quantized / "config.json").unlink()
    config = json.loads((tiny_hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (quantized / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    assert main(["bmx-to-gguf", str(quantized), str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "quantized (awq)" in error and "config.json" in error
    assert list(tmp_path.iterdir()) == [quantized]


def test_failure_mid_write_leaves_no_file(tiny_hf, tmp_path, monkeypatch):
    from bmx.convert import gguf_export

    written = []
    real = gguf_export.gguf_tensor_data

    def fail_on_the_fifth(weight, tensor, config):
        if len(written) == 4:
            raise OSError("disk full")
        written.append(tensor.gguf_name)
        return real(weight, tensor, config)

    monkeypatch.setattr(gguf_export, "gguf_tensor_data", fail_on_the_fifth)
    with pytest.raises(OSError, match="disk full"):
        gguf_export.bmx_to_gguf(tiny_hf, tmp_path / "f16.gguf", "f16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_and_existing_output_are_errors(tiny_hf, tmp_path, capsys):
    from bmx.convert.__main__ import main

    assert main(["bmx-to-gguf", str(tiny_hf), str(tmp_path / "x.gguf"), "--type", "q4_k_m"]) == 2
    assert "q4_k_m" in capsys.readouterr().err
    (tmp_path / "taken.gguf").write_bytes(b"")
    assert main(["bmx-to-gguf", str(tiny_hf), str(tmp_path / "taken.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
