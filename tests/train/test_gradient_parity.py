"""The trainer's loss and every parameter's gradient equal transformers' (float32, PyTorch autograd).

Logit parity alone would not catch a wrong backward pass: the attention core is rematerialised
(its probabilities are recomputed in the backward pass) and the projections run on flattened
tokens, both of which only the gradients exercise.
"""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import save_tiny_hf_model

from bmx.convert import hf_to_bmx
from bmx.convert.mistral_table import hf_tensor_order
from bmx.model import load
from bmx.train.step import make_loss_fn

# (sequence length, model): a window of 8 over 40 tokens takes the sliding-window path; 300 tokens
# without a window, three blocks of causal attention.
CASES = {
    "window8_gqa2": (40, dict(num_key_value_heads=2, sliding_window=8)),
    "no_window_gqa4_tied_300_tokens": (300, dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=None,
                                                 tie_word_embeddings=True, num_hidden_layers=1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("remat", ["none", "full"])
def test_loss_and_gradients_match_transformers(tmp_path, case, remat):
    seq, overrides = CASES[case]
    reference = save_tiny_hf_model(tmp_path / "hf", **overrides)
    hf_to_bmx(tmp_path / "hf", tmp_path / "bmx", progress=False)
    model, config = load(tmp_path / "bmx", remat=remat)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, seq + 1))

    logits = reference(input_ids=torch.as_tensor(tokens[:, :-1])).logits
    expected_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size),
                                                      torch.as_tensor(tokens[:, 1:]).reshape(-1))
    expected_loss.backward()
    expected = {name: tensor.grad.numpy() for name, tensor in reference.named_parameters()}

    graphdef, state = nnx.split(model)
    loss_sums = make_loss_fn(graphdef, vocab_chunk=0, z_loss_weight=0.0, document_masking=False)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, seq), np.float32)}

    def mean_loss(params):
        total, (_, count) = loss_sums(params, batch, {})
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state.to_pure_dict())
    assert abs(float(loss) - expected_loss.item()) <= 1e-5

    checked = 0
    for hf_name, row, layer in hf_tensor_order(config):
        gradient = grads
        for key in row.bmx_path:
            gradient = gradient[key]
        gradient = np.asarray(gradient if layer is None else gradient[layer])
        actual = row.to_hf(gradient)
        scale = np.abs(expected[hf_name]).max()
        assert np.abs(actual - expected[hf_name]).max() <= 1e-4 * max(scale, 1e-3), hf_name
        checked += 1
    assert checked == len(expected)
