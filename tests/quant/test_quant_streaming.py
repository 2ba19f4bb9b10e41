"""Quantizing a checkpoint layer by layer (never loading the float model) writes what bitsandbytes
and the in-memory path write."""

import json

import bitsandbytes.functional as F
import numpy as np
import pytest
import torch
from quant.quant_testing import assert_bit_equal

from bmx.convert import open_checkpoint
from bmx.checkpoints import load
from bmx.model.checkpoint import METADATA_FILE, read_params
from bmx.quant.checkpoint import save_quantized
from bmx.quant.pipeline import quantize, quantize_checkpoint
from bmx.quant.streaming import can_stream


@pytest.mark.parametrize("method, double_quant", [("int8", False), ("nf4", True)])  # the int8 and bnb layouts
def test_streamed_checkpoint_equals_the_in_memory_one(tiny_ckpt, tmp_path, method, double_quant):
    assert can_stream(method, None, None)
    quantize_checkpoint(tiny_ckpt, tmp_path / "streamed", method, double_quant=double_quant, progress=False)
    model, _ = load(tiny_ckpt)
    save_quantized(quantize(model, method, double_quant=double_quant, progress=False), tmp_path / "in_memory",
                   source=tiny_ckpt)
    streamed, in_memory = read_params(tmp_path / "streamed"), read_params(tmp_path / "in_memory")

    def flat(tree, keys=()):
        return {k: v for key, value in tree.items()
                for k, v in (flat(value, (*keys, key)).items() if isinstance(value, dict) else [((*keys, key), value)])}

    streamed, in_memory = flat(streamed), flat(in_memory)
    assert sorted(streamed) == sorted(in_memory)
    for key, value in in_memory.items():
        assert streamed[key].dtype == value.dtype, key
        assert_bit_equal(streamed[key], value, ".".join(key))
    metadata = [json.loads((tmp_path / d / METADATA_FILE).read_text()) for d in ("streamed", "in_memory")]
    assert metadata[0] == metadata[1]


def test_streamed_nf4_codes_are_bitsandbytes_own(tiny_ckpt, tmp_path):
    quantize_checkpoint(tiny_ckpt, tmp_path / "nf4", "nf4", progress=False)
    stored = read_params(tmp_path / "nf4")["model"]["layers"]["mlp"]["down_proj"]
    weight = torch.from_numpy(np.array(open_checkpoint(tiny_ckpt).read("model.layers.1.mlp.down_proj.weight")))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert_bit_equal(stored["packed"][1], packed.numpy().reshape(-1), "packed codes")
    assert_bit_equal(stored["absmax"][1], state.absmax.numpy(), "absmax")


def test_methods_that_need_activations_are_not_streamed():
    assert not can_stream("awq", "calib", None)
    assert not can_stream("int8", "calib", 6.0)
