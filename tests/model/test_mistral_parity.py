"""bmx's Mistral gives transformers' logits (float32, max abs difference ≤ 1e-4)."""

import numpy as np
import pytest
import torch
from hf_reference import hf_logits, save_tiny_hf_model

from bmx.convert import hf_to_bmx
from bmx.model import load

TOLERANCE = 1e-4

# Sequences of 40 tokens against windows of 8 or 16 exercise both the dense and the blocked
# sliding-window paths; GQA ratios 1, 2, 4; head_dim ≠ hidden / heads; θ 1e4 and 1e6; no window.
CASES = {
    "gqa1_window8": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=8),
    "gqa2_window16": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=16),
    "gqa4_head_dim24": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, sliding_window=8),
    "theta1e6_no_window": dict(rope_theta=1e6, sliding_window=None),
    "tied_embeddings_window32": dict(tie_word_embeddings=True, sliding_window=32),
}


def convert(tmp_path, **overrides):
    reference = save_tiny_hf_model(tmp_path / "hf", **overrides)
    hf_to_bmx(tmp_path / "hf", tmp_path / "bmx", progress=False)
    model, config = load(tmp_path / "bmx")
    return reference, model, config


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_past_the_sliding_window(tmp_path, case):
    reference, model, config = convert(tmp_path, **CASES[case])
    input_ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))
    expected = hf_logits(reference, input_ids)
    actual = np.asarray(model(input_ids))
    assert actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= TOLERANCE


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_real_token_its_unpadded_logits(tmp_path, side):
    reference, model, config = convert(tmp_path, num_key_value_heads=1, sliding_window=8)
    rng = np.random.default_rng(1)
    lengths = [40, 23, 9]
    sequences = [rng.integers(3, config.vocab_size, length) for length in lengths]
    input_ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(max(lengths) - len(sequence), None)
        input_ids[row, span] = sequence
        mask[row, span] = 1
    logits = np.asarray(model(input_ids, attention_mask=mask))
    for row, sequence in enumerate(sequences):
        expected = hf_logits(reference, sequence[None])[0]
        assert np.abs(logits[row][mask[row] == 1] - expected).max() <= TOLERANCE


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
    reference, _, _ = convert(tmp_path)
    model, config = load(tmp_path / "bmx", compute_dtype="bfloat16")
    input_ids = np.random.default_rng(2).integers(0, config.vocab_size, (1, 24))
    expected = hf_logits(reference, input_ids)
    actual = np.asarray(model(input_ids))
    assert actual.dtype == np.float32  # logits are float32 whatever the compute dtype
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()


def test_remat_and_segment_ids_do_not_change_the_function(tmp_path):
    reference, _, config = convert(tmp_path)
    rng = np.random.default_rng(3)
    first, second = rng.integers(0, config.vocab_size, 12), rng.integers(0, config.vocab_size, 20)
    model, _ = load(tmp_path / "bmx", remat="full")
    packed = np.concatenate([first, second])[None]
    segment_ids = np.array([[0] * 12 + [1] * 20])
    positions = np.array([list(range(12)) + list(range(20))])
    logits = np.asarray(model(packed, positions=positions, segment_ids=segment_ids))[0]
    # Document masking: each packed document sees only itself, as if it were alone.
    assert np.abs(logits[:12] - hf_logits(reference, first[None])[0]).max() <= TOLERANCE
    assert np.abs(logits[12:] - hf_logits(reference, second[None])[0]).max() <= TOLERANCE


def test_sliding_window_really_limits_attention(tmp_path):
    """Changing a token further back than the window must not change later logits, and a nearer one must."""
    reference, model, config = convert(tmp_path, num_hidden_layers=1, sliding_window=8)
    input_ids = np.random.default_rng(4).integers(0, config.vocab_size, (1, 40))
    changed_far, changed_near = input_ids.copy(), input_ids.copy()
    changed_far[0, 10] = (changed_far[0, 10] + 1) % config.vocab_size
    changed_near[0, 32] = (changed_near[0, 32] + 1) % config.vocab_size
    base, far, near = (np.asarray(model(ids))[0, 39] for ids in (input_ids, changed_far, changed_near))
    assert np.array_equal(base, far)  # position 10 is 29 tokens back: outside an 8-token window
    assert not np.allclose(base, near)
    with torch.no_grad():  # transformers agrees
        assert np.abs(far - hf_logits(reference, changed_far)[0, 39]).max() <= TOLERANCE


@pytest.mark.parametrize("window", [None, 200])
def test_blocks_of_queries_give_transformers_logits(tmp_path, window):
    """300 tokens: three blocks of causal attention (the last one partial), with and without a window
    that reaches across blocks, on a left-padded batch and on two packed documents."""
    reference, model, config = convert(tmp_path, num_hidden_layers=1, sliding_window=window)
    rng = np.random.default_rng(5)
    long, short = rng.integers(3, config.vocab_size, 300), rng.integers(3, config.vocab_size, 170)
    input_ids = np.stack([long, np.concatenate([np.zeros(130, np.int64), short])])
    mask = np.stack([np.ones(300, np.int64), np.concatenate([np.zeros(130, np.int64), np.ones(170, np.int64)])])
    logits = np.asarray(model(input_ids, attention_mask=mask))
    assert np.abs(logits[0] - hf_logits(reference, long[None])[0]).max() <= TOLERANCE
    assert np.abs(logits[1, 130:] - hf_logits(reference, short[None])[0]).max() <= TOLERANCE

    packed = np.concatenate([short, long[:130]])[None]
    segment_ids = np.array([[0] * 170 + [1] * 130])
    positions = np.array([list(range(170)) + list(range(130))])
    logits = np.asarray(model(packed, positions=positions, segment_ids=segment_ids))[0]
    assert np.abs(logits[:170] - hf_logits(reference, short[None])[0]).max() <= TOLERANCE
    assert np.abs(logits[170:] - hf_logits(reference, long[None, :130])[0]).max() <= TOLERANCE
