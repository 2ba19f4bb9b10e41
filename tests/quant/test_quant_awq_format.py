"""4-bit zero-point quantization and AutoAWQ's GEMM packing: against AutoAWQ's documented packing
order on hand-built cases (always), and against AutoAWQ itself where it is installed."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from quant.quant_testing import assert_bit_equal

from bmx.quant import awq_format


def test_eight_columns_pack_into_one_int32_in_autoawqs_nibble_order():
    # Nibble i holds column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]: columns 0..7 holding their own
    # index pack to 0x75316420, as AutoAWQ's `WQLinear_GEMM.from_linear` writes them.
    packed = awq_format.pack_columns(np.arange(8)[None])
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    assert int(packed.view(np.uint32)[0, 0]) == 0x75316420
    # A code of 15 in the column that lands in the top nibble sets the sign bit of the int32.
    assert int(awq_format.pack_columns(np.array([[0, 0, 0, 0, 0, 0, 0, 15]]))[0, 0]) == 0xF0000000 - 2 ** 32
    assert int(awq_format.pack_columns(np.array([[0, 15, 0, 0, 0, 0, 0, 0]]))[0, 0]) == 0x000F0000


def autoawq_documented_pack(codes: np.ndarray) -> np.ndarray:
    """The packing loop of AutoAWQ's `WQLinear_GEMM.from_linear`, transcribed: `codes` `[in, out]`."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = np.zeros((codes.shape[0], codes.shape[1] // 8), np.int64)
    for col in range(codes.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= codes[:, col * 8 + order_map[i]].astype(np.int64) << (i * 4)
    return packed.astype(np.uint32).view(np.int32)


def test_packing_follows_autoawqs_documented_loop():
    codes = np.random.default_rng(4).integers(0, 16, (40, 96))
    assert_bit_equal(awq_format.pack_columns(codes), autoawq_documented_pack(codes), "packed codes")


def test_hand_built_weight_gives_known_gemm_arrays():
    # Row r has zero point r and step 0.25 (exact in float16): its values are (code - r) * 0.25
    # with codes spanning 0..15, so max - min = 3.75 and scale = 3.75 / 15 = 0.25 exactly.
    codes = np.array([[0, 15, r, (3 * r) % 16] for r in range(8)])  # [out 8, in 4]
    zeros = np.arange(8)
    weight = ((codes - zeros[:, None]) * 0.25).astype(np.float32)
    arrays = awq_format.quantize_awq(weight, group_size=4)
    assert arrays["scales"].dtype == np.float16 and arrays["scales"].shape == (1, 8)
    np.testing.assert_array_equal(arrays["scales"], np.full((1, 8), 0.25, np.float16))
    # zeros 0..7 in one int32: nibble i holds output column (0, 2, 4, 6, 1, 3, 5, 7)[i].
    assert arrays["qzeros"].shape == (1, 1) and int(arrays["qzeros"].view(np.uint32)[0, 0]) == 0x75316420
    # input 0: every code 0; input 1: every code 15; input 2: code r in column r (again 0x75316420).
    assert arrays["qweight"].shape == (4, 1)
    assert [int(v) for v in arrays["qweight"].view(np.uint32)[:3, 0]] == [0, 0xFFFFFFFF, 0x75316420]
    assert_bit_equal(arrays["qweight"], autoawq_documented_pack(codes.T), "qweight [in, out/8]")
    dequantized = awq_format.dequantize_awq(*(jnp.asarray(arrays[k]) for k in ("qweight", "qzeros", "scales")), 4)
    assert_bit_equal(dequantized, weight.T, "dequantized [in, out]")


def test_packing_round_trips():
    codes = np.random.default_rng(0).integers(0, 16, (24, 64))
    np.testing.assert_array_equal(np.asarray(awq_format.unpack_columns(jnp.asarray(awq_format.pack_columns(codes)))),
                                  codes)


def quantizer(group_size: int):
    return types.SimpleNamespace(group_size=group_size, zero_point=True, w_bit=4)


def test_group_quantization_matches_autoawqs_pseudo_quantize(autoawq):
    _, AwqQuantizer, _ = autoawq
    weight = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32) * 0.05
    reference, scales, zeros = AwqQuantizer.pseudo_quantize_tensor(quantizer(128), torch.from_numpy(weight))
    ours_scale, ours_zero = awq_format.group_scale_zero(weight, 128)
    assert_bit_equal(ours_scale, scales.numpy(), "scale = (max - min) / 15")
    assert_bit_equal(ours_zero, zeros.numpy(), "zero = clamp(-round(min / scale), 0, 15)")
    assert_bit_equal(awq_format.fake_quantize(weight, 128, xp=np), reference.numpy(), "quantized-dequantized weight")


def test_gemm_layout_matches_autoawqs_from_linear(autoawq):
    WQLinear_GEMM, _, dequantize_gemm = autoawq
    out_features, in_features, group = 64, 256, 128
    weight = np.random.default_rng(2).standard_normal((out_features, in_features)).astype(np.float32) * 0.05
    ours = awq_format.quantize_awq(weight, group)
    scale, zero = awq_format.group_scale_zero(weight, group, scale_dtype=np.float16)
    codes = awq_format.group_codes(weight, scale, zero, group)
    dequantized = ((codes.reshape(out_features, -1, group) - zero[..., None]) * scale[..., None]).reshape(weight.shape)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = torch.from_numpy(dequantized).half()  # AutoAWQ packs the fake-quantized fp16 weight
    reference = WQLinear_GEMM.from_linear(linear, 4, group, False, torch.from_numpy(scale.T.copy()).half(),
                                          torch.from_numpy(zero.T.copy()))
    assert_bit_equal(ours["qweight"], reference.qweight.numpy(), "qweight [in, out/8]")
    assert_bit_equal(ours["qzeros"], reference.qzeros.numpy(), "qzeros [in/group, out/8]")
    assert_bit_equal(ours["scales"], reference.scales.numpy(), "scales [in/group, out]")
    # AutoAWQ dequantizes in float16; ours in float32 rounds to exactly its values.
    ours_weight = awq_format.dequantize_awq(*(jnp.asarray(ours[k]) for k in ("qweight", "qzeros", "scales")), group)
    assert_bit_equal(np.asarray(ours_weight).astype(np.float16),
                     dequantize_gemm(reference.qweight, reference.qzeros, reference.scales, 4, group).numpy(),
                     "dequantized [in, out]")


def test_shapes_autoawq_cannot_pack_are_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        awq_format.quantize_awq(np.zeros((12, 128), np.float32), 128)
    with pytest.raises(ValueError, match="group size"):
        awq_format.quantize_awq(np.zeros((16, 100), np.float32), 64)


def test_jitted_search_quantizer_is_autoawqs_too(autoawq):
    """AWQ's search runs `fake_quantize` jitted; XLA must not turn its divisions into reciprocal
    products, which would move the many exact ties of symmetrically clipped groups."""
    import jax

    _, AwqQuantizer, _ = autoawq

    weight = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32) * 0.05
    groups = weight.reshape(64, 4, 64)
    limit = np.abs(groups).max(axis=-1, keepdims=True) * np.float32(0.85)
    clipped = np.clip(groups, -limit, limit).reshape(64, 256)  # min = -max: -min / scale is exactly 7.5
    for candidate in (weight, clipped):
        reference, _, _ = AwqQuantizer.pseudo_quantize_tensor(quantizer(64), torch.from_numpy(candidate))
        ours = jax.jit(lambda w: awq_format.fake_quantize(w, 64))(jnp.asarray(candidate))
        assert_bit_equal(ours, reference.numpy(), "jitted quantized-dequantized weight")
