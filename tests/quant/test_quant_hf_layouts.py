"""The exported Hugging Face layouts, read by their peers: transformers + bitsandbytes for NF4/FP4,
AutoAWQ's `WQLinear_GEMM` for AWQ; and the same layouts imported back."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from hf_reference import hf_logits
from quant.quant_testing import GROUP_SIZE, TINY_HF, assert_bit_equal, logits

from bmx.convert.safetensors_io import SafetensorsReader
from bmx.checkpoints import load
from bmx.quant import export_hf, import_hf, quantize
from bmx.quant.model import LINEAR_PATHS, dequantized_kernels, kernel_to_hf, linear_at

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24))


def forward(model, ids=TOKENS):
    return logits(model, ids)


def quantized_model(tiny_ckpt, method, **settings):
    model, _ = load(tiny_ckpt)
    return quantize(model, method, progress=False, **settings)


def float_path(linear4bit):
    """bitsandbytes repacks 4-bit weights for its bfloat16 kernel on AVX512-BF16 CPUs; the float
    path dequantizes then multiplies, which is what bmx does."""
    linear4bit.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_export_loads_in_transformers(tiny_ckpt, tmp_path, quant_type, double_quant):
    from transformers import MistralForCausalLM

    model = quantized_model(tiny_ckpt, quant_type, double_quant=double_quant)
    export_hf(model, tmp_path / "hf", source=tiny_ckpt, progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == (
        "bitsandbytes", quant_type, double_quant)
    hf_model = MistralForCausalLM.from_pretrained(tmp_path / "hf", device_map="cpu")
    kernels = dequantized_kernels(model)
    for layer in range(TINY_HF["num_hidden_layers"]):
        for path in LINEAR_PATHS:
            module = hf_model.model.layers[layer].get_submodule(path)
            assert isinstance(module, bnb.nn.Linear4bit), path
            theirs = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).numpy()
            linear = linear_at(model.model.layers, path)
            ours = kernel_to_hf(np.asarray(kernels[path][layer]), linear.num_contracted)
            assert_bit_equal(ours, theirs, f"layer {layer} {path}")
            float_path(module)
    np.testing.assert_allclose(hf_logits(hf_model, TOKENS), forward(model), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=[("nf4", True), ("fp4", False)], ids=["nf4-double-quant", "fp4"])
def transformers_saved(request, tmp_path_factory):
    """A tiny float Mistral quantized by transformers + bitsandbytes and saved with save_pretrained:
    (quant_type, double_quant, the live transformers model, the working directory)."""
    from hf_reference import save_tiny_hf_model
    from transformers import BitsAndBytesConfig, MistralForCausalLM

    quant_type, double_quant = request.param
    directory = tmp_path_factory.mktemp(f"transformers_{quant_type}")
    save_tiny_hf_model(directory / "float", seed=1, **TINY_HF)
    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    hf_model = MistralForCausalLM.from_pretrained(directory / "float", quantization_config=settings, device_map="cpu")
    hf_model.save_pretrained(directory / "saved")
    for module in hf_model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            float_path(module)
    return quant_type, double_quant, hf_model, directory


def test_bitsandbytes_layout_written_by_transformers_imports(transformers_saved):
    """transformers quantizes and saves with bitsandbytes itself; bmx reads the directory."""
    _, _, hf_model, directory = transformers_saved
    imported = import_hf(directory / "saved")
    np.testing.assert_allclose(forward(imported), hf_logits(hf_model, TOKENS), rtol=1e-5, atol=1e-5)


def quant_state(reader: SafetensorsReader, name: str) -> dict:
    return json.loads(bytes(np.asarray(reader.read(name))).decode())


def test_bitsandbytes_export_writes_what_transformers_writes(transformers_saved):
    """The same float weights, quantized and saved by transformers + bitsandbytes and exported by bmx:
    the same tensor names (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
    `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__<type>`), shapes, dtypes and bytes,
    and the same `quantization_config`."""
    from bmx.convert import hf_to_bmx

    quant_type, double_quant, _, directory = transformers_saved
    model = quantize(load(hf_to_bmx(directory / "float", directory / "bmx", progress=False))[0], quant_type,
                     double_quant=double_quant, progress=False)
    export_hf(model, directory / "ours", progress=False)
    theirs, ours = SafetensorsReader(directory / "saved"), SafetensorsReader(directory / "ours")
    assert sorted(ours.names()) == sorted(theirs.names())
    # With double quantization the nested absmax and the 8-bit coded absmax depend on the offset (a
    # float32 mean whose last bit depends on torch's summation order): equal up to that. Given the
    # same offset they are bit-identical (test_quant_bnb4_parity.py).
    for name in theirs.names():
        if name.endswith(f".weight.quant_state.bitsandbytes__{quant_type}"):  # UTF-8 JSON
            ours_state, theirs_state = quant_state(ours, name), quant_state(theirs, name)
            if double_quant:
                np.testing.assert_allclose(ours_state.pop("nested_offset"), theirs_state.pop("nested_offset"),
                                           rtol=1e-6, err_msg=name)
            else:
                assert_bit_equal(ours.read(name), theirs.read(name), name)
            assert list(ours_state.items()) == list(theirs_state.items()), name  # same keys, same order
            continue
        assert (ours.spec(name).shape, ours.spec(name).dtype) == (theirs.spec(name).shape, theirs.spec(name).dtype), name
        if double_quant and name.endswith(".weight.nested_absmax"):
            np.testing.assert_allclose(ours.read(name), theirs.read(name), rtol=1e-6, err_msg=name)
        elif double_quant and name.endswith(".weight.absmax"):
            same = np.asarray(ours.read(name)) == np.asarray(theirs.read(name))
            assert same.mean() >= 0.99, f"{name}: {np.sum(~same)} of {same.size} values differ"
        else:
            assert_bit_equal(ours.read(name), theirs.read(name), name)
    theirs_config = json.loads((directory / "saved" / "config.json").read_text())["quantization_config"]
    ours_config = json.loads((directory / "ours" / "config.json").read_text())["quantization_config"]
    assert ours_config == theirs_config


def test_bitsandbytes_export_imports_back_bit_for_bit(tiny_ckpt, tmp_path):
    model = quantized_model(tiny_ckpt, "nf4", double_quant=True)
    export_hf(model, tmp_path / "hf", progress=False)
    imported = import_hf(tmp_path / "hf")
    for path in LINEAR_PATHS:
        ours, theirs = linear_at(model.model.layers, path), linear_at(imported.model.layers, path)
        for name in ours.array_names:
            assert_bit_equal(getattr(theirs, name)[...], getattr(ours, name)[...], f"{path}.{name}")
    np.testing.assert_array_equal(forward(imported), forward(model))


def autoawq_model(hf_dir, WQLinear_GEMM):
    """transformers' float Mistral with every decoder linear an AutoAWQ `WQLinear_GEMM`, loaded
    strictly from the exported safetensors (AutoAWQ's own loader predates transformers 5)."""
    from safetensors.torch import load_file
    from transformers import MistralConfig, MistralForCausalLM

    config = json.loads((hf_dir / "config.json").read_text())
    quantization = config.pop("quantization_config")
    model = MistralForCausalLM(MistralConfig(**{k: v for k, v in config.items() if k != "torch_dtype"})).half().eval()
    for layer in model.model.layers:
        for path in LINEAR_PATHS:
            parent_path, name = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            awq_linear = WQLinear_GEMM.from_linear(getattr(parent, name), quantization["bits"],
                                                   quantization["group_size"], init_only=True)
            setattr(parent, name, awq_linear)
    model.load_state_dict(load_file(hf_dir / "model.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def rtn_export(tiny_ckpt, tmp_path_factory):
    """The tiny model quantized in AWQ's format (round to nearest: no calibration) and exported."""
    model = quantized_model(tiny_ckpt, "rtn", group_size=GROUP_SIZE)
    directory = tmp_path_factory.mktemp("rtn_export") / "hf"
    export_hf(model, directory, progress=False)
    return model, directory


def test_awq_export_is_autoawqs_gemm_layout(rtn_export):
    _, directory = rtn_export
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True,
                      "version": "gemm", "modules_to_not_convert": None}
    reader = SafetensorsReader(directory)
    hidden, mlp = TINY_HF["hidden_size"], TINY_HF["intermediate_size"]
    down = "model.layers.1.mlp.down_proj"
    assert (reader.spec(f"{down}.qweight").shape, reader.spec(f"{down}.qweight").dtype) == ((mlp, hidden // 8), np.int32)
    assert (reader.spec(f"{down}.qzeros").shape, reader.spec(f"{down}.qzeros").dtype) == (
        (mlp // GROUP_SIZE, hidden // 8), np.int32)
    assert (reader.spec(f"{down}.scales").shape, reader.spec(f"{down}.scales").dtype) == (
        (mlp // GROUP_SIZE, hidden), np.float16)
    assert f"{down}.weight" not in reader and reader.spec("model.norm.weight").dtype == np.float16


def test_awq_export_runs_in_autoawqs_gemm_linears(autoawq, rtn_export):
    WQLinear_GEMM, _, _ = autoawq
    _, directory = rtn_export
    awq_model = autoawq_model(directory, WQLinear_GEMM)
    with torch.no_grad():
        theirs = awq_model(torch.as_tensor(TOKENS)).logits.float().numpy()
    # AutoAWQ runs in float16 (weights, norms, activations); bmx's import of the same files in float32.
    ours = forward(import_hf(directory))
    np.testing.assert_allclose(theirs, ours, atol=2e-3 * np.abs(ours).max())


def test_awq_export_imports_back_bit_for_bit(rtn_export):
    model, directory = rtn_export
    imported = import_hf(directory)
    for path in LINEAR_PATHS:
        ours, theirs = linear_at(model.model.layers, path), linear_at(imported.model.layers, path)
        for name in ours.array_names:
            assert_bit_equal(getattr(theirs, name)[...], getattr(ours, name)[...], f"{path}.{name}")
    norm = np.asarray(model.model.norm.weight[...])
    assert_bit_equal(imported.model.norm.weight[...], norm.astype(np.float16), "float tensors travel in float16")
