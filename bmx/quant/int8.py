"""Weight-only int8: symmetric per output channel (absmax), as bitsandbytes' LLM.int8 weights.

Each row of transformers' `[out, in]` weight is scaled by 127 / its absolute maximum and rounded
(half to even) to int8; the row maxima are kept in float32 (bnb's `SCB`). This is
`bitsandbytes.functional.int8_vectorwise_quant` on the weight.

LLM.int8's outliers are *input features* whose activations reach 6.0 in magnitude. Here they are
found once, on calibration data, and the matching weight columns are kept in 16-bit: they are
zeroed (and so left out of the row maxima) in the int8 weight and added back in the forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

OUTLIER_THRESHOLD = 6.0  # LLM.int8's activation magnitude for an outlier feature
INV_127 = np.float32(7.874015718698502e-3)  # bnb multiplies by this instead of dividing by 127


def quantize_rowwise(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 `[out, in]` and the float32 row absmax `[out]`; an all-zero row quantizes to zeros."""
    with jax.ensure_compile_time_eval():  # concrete even when called while tracing (abstract layouts)
        quantized, row_absmax = _quantize_rowwise(np.asarray(weight))
    return np.asarray(quantized), np.asarray(row_absmax)


def quantize_kernel(kernel: np.ndarray) -> dict[str, np.ndarray]:
    """`quantize_int8` (no outliers) of the weight whose bmx kernel `[in, out]` this is, bit for bit.

    The transpose to `[out, in]` happens to the int8 codes inside the jitted function, not to the
    16-bit input beforehand: half the bytes moved, and no separate copy of the input (bench/at_7b.py)."""
    with jax.ensure_compile_time_eval():
        quantized, row_absmax = _quantize_kernel(np.asarray(kernel))
    return {"weight": np.asarray(quantized), "scale": np.asarray(row_absmax)}


def _quantized_along(weight: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """int8 codes and absmax of the rows of transformers' weight, laid along `axis` of `weight`."""
    # Jitted by the callers: float32 operations give the same bits as NumPy's, on every core and without temporaries.
    weight = weight.astype(jnp.float32)
    row_absmax = jnp.abs(weight).max(axis=axis)
    safe = jnp.where(row_absmax == 0, jnp.float32(1.0), row_absmax)
    # bnb writes 127.0 / row_absmax, which torch evaluates as reciprocal(row_absmax) * 127.
    scaled = weight * jnp.expand_dims((jnp.float32(1.0) / safe) * jnp.float32(127.0), axis)
    return jnp.rint(scaled).astype(jnp.int8), row_absmax  # rint: half to even, as np.rint


@jax.jit
def _quantize_rowwise(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _quantized_along(weight, axis=1)


@jax.jit
def _quantize_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    quantized, row_absmax = _quantized_along(kernel, axis=0)
    return quantized.T, row_absmax


def quantize_int8(weight: np.ndarray, outlier_columns: np.ndarray | None = None,
                  outlier_dtype=jnp.bfloat16) -> dict[str, np.ndarray]:
    """The arrays of one int8 linear: `weight` int8 `[out, in]`, `scale` float32 `[out]`, and with
    outliers `outlier_columns` int32 `[k]` plus their 16-bit weights `outlier_weight` `[out, k]`."""
    weight = np.asarray(weight)
    if outlier_columns is None:
        quantized, row_absmax = quantize_rowwise(weight)
        return {"weight": quantized, "scale": row_absmax}
    columns = np.asarray(outlier_columns, np.int32)
    inliers = weight.copy()
    inliers[:, columns] = 0
    quantized, row_absmax = quantize_rowwise(inliers)
    return {"weight": quantized, "scale": row_absmax, "outlier_columns": columns,
            "outlier_weight": weight[:, columns].astype(outlier_dtype)}


def dequantize_int8(weight, scale, outlier_columns=None, outlier_weight=None):
    """float32 `[out, in]`: int8 × row absmax / 127 (bnb's order), plus the 16-bit outlier columns.

    Padding entries of `outlier_columns` (see `pad_outliers`) carry zero weights and add nothing.
    """
    dequantized = weight.astype(jnp.float32) * scale[:, None] * INV_127
    if outlier_columns is None:
        return dequantized
    return dequantized.at[:, outlier_columns].add(outlier_weight.astype(jnp.float32))


def outlier_columns_from(input_absmax: np.ndarray, threshold: float = OUTLIER_THRESHOLD) -> np.ndarray:
    """Input features whose calibration activations reached `threshold` in magnitude."""
    return np.flatnonzero(np.asarray(input_absmax) >= threshold).astype(np.int32)


def pad_outliers(arrays: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """Pad the outlier columns to `count` (column 0 with zero weight) so stacked layers share shapes."""
    missing = count - arrays["outlier_columns"].size
    if missing < 0:
        raise ValueError(f"cannot pad {arrays['outlier_columns'].size} outlier columns down to {count}")
    padded = dict(arrays)
    padded["outlier_columns"] = np.concatenate([arrays["outlier_columns"], np.zeros(missing, np.int32)])
    weight = arrays["outlier_weight"]
    padded["outlier_weight"] = np.concatenate([weight, np.zeros((weight.shape[0], missing), weight.dtype)], axis=1)
    return padded
