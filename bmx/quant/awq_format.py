"""4-bit group quantization with a zero point (AWQ's and AutoAWQ's) and AutoAWQ's GEMM layout.

Per row of transformers' `[out, in]` weight and per group of `group_size` consecutive inputs:
scale = (max − min) / 15 (at least 1e-5 / 15), zero = clamp(−round(min / scale), 0, 15),
code = clamp(round(w / scale) + zero, 0, 15), and w ≈ (code − zero) × scale. Rounding is half to
even, as `torch.round`.

AutoAWQ's GEMM layout stores, for a linear with `in` inputs and `out` outputs:
- `qweight` int32 `[in, out / 8]`: the codes transposed to `[in, out]`, eight neighbouring output
  columns per int32, column `AWQ_ORDER[i]` of each eight in bits 4i..4i+3;
- `qzeros` int32 `[in / group, out / 8]`: the zeros, packed the same way;
- `scales` float16 `[in / group, out]`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

BITS = 4
MAX_CODE = 2 ** BITS - 1
PACK = 32 // BITS  # codes per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of each int32 holds column AWQ_ORDER[i] of its eight
AWQ_REVERSE_ORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # (0, 4, 1, 5, 2, 6, 3, 7)


def group_scale_zero(weight, group_size: int, scale_dtype=np.float32, xp=np):
    """(scale, zero) `[out, in / group]` of each group; the scale rounded to `scale_dtype` first.

    `xp` is NumPy or `jax.numpy` (for AWQ's search, on the device); both divide exactly, as torch.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"input features ({in_features}) must be a multiple of the group size ({group_size})")
    groups = weight.reshape(out_features, in_features // group_size, group_size).astype(xp.float32)
    high, low = groups.max(axis=-1), groups.min(axis=-1)
    scale = _exact_divide(xp.maximum(high - low, xp.float32(1e-5)), xp.float32(MAX_CODE), xp)
    scale = scale.astype(scale_dtype).astype(xp.float32)
    zero = xp.clip(-xp.round(_exact_divide(low, scale, xp)), 0, MAX_CODE)
    return scale, zero


def _exact_divide(numerator, denominator, xp):
    """numerator / denominator, one IEEE division per element as torch computes it.

    Left to itself XLA rewrites divisions (x / broadcast(d) into x * (1 / d), a / (b / c) into
    a * c / b), which moves values that sit on a rounding tie, e.g. −min / scale = 7.5 exactly
    for a symmetrically clipped group. The barrier hides the materialised denominator from it.
    """
    if xp is np:
        return numerator / denominator
    import jax

    return numerator / jax.lax.optimization_barrier(jnp.broadcast_to(denominator, jnp.shape(numerator)))


def group_codes(weight, scale, zero, group_size: int, xp=np):
    """The 4-bit codes `[out, in]` (int32) of `weight` under per-group `scale` and `zero`."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size).astype(xp.float32)
    codes = xp.clip(xp.round(_exact_divide(groups, scale[..., None], xp)) + zero[..., None], 0, MAX_CODE)
    return codes.reshape(out_features, in_features).astype(xp.int32)


def fake_quantize(weight, group_size: int, xp=jnp):
    """Quantize and dequantize at once (what AWQ's search measures): float32 `[out, in]`."""
    out_features, in_features = weight.shape
    scale, zero = group_scale_zero(weight, group_size, xp=xp)
    codes = group_codes(weight, scale, zero, group_size, xp=xp).reshape(out_features, -1, group_size)
    return ((codes.astype(xp.float32) - zero[..., None]) * scale[..., None]).reshape(out_features, in_features)


# ---- AutoAWQ's packing --------------------------------------------------------------------------

def pack_columns(codes: np.ndarray) -> np.ndarray:
    """int32 `[rows, cols / 8]` from 4-bit codes `[rows, cols]` in AutoAWQ's nibble order."""
    codes = np.asarray(codes).astype(np.uint32)
    rows, cols = codes.shape
    if cols % PACK:
        raise ValueError(f"AutoAWQ packs {PACK} columns per int32; {cols} columns is not a multiple of {PACK}")
    eights = codes.reshape(rows, cols // PACK, PACK)[..., list(AWQ_ORDER)]
    packed = np.zeros((rows, cols // PACK), np.uint32)
    for nibble in range(PACK):
        packed |= eights[..., nibble] << np.uint32(BITS * nibble)
    return packed.view(np.int32)


def unpack_columns(packed):
    """4-bit codes `[rows, cols]` (int32) from AutoAWQ-packed int32 `[rows, cols / 8]` (jax or NumPy)."""
    shifts = np.arange(0, 32, BITS, dtype=np.int32)  # NumPy: NumPy input stays NumPy, traced input stays jax
    nibbles = (packed[..., None] >> shifts) & MAX_CODE  # [rows, cols/8, 8]: nibble i is column AWQ_ORDER[i]
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def quantize_awq(weight: np.ndarray, group_size: int = 128) -> dict[str, np.ndarray]:
    """AutoAWQ GEMM arrays (`qweight`, `qzeros`, `scales`) of transformers' `[out, in]` weight.

    The scale is rounded to float16 (how it is stored) before the codes are chosen, so the codes
    are the nearest ones for the stored scale.
    """
    weight = np.asarray(weight, np.float32)
    out_features = weight.shape[0]
    if out_features % PACK:
        raise ValueError(f"output features ({out_features}) must be a multiple of {PACK} for AutoAWQ's packing")
    scale, zero = group_scale_zero(weight, group_size, scale_dtype=np.float16)
    codes = group_codes(weight, scale, zero, group_size)
    return {"qweight": pack_columns(codes.T), "qzeros": pack_columns(zero.astype(np.int32).T),
            "scales": scale.T.astype(np.float16)}


def dequantize_awq(qweight, qzeros, scales, group_size: int):
    """float32 `[in, out]` (bmx's kernel orientation): (code − zero) × scale, per group of inputs."""
    codes = unpack_columns(qweight)  # [in, out]
    zeros = unpack_columns(qzeros)  # [in/group, out]
    in_features, out_features = codes.shape
    grouped = codes.reshape(in_features // group_size, group_size, out_features) - zeros[:, None, :]
    return (grouped * scales.astype(jnp.float32)[:, None, :]).reshape(in_features, out_features)
