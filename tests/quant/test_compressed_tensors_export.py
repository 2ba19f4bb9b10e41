"""The compressed-tensors export, read by the compressed-tensors package's own config parser,
decompressor and compressor (and by transformers where its integration loads on CPU)."""

from __future__ import annotations

import json
from functools import partial

import jax
import numpy as np
import pytest
from quant.quant_testing import GROUP_SIZE, TINY_HF, assert_bit_equal, logits

from bmx.convert.safetensors_io import SafetensorsReader
from bmx.checkpoints import load
from bmx.quant import export_hf, quantize
from bmx.quant.model import LINEAR_PATHS, linear_at

ct = pytest.importorskip("compressed_tensors")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    """method → (quantized bmx model, its compressed-tensors export directory), rtn at group 64 and int8."""
    out = tmp_path_factory.mktemp("compressed_tensors")
    made = {}
    for method, settings in (("rtn", {"group_size": GROUP_SIZE}), ("int8", {})):
        model = quantize(load(tiny_ckpt)[0], method, progress=False, **settings)
        made[method] = model, export_hf(model, out / method, source=tiny_ckpt, progress=False,
                                        export_format="compressed-tensors")
    return made


def peer_scheme(export_dir):
    """The package's own reading of our quantization_config: (format, the scheme of Linear layers)."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(json.loads((export_dir / "config.json").read_text())["quantization_config"])
    (group,) = config.config_groups.values()
    assert group.targets == ["Linear"] and config.ignore == ["lm_head"]
    assert config.quantization_status == "compressed"
    return config.format, group


def linear_state(reader, layer, path):
    prefix = f"model.layers.{layer}.{path}."
    return {name[len(prefix):]: torch.from_numpy(np.array(reader.read(name))) for name in reader.names()
            if name.startswith(prefix)}


@partial(jax.jit, static_argnums=(0, 2, 3))  # one compilation per weight shape, not one per array operation
def _kernel_matrix(scheme, arrays, out_features, in_features):
    return scheme.kernel_matrix(arrays, out_features, in_features)


def bmx_weight(model, layer, path):
    """bmx's dequantized weight (what its forward multiplies by) in transformers' [out, in] orientation, float32."""
    linear = linear_at(model.model.layers, path)
    arrays = {name: np.asarray(value)[layer] for name, value in linear.arrays().items()}
    out_features, in_features = int(np.prod(linear.out_shape)), int(np.prod(linear.in_shape))
    return np.array(_kernel_matrix(linear.scheme, arrays, out_features, in_features), np.float32).T


def test_config_is_the_one_compressed_tensors_infers_and_vllm_reads(exports):
    from compressed_tensors.compressors.format import infer_module_format

    for method, bits in (("rtn", 4), ("int8", 8)):
        config = json.loads((exports[method][1] / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors"
        fmt, scheme = peer_scheme(exports[method][1])
        assert scheme.weights.num_bits == bits and scheme.input_activations is None
        assert fmt == infer_module_format(torch.nn.Linear, scheme).value == "pack-quantized"


def test_w4a16_decompresses_to_bmx_weights_bit_for_bit(exports):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    model, export_dir = exports["rtn"]
    fmt, scheme = peer_scheme(export_dir)
    assert (scheme.weights.strategy, scheme.weights.group_size, scheme.weights.symmetric) == ("group", GROUP_SIZE, False)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    reader = SafetensorsReader(export_dir)
    for layer in range(TINY_HF["num_hidden_layers"]):
        for path in LINEAR_PATHS:
            state = linear_state(reader, layer, path)
            ours = bmx_weight(model, layer, path)
            theirs = compressor.decompress(state, scheme)["weight"]  # float16: (q − zp) × scale in float16
            assert_bit_equal(ours.astype(np.float16), theirs.numpy(), f"layer {layer} {path}")
            # The same integers and scales in float32: exactly bmx's float32 weights.
            shape = tuple(state["weight_shape"].tolist())
            zero_point = unpack_from_int32(state["weight_zero_point"], 4, (shape[0], state["weight_scale"].shape[1]),
                                           packed_dim=0)
            exact = dequantize(unpack_from_int32(state["weight_packed"], 4, shape), state["weight_scale"].float(),
                               zero_point, scheme.weights)
            assert_bit_equal(ours, exact.numpy(), f"layer {layer} {path} (float32)")


def test_w4a16_is_what_compressed_tensors_writes_from_the_same_weights(exports):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model, export_dir = exports["rtn"]
    fmt, scheme = peer_scheme(export_dir)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    reader = SafetensorsReader(export_dir)
    for path in LINEAR_PATHS:
        state = linear_state(reader, 1, path)
        shape = tuple(state["weight_shape"].tolist())
        zero_point = unpack_from_int32(state["weight_zero_point"], 4, (shape[0], state["weight_scale"].shape[1]),
                                       packed_dim=0)
        theirs = compressor.compress({"weight": torch.from_numpy(bmx_weight(model, 1, path)),
                                      "weight_scale": state["weight_scale"].float(), "weight_zero_point": zero_point},
                                     scheme)
        for name in ("weight_packed", "weight_zero_point", "weight_shape"):
            assert_bit_equal(state[name].numpy(), theirs[name].numpy(), f"{path}.{name}")


def test_w8a16_codes_exact_and_weights_within_two_float32_roundings(exports):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model, export_dir = exports["int8"]
    fmt, scheme = peer_scheme(export_dir)
    assert (scheme.weights.strategy, scheme.weights.symmetric) == ("channel", True)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    reader = SafetensorsReader(export_dir)
    arrays = linear_at(model.model.layers, "mlp.down_proj").arrays()
    for path in LINEAR_PATHS:
        state = linear_state(reader, 0, path)
        if path == "mlp.down_proj":
            codes = unpack_from_int32(state["weight_packed"], 8, tuple(state["weight_shape"].tolist()))
            assert_bit_equal(codes.numpy(), np.asarray(arrays["weight"][0]), "int8 codes")
        ours = bmx_weight(model, 0, path)
        theirs = compressor.decompress(state, scheme)["weight"].numpy()
        # bmx: (q × absmax) × (1/127), as bitsandbytes; compressed-tensors: q × (absmax × (1/127)).
        # Each side rounds twice, so about a third of the weights differ, by at most two float32 ulps.
        assert np.all(np.abs(theirs - ours) <= 2 * np.spacing(np.abs(ours))), path


def test_w8a16_loads_in_transformers_with_bmx_logits(exports):
    from transformers import AutoModelForCausalLM

    model, export_dir = exports["int8"]
    hf_model = AutoModelForCausalLM.from_pretrained(export_dir, device_map="cpu")
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens)).logits.float().numpy()
    np.testing.assert_allclose(theirs, logits(model, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--method", "nf4"], "nf4 has no compressed-tensors layout"),
    (["--method", "int8", "--outlier-threshold", "6"], "outlier columns"),
])
def test_schemes_without_a_layout_are_refused_before_quantizing(tiny_ckpt, tmp_path, capsys, args, message):
    from bmx.quant.__main__ import main

    out = tmp_path / "out"
    assert main(["--ckpt", str(tiny_ckpt), *args, "--out", str(out), "--export-hf", "--format",
                 "compressed-tensors", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not out.exists()
