"""NF4 / FP4 against bitsandbytes' own `quantize_4bit` / `dequantize_4bit` on CPU, bit for bit."""

import bitsandbytes.functional as F
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from quant.quant_testing import assert_bit_equal

from bmx.quant import bnb4

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Whole blocks, a partial last block, and an odd element count (bnb pads the last byte).
SHAPES = [(64, 128), (96, 40), (7, 9)]


def bnb_quantize(weight: torch.Tensor, quant_type: str, double_quant: bool):
    return F.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)


def test_code_tables_are_bitsandbytes_own():
    for quant_type in ("nf4", "fp4"):
        assert_bit_equal(bnb4.CODES[quant_type], F.get_4bit_type(quant_type, device="cpu").numpy(), quant_type)
    assert_bit_equal(bnb4.DYNAMIC_CODE, F.create_dynamic_map().numpy(), "dynamic 8-bit map")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_4bit_matches_bitsandbytes(quant_type, dtype, shape):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.02).to(TORCH_DTYPES[dtype])
    packed, state = bnb_quantize(weight, quant_type, double_quant=False)
    ours = bnb4.quantize_4bit(weight.float().numpy(), quant_type, 64)
    assert_bit_equal(ours.packed, packed.numpy().reshape(-1), "packed codes")
    assert_bit_equal(ours.absmax, state.absmax.numpy(), "absmax")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 64), (130, 256), (3, 1000)])
def test_double_quantization_matches_bitsandbytes(quant_type, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.05
    packed, state = bnb_quantize(weight, quant_type, double_quant=True)
    bnb_offset = np.float32(state.offset.item())
    # Given the same offset (a float32 mean whose last bit depends on torch's reduction order),
    # every stored array is bit-identical.
    ours = bnb4.quantize_4bit(weight.numpy(), quant_type, 64, double_quant=True, offset=bnb_offset)
    assert_bit_equal(ours.packed, packed.numpy().reshape(-1), "packed codes")
    assert_bit_equal(ours.absmax, state.absmax.numpy(), "8-bit coded absmax")
    assert_bit_equal(ours.nested_absmax, state.state2.absmax.numpy(), "nested absmax")
    assert_bit_equal(bnb4.DYNAMIC_CODE, state.state2.code.numpy(), "nested code")
    default = bnb4.quantize_4bit(weight.numpy(), quant_type, 64, double_quant=True)
    ulps = abs(int(np.float32(default.nested_offset).view(np.int32)) - int(bnb_offset.view(np.int32)))
    assert ulps <= 4, f"our offset {default.nested_offset!r} is {ulps} ulps from bnb's {bnb_offset!r}"


@pytest.mark.parametrize("size", [1, 257, 3000])
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_8bit_blockwise_matches_bitsandbytes(size, scale):
    values = torch.randn(size, generator=torch.Generator().manual_seed(size)) * scale
    codes, state = F.quantize_blockwise(values, blocksize=256)
    ours_codes, ours_absmax = bnb4.quantize_blockwise_8bit(values.numpy())
    assert_bit_equal(ours_codes, codes.numpy(), "8-bit codes")
    assert_bit_equal(ours_absmax, state.absmax.numpy(), "absmax")
    assert_bit_equal(bnb4.dequantize_blockwise_8bit(jnp.asarray(ours_codes), jnp.asarray(ours_absmax)),
                     F.dequantize_blockwise(codes, state).numpy(), "dequantized")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dequantize_4bit_matches_bitsandbytes(quant_type, double_quant, dtype):
    weight = (torch.randn(96, 128, generator=torch.Generator().manual_seed(3)) * 0.02).to(TORCH_DTYPES[dtype])
    packed, state = bnb_quantize(weight, quant_type, double_quant)
    nested = {} if not double_quant else dict(nested_absmax=jnp.asarray(state.state2.absmax.numpy()),
                                              nested_offset=jnp.float32(state.offset.item()))
    ours = bnb4.dequantize_4bit(jnp.asarray(packed.numpy().reshape(-1)), jnp.asarray(state.absmax.numpy()),
                                (96, 128), quant_type, 64, dtype=JAX_DTYPES[dtype], **nested)
    assert_bit_equal(np.asarray(ours).astype(np.float32), F.dequantize_4bit(packed, state).float().numpy(),
                     "dequantized weight")


def test_real_converted_weights_quantize_as_bitsandbytes_does(tiny_ckpt):
    """Every linear of a converted checkpoint, read back from bmx's stacked kernel layout."""
    from bmx.convert import open_checkpoint

    reader = open_checkpoint(tiny_ckpt)
    names = [name for name in reader.names() if name.endswith("_proj.weight")]
    assert len(names) == 14
    for name in names:
        weight = reader.read(name)  # transformers' [out, in], from bmx's stacked kernels
        packed, state = bnb_quantize(torch.from_numpy(weight), "nf4", double_quant=True)
        ours = bnb4.quantize_4bit(weight, "nf4", 64, double_quant=True, offset=np.float32(state.offset.item()))
        assert_bit_equal(ours.packed, packed.numpy().reshape(-1), f"{name} packed")
        assert_bit_equal(ours.absmax, state.absmax.numpy(), f"{name} absmax")
        assert_bit_equal(ours.nested_absmax, state.state2.absmax.numpy(), f"{name} nested absmax")
