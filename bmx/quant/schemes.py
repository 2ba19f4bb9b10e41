"""The quantization schemes: how one linear's weight becomes stored arrays, and back to a kernel.

Every scheme quantizes transformers' `[out, in]` orientation of the weight (what bitsandbytes and
AutoAWQ quantize, so the stored arrays are theirs byte for byte) and rebuilds bmx's kernel
orientation `[in, out]` in `jax.numpy`, inside the jitted forward. `quantize_kernel` takes the weight
as bmx stores it (`[in, out]`), for the streamed path that reads kernels from a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bmx.convert.contiguous import contiguous_copy
from bmx.quant import awq_format, bnb4, int8


def _hf_orientation(kernel_matrix: np.ndarray) -> np.ndarray:
    """bmx's `[in, out]` matrix as transformers' contiguous `[out, in]` weight."""
    return contiguous_copy(np.asarray(kernel_matrix).T)


@dataclass(frozen=True)
class Int8Scheme:
    """Symmetric int8 per output channel; optional 16-bit outlier input columns (LLM.int8)."""

    outlier_threshold: float | None = None
    method: str = "int8"

    def quantize(self, weight: np.ndarray, outlier_columns: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return int8.quantize_int8(weight, outlier_columns if self.outlier_threshold is not None else None)

    def quantize_kernel(self, kernel_matrix: np.ndarray) -> dict[str, np.ndarray]:
        if self.outlier_threshold is None:  # the int8 codes are transposed, not the 16-bit input
            return int8.quantize_kernel(kernel_matrix)
        return self.quantize(_hf_orientation(kernel_matrix))

    def kernel_matrix(self, arrays: dict, out_features: int, in_features: int):
        return int8.dequantize_int8(arrays["weight"], arrays["scale"], arrays.get("outlier_columns"),
                                    arrays.get("outlier_weight")).T


@dataclass(frozen=True)
class Bnb4Scheme:
    """bitsandbytes NF4 or FP4: 4-bit codes over blocks of the flattened weight, absmax per block."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    method: str = "nf4"

    def __post_init__(self) -> None:
        if self.quant_type not in bnb4.CODES:
            raise ValueError(f"bitsandbytes 4-bit quant_type must be one of {sorted(bnb4.CODES)}, got {self.quant_type!r}")
        if self.blocksize not in bnb4.BLOCKSIZES:
            raise ValueError(f"bitsandbytes 4-bit blocksize must be one of {bnb4.BLOCKSIZES}, got {self.blocksize}")
        object.__setattr__(self, "method", self.quant_type)

    def quantize(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        return bnb4.quantize_4bit(weight, self.quant_type, self.blocksize, self.double_quant).arrays()

    def quantize_kernel(self, kernel_matrix: np.ndarray) -> dict[str, np.ndarray]:
        return self.quantize(_hf_orientation(kernel_matrix))

    def kernel_matrix(self, arrays: dict, out_features: int, in_features: int):
        return bnb4.dequantize_4bit(arrays["packed"], arrays["absmax"], (out_features, in_features), self.quant_type,
                                    self.blocksize, arrays.get("nested_absmax"), arrays.get("nested_offset")).T


@dataclass(frozen=True)
class AwqScheme:
    """4-bit with zero point per group of inputs, in AutoAWQ's GEMM layout (also plain RTN 4-bit)."""

    group_size: int = 128
    method: str = "awq"

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"AWQ group size must be positive (inputs per scale and zero), got {self.group_size}")

    def quantize(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        return awq_format.quantize_awq(weight, self.group_size)

    def quantize_kernel(self, kernel_matrix: np.ndarray) -> dict[str, np.ndarray]:
        return self.quantize(_hf_orientation(kernel_matrix))

    def kernel_matrix(self, arrays: dict, out_features: int, in_features: int):
        return awq_format.dequantize_awq(arrays["qweight"], arrays["qzeros"], arrays["scales"], self.group_size)


Scheme = Int8Scheme | Bnb4Scheme | AwqScheme
METHODS = ("int8", "nf4", "fp4", "awq", "rtn")  # rtn: AWQ's format without the activation-aware search


def make_scheme(method: str, *, group_size: int = 128, blocksize: int = 64, double_quant: bool = False,
                outlier_threshold: float | None = None) -> Scheme:
    if method == "int8":
        return Int8Scheme(outlier_threshold=outlier_threshold)
    if method in ("nf4", "fp4"):
        return Bnb4Scheme(quant_type=method, blocksize=blocksize, double_quant=double_quant)
    if method in ("awq", "rtn"):
        return AwqScheme(group_size=group_size, method=method)
    raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")


def scheme_to_dict(scheme: Scheme) -> dict:
    return asdict(scheme)


def scheme_from_dict(values: dict) -> Scheme:
    values = dict(values)
    method = values.pop("method", None)
    if method == "int8":
        return Int8Scheme(**values)
    if method in ("nf4", "fp4"):
        return Bnb4Scheme(**values)
    if method in ("awq", "rtn"):
        return AwqScheme(method=method, **values)
    raise ValueError(f"unknown quantization method {method!r} in checkpoint metadata; expected one of {METHODS}")

