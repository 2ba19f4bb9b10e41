"""Quantized models: the forward is the dequantized float forward, memory really shrinks, checkpoints
round-trip through `bmx.checkpoints.load`, `bmx.eval` scores them unchanged, and AWQ beats plain RTN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from quant.quant_testing import GROUP_SIZE, logits

from bmx.checkpoints import load
from bmx.quant import dequantize_model, parameter_bytes, quantize, save_quantized
from bmx.quant.calibration import calibration_tokens
from bmx.quant.layers import QuantizedArray
from bmx.quant.model import LINEAR_PATHS, linear_at

# FP4 differs from NF4 only in its code table (checked against bitsandbytes in the parity tests).
SETTINGS = {"int8": {}, "nf4": {"double_quant": True}, "rtn": {"group_size": GROUP_SIZE}}
# Bytes per weight of the decoder linears, float32 = 4: int8 + a float32 scale per row; 4-bit codes
# + a float32 absmax per 64 (nf4 double-quantized: a uint8 absmax); 4-bit + fp16 scale, zero per 64.
MAX_BYTES_PER_WEIGHT = {"int8": 1.05, "nf4": 0.52, "rtn": 0.57}


def forward(model, ids):
    return logits(model, ids)


@pytest.fixture(scope="module")
def token_ids():
    return np.random.default_rng(0).integers(0, 256, (2, 40))


@pytest.fixture(scope="module")
def quantized(tiny_ckpt):
    models = {}
    for method, settings in SETTINGS.items():
        model, _ = load(tiny_ckpt)
        models[method] = quantize(model, method, progress=False, **settings)
    return models


@pytest.mark.parametrize("method", list(SETTINGS))
def test_quantized_forward_is_the_dequantized_float_forward(quantized, token_ids, method):
    model = quantized[method]
    np.testing.assert_allclose(forward(model, token_ids), forward(dequantize_model(model), token_ids),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", list(SETTINGS))
def test_quantized_linears_hold_only_packed_arrays(quantized, tiny_ckpt, method):
    model = quantized[method]
    float_model, _ = load(tiny_ckpt)
    for path in LINEAR_PATHS:
        linear = linear_at(model.model.layers, path)
        weights = int(np.prod(linear_at(float_model.model.layers, path).kernel.shape))
        assert parameter_bytes(linear) / weights <= MAX_BYTES_PER_WEIGHT[method], path
        assert not nnx.state(linear, nnx.Param), f"{path} still holds a float parameter"
    dtypes = {leaf.dtype.name for leaf in jax.tree.leaves(nnx.state(model, QuantizedArray))}
    assert dtypes & {"int8", "uint8", "int32"}, dtypes
    assert parameter_bytes(model) < parameter_bytes(float_model)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_checkpoints_round_trip_through_the_one_loader(quantized, tiny_ckpt, tmp_path, token_ids, method):
    model = quantized[method]
    save_quantized(model, tmp_path / method, source=tiny_ckpt)
    loaded, config = load(tmp_path / method)
    assert config == model.config
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    np.testing.assert_array_equal(forward(loaded, token_ids), forward(model, token_ids))
    assert (tmp_path / method / "hf" / "config.json").is_file()  # carried over for the way back


def test_bmx_eval_scores_a_quantized_checkpoint_unchanged(quantized, tiny_ckpt, tmp_path, token_ids):
    from bmx.eval.models import load_eval_model
    from bmx.eval.scorers import LogitsFnScorer

    save_quantized(quantized["nf4"], tmp_path / "nf4", source=tiny_ckpt)
    evaluated = load_eval_model(tmp_path / "nf4", tokenizer="mistral-v0.1")
    reference = dequantize_model(quantized["nf4"])
    scorer = LogitsFnScorer(lambda ids, mask: forward(reference, ids), max_length=512)
    rows = np.repeat(token_ids, 4, axis=0)[:8]  # a multiple of the 8 simulated devices
    mask, last = np.ones_like(rows), np.full(len(rows), rows.shape[1] - 1)
    letters = np.tile(np.array([[10, 11, 12, 13]]), (len(rows), 1))
    ours = evaluated.scorer.next_token(rows, mask, last, letters)
    theirs = scorer.next_token(rows, mask, last, letters)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-5)
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_int8_outlier_columns_are_found_on_activations_and_kept(tiny_ckpt, pmc_tokens, token_ids):
    tokens = calibration_tokens(pmc_tokens, num_sequences=4, seq_len=64)
    model, _ = load(tiny_ckpt)
    float_weights = {path: np.asarray(linear_at(model.model.layers, path).kernel[...]) for path in LINEAR_PATHS}
    # The random tiny model's normed activations are ~N(0, 1), rarely LLM.int8's 6.0: a lower threshold.
    quantize(model, "int8", calib_tokens=tokens, outlier_threshold=3.5, progress=False)
    query = linear_at(model.model.layers, "self_attn.q_proj")
    columns = np.asarray(query.outlier_columns[...])  # [layers, k], padded with column 0
    assert 0 < columns.shape[1] < 128 / 2
    layer, kept = 0, np.asarray(query.outlier_weight[...])[0]
    hf_weight = float_weights["self_attn.q_proj"][layer].reshape(128, -1).T  # [out, in]
    real = np.flatnonzero(np.abs(kept).sum(axis=0) > 0)
    np.testing.assert_array_equal(kept[:, real], hf_weight[:, columns[layer, real]].astype(jnp.bfloat16))
    np.testing.assert_allclose(forward(model, token_ids), forward(dequantize_model(model), token_ids),
                               rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def awq_model(tiny_ckpt, pmc_tokens):
    """The tiny model quantized by AWQ on 4 real PMC sequences, with the group size of `rtn`."""
    calib = calibration_tokens(pmc_tokens, num_sequences=4, seq_len=64)
    model, _ = load(tiny_ckpt)
    return quantize(model, "awq", group_size=SETTINGS["rtn"]["group_size"], calib_tokens=calib, progress=False)


def test_awq_forward_is_the_dequantized_float_forward(awq_model, token_ids):
    """AWQ also rewrites the norms (they absorb its scales): the dequantized model carries them."""
    np.testing.assert_allclose(forward(awq_model, token_ids), forward(dequantize_model(awq_model), token_ids),
                               rtol=1e-6, atol=1e-6)


def test_awq_loses_less_than_round_to_nearest(tiny_ckpt, pmc_tokens, quantized, awq_model):
    """Same 4-bit format and group size; AWQ's outputs stay closer to the float model's on held-out
    sequences (the random tiny model has no perplexity to lose: bench/quant.py measures that on a
    trained one)."""
    held_out = calibration_tokens(pmc_tokens, num_sequences=4, seq_len=64, seed=1)
    reference = forward(load(tiny_ckpt)[0], held_out)
    errors = {method: float(np.mean((forward(model, held_out) - reference) ** 2))
              for method, model in (("rtn", quantized["rtn"]), ("awq", awq_model))}
    assert errors["awq"] < errors["rtn"], errors


def test_calibration_tokens_must_fit_the_vocabulary(tiny_ckpt):
    model, _ = load(tiny_ckpt)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 32000"):
        quantize(model, "awq", calib_tokens=np.full((1, 8), 32000), progress=False)


def test_bmx_generate_decodes_a_quantized_model_unchanged(quantized, token_ids):
    from bmx.generate.loop import generate_token_ids

    prompts = [list(map(int, token_ids[0, :12])), list(map(int, token_ids[1, :7]))]
    ours = generate_token_ids(quantized["nf4"], prompts, max_new_tokens=6)
    theirs = generate_token_ids(dequantize_model(quantized["nf4"]), prompts, max_new_tokens=6)
    assert [row.token_ids for row in ours] == [row.token_ids for row in theirs]
    assert all(len(row.token_ids) == 6 for row in ours)
