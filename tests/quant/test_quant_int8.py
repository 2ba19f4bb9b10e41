"""int8 weights against bitsandbytes' LLM.int8 quantizer, and the 16-bit outlier columns."""

import bitsandbytes.functional as F
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from quant.quant_testing import assert_bit_equal

from bmx.quant import int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rowwise_int8_matches_bitsandbytes(dtype):
    weight = (torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    codes, row_absmax, _ = F.int8_vectorwise_quant(weight.clone())
    ours = int8.quantize_int8(weight.float().numpy())
    assert_bit_equal(ours["weight"], codes.numpy(), "int8 codes")
    assert_bit_equal(ours["scale"], row_absmax.numpy(), "row absmax (SCB)")
    assert_bit_equal(int8.dequantize_int8(jnp.asarray(ours["weight"]), jnp.asarray(ours["scale"])),
                     F.int8_vectorwise_dequant(codes, row_absmax).numpy(), "dequantized")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_from_the_bmx_kernel_layout_matches_bitsandbytes(dtype):
    """The streamed path quantizes bmx's `[in, out]` kernel and transposes the codes: bnb's bits."""
    weight = (torch.randn(80, 48, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    weight[3] = 0  # an all-zero row: zero codes, absmax 0
    codes, row_absmax, _ = F.int8_vectorwise_quant(weight.clone())
    kernel = weight.float().numpy().T.astype(np.float32 if dtype == torch.float32 else jnp.bfloat16)
    ours = int8.quantize_kernel(np.ascontiguousarray(kernel))
    assert ours["weight"].shape == (80, 48) and ours["weight"].flags.c_contiguous
    assert_bit_equal(ours["weight"], codes.numpy(), "int8 codes")
    assert_bit_equal(ours["scale"], row_absmax.numpy(), "row absmax (SCB)")


def test_outlier_columns_stay_16_bit_and_leave_the_row_scale():
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((32, 48)) * 0.05).astype(np.float32)
    weight[:, 5] *= 40  # a large column must not coarsen every row's scale
    columns = np.array([5, 17], np.int32)
    arrays = int8.quantize_int8(weight, columns)
    inliers = torch.from_numpy(weight.copy())
    inliers[:, columns] = 0
    codes, row_absmax, _ = F.int8_vectorwise_quant(inliers)
    assert_bit_equal(arrays["weight"], codes.numpy(), "int8 codes of the inlier columns")
    assert_bit_equal(arrays["scale"], row_absmax.numpy(), "row absmax without outliers")
    restored = np.asarray(int8.dequantize_int8(*(jnp.asarray(arrays[k]) for k in
                                                 ("weight", "scale", "outlier_columns", "outlier_weight"))))
    expected_outliers = weight[:, columns].astype(jnp.bfloat16).astype(np.float32)
    assert_bit_equal(restored[:, columns], expected_outliers, "outlier columns (bfloat16)")
    padded = int8.pad_outliers(arrays, 4)
    assert_bit_equal(int8.dequantize_int8(*(jnp.asarray(padded[k]) for k in
                                            ("weight", "scale", "outlier_columns", "outlier_weight"))),
                     restored, "padding adds nothing")


def test_outliers_are_the_features_whose_activations_reach_the_threshold():
    input_absmax = np.array([0.5, 6.0, 5.999, 12.0, 0.0], np.float32)
    np.testing.assert_array_equal(int8.outlier_columns_from(input_absmax), [1, 3])
