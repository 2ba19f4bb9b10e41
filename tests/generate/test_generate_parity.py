"""Greedy decoding through the rolling KV cache gives transformers' `generate` token for token."""

import numpy as np
import pytest
from generate.generation_testing import hf_and_bmx, hf_greedy, random_prompts
from hf_reference import hf_logits

import jax
import jax.numpy as jnp
from flax import nnx

from bmx.generate import generate_token_ids
from bmx.generate.loop import left_pad
from bmx.model import KVCache, load, unstack_layers
from bmx.model.kv_cache import cache_slots

# Window 8 with prompts of 5, 13 and 30 tokens (dense and block-local prefill) and 40 new tokens:
# every row runs far past the window, so the rolling buffer wraps several times.
CASES = {
    "window8_gqa2": dict(sliding_window=8),
    "window8_gqa4_head_dim24": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, sliding_window=8),
    "no_window_gqa1_theta1e6": dict(num_key_value_heads=4, sliding_window=None, rope_theta=1e6),
}
PROMPT_LENGTHS = (5, 13, 30)
NEW_TOKENS = 40


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_ids_equal_transformers_generate_past_the_window(tmp_path, case):
    reference, model = hf_and_bmx(tmp_path, **CASES[case])
    prompts = random_prompts(PROMPT_LENGTHS, model.config.vocab_size)
    expected = hf_greedy(reference, prompts, NEW_TOKENS)
    generated = generate_token_ids(model, prompts, max_new_tokens=NEW_TOKENS, eos_ids=[2])
    assert [g.token_ids for g in generated] == expected
    assert all(len(ids) == NEW_TOKENS or ids[-1] == 2 for ids in expected)


@pytest.mark.parametrize("layers, new_tokens", [("unstacked", NEW_TOKENS), ("stacked", 12)])
def test_each_decode_step_gives_transformers_logits_for_the_whole_sequence(tmp_path, layers, new_tokens):
    """Teacher-forced through `model(..., cache=...)`: prefill the prompt, feed more tokens one by one;
    logits within 1e-4 of HF's, with the layers as a list (as decoded) or scanned (as trained)."""
    reference, model = hf_and_bmx(tmp_path, sliding_window=8)
    model = unstack_layers(model) if layers == "unstacked" else model
    prompts = random_prompts((6, 19), model.config.vocab_size, seed=1)
    continuations = random_prompts((new_tokens, new_tokens), model.config.vocab_size, seed=2)
    input_ids, attention_mask = left_pad(prompts, pad_id=0, bucket=16)
    slots = cache_slots(8, input_ids.shape[1] + new_tokens)
    step = nnx.jit(lambda model, ids, mask, cache: model(ids, mask, cache=cache))
    logits, cache = step(model, jnp.asarray(input_ids), jnp.asarray(attention_mask), KVCache.empty(model.config, 2, slots))
    assert slots == 8 and cache.slots == 8  # bounded by the window, not by the 32 + new positions
    steps = [np.asarray(logits)[:, -1]]
    for position in range(new_tokens - 1):
        tokens = jnp.asarray([[c[position]] for c in continuations])
        logits, cache = step(model, tokens, None, cache)
        steps.append(np.asarray(logits)[:, -1])
    assert cache.keys[0].shape[-1] == 8
    ours = np.stack(steps, axis=1)  # [batch, new_tokens, vocab]
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        expected = hf_logits(reference, np.asarray([prompt + continuation[:-1]]))[0, len(prompt) - 1:]
        assert np.abs(ours[row] - expected).max() <= 1e-4


def test_rows_stop_at_eos_like_transformers(tmp_path):
    reference, model = hf_and_bmx(tmp_path, seed=3, sliding_window=8)
    prompts = random_prompts(PROMPT_LENGTHS, model.config.vocab_size, seed=4)
    free_running = hf_greedy(reference, prompts, 20, eos_token_id=None)
    # An EOS id that row 0 first produces at step 6: that row must stop there, others when they meet it.
    eos = next(token for step, token in enumerate(free_running[0]) if step >= 6 and token not in free_running[0][:step])
    expected = hf_greedy(reference, prompts, 20, eos_token_id=eos)
    generated = generate_token_ids(model, prompts, max_new_tokens=20, eos_ids=[eos])
    assert [g.token_ids for g in generated] == expected
    assert generated[0].finish_reason == "eos" and generated[0].token_ids[-1] == eos
    assert [g.finish_reason for g in generated] == ["eos" if ids[-1] == eos else "length" for ids in expected]


def test_an_observer_stops_a_row_and_the_others_continue(tmp_path):
    _, model = hf_and_bmx(tmp_path, sliding_window=8)
    prompts = random_prompts((4, 9), model.config.vocab_size)
    full = generate_token_ids(model, prompts, max_new_tokens=12)
    stopped = generate_token_ids(model, prompts, max_new_tokens=12, on_token=lambda row, ids: row == 1 and len(ids) == 5)
    assert stopped[0].token_ids == full[0].token_ids and stopped[0].finish_reason == "length"
    assert stopped[1].token_ids == full[1].token_ids[:5] and stopped[1].finish_reason == "stop"


def test_empty_prompt_is_refused(tmp_path):
    _, model = hf_and_bmx(tmp_path)
    with pytest.raises(ValueError, match=r"prompts \[1\] have no tokens"):
        generate_token_ids(model, [[5, 6], []], max_new_tokens=3)


def test_bfloat16_model_unstacked_in_place_decodes_like_transformers(tmp_path):
    """A bfloat16 model (kernels outputs-first, products through float32 on CPU) unstacked with
    `consume`: the stacked arrays are freed, and batch-1 decode logits stay near transformers'."""
    reference, _ = hf_and_bmx(tmp_path, sliding_window=8)
    stacked, _ = load(tmp_path / "bmx", "bfloat16", compute_dtype="bfloat16")
    stacked_arrays = jax.tree.leaves(nnx.state(stacked.model.layers))
    model = unstack_layers(stacked, consume=True)
    assert all(array.is_deleted() for array in stacked_arrays)
    assert model.model.layers[0].mlp.gate_proj.outputs_first and model.model.layers[0].self_attn.q_proj.outputs_first
    prompt, continuation = random_prompts((7, 12), model.config.vocab_size, seed=5)
    step = nnx.jit(lambda model, ids, cache: model(ids, cache=cache))
    logits, cache = step(model, jnp.asarray([prompt]), KVCache.empty(model.config, 1, cache_slots(8, 19)))
    steps = [np.asarray(logits)[0, -1]]
    for token in continuation[:-1]:
        logits, cache = step(model, jnp.asarray([[token]]), cache)
        steps.append(np.asarray(logits)[0, -1])
    expected = hf_logits(reference, np.asarray([prompt + continuation[:-1]]))[0, len(prompt) - 1:]
    assert np.abs(np.stack(steps) - expected).max() < 0.05 * np.abs(expected).max()
