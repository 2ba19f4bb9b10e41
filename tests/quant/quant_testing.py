"""Helpers shared by the quantization tests: tiny models, the peers' imports, exact comparisons."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# Shapes every peer accepts: AutoAWQ packs output features in 32s and groups inputs in 64s here;
# Mistral's vocabulary, so real PMC tokens calibrate it.
TINY_HF = dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, sliding_window=128)
GROUP_SIZE = 64


def bits(array) -> np.ndarray:
    """The bit patterns of a float array, with -0.0 read as +0.0 (they compare equal; bitsandbytes'
    own CPU kernels disagree on the sign of FP4's zero code)."""
    array = np.asarray(array)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        return array
    as_float32 = array.astype(np.float32) + np.float32(0.0)
    return as_float32.view(np.uint32)


def assert_bit_equal(ours, theirs, what: str) -> None:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    differing = np.flatnonzero(bits(ours).reshape(-1) != bits(theirs).reshape(-1))
    assert differing.size == 0, (f"{what}: {differing.size} of {ours.size} values differ, first at flat index "
                                 f"{differing[0]}: {ours.reshape(-1)[differing[0]]!r} vs {theirs.reshape(-1)[differing[0]]!r}")


def import_autoawq():
    """AutoAWQ's packing and quantizer, imported without `awq/__init__.py`.

    That file only imports `AutoAWQForCausalLM` (every model definition transformers has, tens of
    seconds on a small CPU) and warns that AutoAWQ is deprecated; the modules used here need neither.
    """
    if "awq" not in sys.modules:
        spec = importlib.util.find_spec("awq")
        if spec is None:
            raise ImportError("AutoAWQ is not installed: pip install --no-deps autoawq==0.2.9")
        package = types.ModuleType("awq")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["awq"] = package
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.quantize.quantizer import AwqQuantizer
        from awq.utils.packing_utils import dequantize_gemm
    return WQLinear_GEMM, AwqQuantizer, dequantize_gemm


def autoawq_or_skip():
    """AutoAWQ's pieces (see `import_autoawq`), or skip the test where AutoAWQ is not installed: it is
    not a declared test dependency (its own requirements pull in triton). The packing order is also
    checked without it, on hand-built cases, in test_quant_awq_format.py."""
    try:
        return import_autoawq()
    except ImportError as error:
        pytest.skip(str(error))

def tiny_bmx_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """An HF tiny Mistral converted to a bmx checkpoint at `directory / 'bmx'`; returns that path."""
    from hf_reference import save_tiny_hf_model

    from bmx.convert import hf_to_bmx

    save_tiny_hf_model(directory / "hf", seed=seed, **{**TINY_HF, **overrides})
    return hf_to_bmx(directory / "hf", directory / "bmx", progress=False)


def _forward(model, token_ids):
    return model(token_ids)


_jitted_forward = nnx.jit(_forward)  # one compilation per model structure, shared by every test


def logits(model, token_ids) -> np.ndarray:
    """The model's float32 logits for `token_ids` `[batch, seq]`."""
    return np.asarray(_jitted_forward(model, jnp.asarray(token_ids)))
