"""bitsandbytes' 4-bit formats (NF4, FP4) and its 8-bit "dynamic" code for double quantization.

Layout, exactly as `bitsandbytes.functional.quantize_4bit` writes it:
- the weight (transformers' `[out, in]`) is flattened row-major and cut into blocks of `blocksize`
  (64) values; each block is scaled by its absolute maximum into [-1, 1];
- each scaled value becomes the index of the nearest of 16 code values (ties to the lower code
  value), and two indices share a byte, the first value in the high nibble;
- with double quantization the float32 block maxima are themselves quantized: their mean is
  subtracted, then they are coded with bnb's signed 8-bit dynamic map in blocks of 256 (through
  the 65536-bin lookup table bnb's CPU kernel uses).

Quantization runs once, offline, in float32 with bnb's own operation order (so it is bit-exact):
whole blocks jitted, a partial last block in NumPy; dequantization is `jax.numpy`, so it runs inside a jitted matmul.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# bnb's `get_4bit_type`: NF4 is quantiles of N(0, 1); FP4 is 1 sign, 2 exponent and 1 mantissa bit,
# listed in bit-pattern order and divided by its largest magnitude (12).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
FP4_CODE = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                     dtype=np.float32) / np.float32(12.0))
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
NESTED_BLOCKSIZE = 256  # bnb's block size for the double-quantized absmax
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: from each end towards the middle, each value one fused multiply-add."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    index = np.arange(steps)
    from_start = (np.float64(start32) + np.float64(step) * index).astype(np.float32)
    from_end = (np.float64(end32) - np.float64(step) * (steps - index - 1)).astype(np.float32)
    return np.where(index < steps // 2, from_start, from_end)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bnb's `create_dynamic_map(signed=True)`: 256 sorted float32 codes with a dynamic exponent."""
    values: list[float] = []
    non_sign_bits = total_bits - 1
    for exponent in range(max_exponent_bits):
        fraction_items = 2 ** (exponent + non_sign_bits - max_exponent_bits) + 1
        boundaries = _torch_linspace_float32(0.1, 1.0, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        magnitude = np.float32(10.0 ** (-(max_exponent_bits - 1) + exponent)) * means
        values += magnitude.tolist() + (-magnitude).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return np.array(sorted(values), dtype=np.float32)


DYNAMIC_CODE = dynamic_map()


# ---- quantization (NumPy, offline) --------------------------------------------------------------

def _blocks(flat: np.ndarray, blocksize: int) -> list[np.ndarray]:
    full = flat.size - flat.size % blocksize
    pieces = [flat[:full].reshape(-1, blocksize)]
    return pieces + ([flat[full:]] if full < flat.size else [])


def _scaled_by_block_absmax(flat: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Values divided by their block's absmax, clamped to [-1, 1]; and the absmax per block (float32).

    Full blocks multiply by the reciprocal and the trailing partial block divides, as bnb does.
    """
    scaled, absmax = [], []
    for block in _blocks(flat, blocksize):
        if block.ndim == 2:
            block_max = np.abs(block).max(axis=1)
            reciprocal = np.float32(1.0) / np.maximum(block_max, np.float32(1e-38))
            scaled.append(np.clip(block * reciprocal[:, None], -1, 1).reshape(-1))
        else:
            block_max = np.abs(block).max(keepdims=True)
            scaled.append(np.clip(block / np.maximum(block_max, np.float32(1e-38)), -1, 1))
        absmax.append(block_max)
    return np.concatenate(scaled).astype(np.float32), np.concatenate(absmax).astype(np.float32)


def _nearest_4bit_index(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index into `code` of the nearest value; a value exactly between two codes takes the lower one."""
    order = np.argsort(code, kind="stable")  # FP4's code is in bit-pattern order, not sorted
    midpoints = (code[order[:-1]] + code[order[1:]]) / np.float32(2.0)
    return order[np.searchsorted(midpoints, scaled, side="left")].astype(np.uint8)


@functools.partial(jax.jit, static_argnames="quant_type")
def _quantize_full_blocks(blocks: jax.Array, quant_type: str) -> tuple[jax.Array, jax.Array]:
    """`_scaled_by_block_absmax`, `_nearest_4bit_index` and `pack_nibbles` of whole blocks, jitted.

    The same float32 operations in the same order (reciprocal, multiply, clip; a value's index is
    the count of midpoints below it, which is `searchsorted(..., side="left")`), so the same bits;
    XLA runs them on every core and without NumPy's temporaries.
    """
    code = CODES[quant_type]
    order = np.argsort(code, kind="stable")
    midpoints = (code[order[:-1]] + code[order[1:]]) / np.float32(2.0)
    blocks = blocks.astype(jnp.float32)
    block_max = jnp.abs(blocks).max(axis=1)
    reciprocal = jnp.float32(1.0) / jnp.maximum(block_max, jnp.float32(1e-38))
    scaled = jnp.clip(blocks * reciprocal[:, None], -1, 1).reshape(-1)
    rank = jnp.sum(scaled[:, None] > jnp.asarray(midpoints), axis=1)
    indices = jnp.asarray(order.astype(np.uint8))[rank]
    return (indices[0::2] << 4) | indices[1::2], block_max


def pack_nibbles(indices: np.ndarray) -> np.ndarray:
    """Two 4-bit indices per byte (an even count), the first in the high nibble."""
    return ((indices[0::2] << 4) | indices[1::2]).astype(np.uint8)


LUT_SIZE = 65536  # bins over [-1, 1] in bnb's CPU 8-bit quantizer


def _nearest_code_lut(code: np.ndarray) -> np.ndarray:
    """bnb's `build_quantize_lut`: for each of 65536 evenly spaced values in [-1, 1], the index of
    the first code whose midpoint with its successor is not below the value."""
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    bins = np.arange(LUT_SIZE).astype(np.float32)
    values = np.float32(-1.0) + (np.float32(2.0) * bins) / np.float32(LUT_SIZE - 1)
    return np.searchsorted(midpoints, values, side="left").astype(np.uint8)


def _lut_bin(normed: np.ndarray) -> np.ndarray:
    """bnb's `norm_to_lut_index`: ((v + 1) * 0.5) * 65535 + 0.5, truncated, each step in float32."""
    half = (np.clip(normed, -1, 1) + np.float32(1.0)) * np.float32(0.5)
    return np.trunc(half * np.float32(LUT_SIZE - 1) + np.float32(0.5)).astype(np.int64)


def quantize_blockwise_8bit(values: np.ndarray, blocksize: int = NESTED_BLOCKSIZE,
                            code: np.ndarray = DYNAMIC_CODE) -> tuple[np.ndarray, np.ndarray]:
    """bnb's CPU `quantize_blockwise`: (uint8 code index, float32 absmax per block).

    Each value is multiplied by the reciprocal of its block's absmax and looked up in a 65536-bin
    table of nearest codes, exactly as bnb's C++ kernel does (so near-ties can differ from the
    true nearest code, the same way bnb's do). An all-zero block gets index 0.
    """
    lut = _nearest_code_lut(code)
    flat = np.asarray(values, np.float32).reshape(-1)
    indices, absmax = [], []
    for block in _blocks(flat, blocksize):
        block = block.reshape(-1, block.shape[-1])
        block_max = np.abs(block).max(axis=1)
        reciprocal = np.float32(1.0) / np.where(block_max == 0, np.float32(1.0), block_max)
        block_indices = lut[_lut_bin(block * reciprocal[:, None])]
        indices.append(np.where(block_max[:, None] == 0, np.uint8(0), block_indices).reshape(-1))
        absmax.append(block_max)
    return np.concatenate(indices), np.concatenate(absmax).astype(np.float32)


@dataclass(frozen=True)
class Bnb4Quantized:
    """One weight in bnb's 4-bit layout (the arrays of its `QuantState`)."""

    packed: np.ndarray  # uint8 [ceil(numel / 2)]
    absmax: np.ndarray  # float32 [blocks], or uint8 [blocks] when double-quantized
    nested_absmax: np.ndarray | None = None  # float32 [ceil(blocks / 256)]
    nested_offset: np.float32 | None = None  # the mean subtracted from absmax before coding it

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"packed": self.packed, "absmax": self.absmax}
        if self.nested_absmax is not None:
            arrays.update(nested_absmax=self.nested_absmax, nested_offset=np.asarray(self.nested_offset, np.float32))
        return arrays


def absmax_mean(absmax: np.ndarray) -> np.float32:
    """The double-quantization offset: the block maxima's mean, accumulated exactly then rounded.

    bnb uses torch's float32 `mean()`, whose last bit depends on the CPU's vector width and thread
    count; every other quantity here is bit-exact given the same offset.
    """
    return np.float32(np.mean(absmax, dtype=np.float64))


def quantize_4bit(weight: np.ndarray, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                  offset: np.float32 | None = None) -> Bnb4Quantized:
    """`bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type)`.

    `weight` is any float array (transformers' `[out, in]` for a linear layer); `offset` overrides
    the double-quantization offset (default: `absmax_mean`).
    """
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be one of {sorted(CODES)}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"bitsandbytes 4-bit blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    weight = np.asarray(weight)
    full = weight.size - weight.size % blocksize
    if full == weight.size and weight.size % 2 == 0:
        with jax.ensure_compile_time_eval():  # concrete even when called while tracing (abstract layouts)
            packed, absmax = (np.asarray(a) for a in _quantize_full_blocks(weight.reshape(-1, blocksize), quant_type))
    else:  # a partial last block (not a linear's weight): the same operations in NumPy
        flat = weight.astype(np.float32).reshape(-1)
        scaled, absmax = _scaled_by_block_absmax(flat, blocksize)
        if scaled.size % 2:  # bnb pads the last byte with a scaled zero
            scaled = np.concatenate([scaled, np.zeros(1, np.float32)])
        packed = pack_nibbles(_nearest_4bit_index(scaled, CODES[quant_type]))
    if not double_quant:
        return Bnb4Quantized(packed, absmax)
    offset = absmax_mean(absmax) if offset is None else np.float32(offset)
    coded_absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    return Bnb4Quantized(packed, coded_absmax, nested_absmax, offset)


# ---- dequantization (jax.numpy: runs inside the jitted forward) ---------------------------------

def _times_block_scale(values, scale, blocksize: int):
    """values [n] * scale[i // blocksize], in float32, for any n (the last block may be partial)."""
    count = values.shape[0]
    padded = -(-count // blocksize) * blocksize
    values = jnp.pad(values, (0, padded - count)).reshape(-1, blocksize)
    return (values * scale[:, None]).reshape(-1)[:count]


def dequantize_blockwise_8bit(indices, absmax, blocksize: int = NESTED_BLOCKSIZE, code=DYNAMIC_CODE):
    """bnb's `dequantize_blockwise`: code[index] * absmax of its block, float32."""
    return _times_block_scale(jnp.asarray(code)[indices.astype(jnp.int32)], absmax, blocksize)


def block_absmax(absmax, nested_absmax=None, nested_offset=None):
    """The float32 block maxima, decoding them first when double-quantized."""
    if nested_absmax is None:
        return absmax
    return dequantize_blockwise_8bit(absmax, nested_absmax) + nested_offset


def dequantize_4bit(packed, absmax, shape: tuple[int, ...], quant_type: str = "nf4", blocksize: int = 64,
                    nested_absmax=None, nested_offset=None, dtype=jnp.float32):
    """bnb's `dequantize_4bit`: code[index] * block absmax in float32, then cast to `dtype`.

    FP4's index 8 is "-0": it decodes to -0.0 here as in bnb's reference table and scalar kernel
    (bnb's AVX-512 kernel gives +0.0 for it; the two compare equal).
    """
    count = int(np.prod(shape))
    packed = packed.astype(jnp.int32)
    indices = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:count]  # high nibble first
    values = jnp.asarray(CODES[quant_type])[indices]
    scale = block_absmax(absmax, nested_absmax, nested_offset)
    return _times_block_scale(values, scale, blocksize).reshape(shape).astype(dtype)
