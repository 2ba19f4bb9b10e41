"""Quantization: int8 (LLM.int8-style), bitsandbytes NF4/FP4 and AWQ 4-bit, run natively in JAX.

    from bmx.quant import quantize, save_quantized, export_hf, import_hf
    quantize(model, "awq", calib_tokens=tokens)          # in place: linears become QuantizedLinear
    save_quantized(model, "ckpt/awq")                    # loads back with bmx.checkpoints.load
"""

from bmx.quant.checkpoint import load_quantized, save_quantized
from bmx.quant.hf_export import export_hf, import_hf
from bmx.quant.layers import QuantizedLinear
from bmx.quant.model import dequantize_model, parameter_bytes, quantize_model
from bmx.quant.pipeline import quantize, quantize_checkpoint
from bmx.quant.schemes import METHODS, AwqScheme, Bnb4Scheme, Int8Scheme, make_scheme

__all__ = ["quantize", "quantize_checkpoint", "quantize_model", "dequantize_model", "save_quantized",
           "load_quantized", "export_hf", "import_hf", "QuantizedLinear", "parameter_bytes", "make_scheme",
           "METHODS", "Int8Scheme", "Bnb4Scheme", "AwqScheme"]
