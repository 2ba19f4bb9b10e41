"""AWQ's activation-aware search, against AutoAWQ's own `_search_best_scale` and `_compute_best_clip`;
the search in float32 whatever the model's parameter dtype."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from quant.quant_testing import GROUP_SIZE

from bmx.checkpoints import load
from bmx.model import preset
from bmx.quant import awq_format
from bmx.quant.awq import (
    LINEAR_PATHS,
    _best_clip_rows,
    clip_weight,
    fold_scales,
    layer_matrices,
    scale_search_errors,
    scaling_groups,
    search_scales,
)
from bmx.quant.calibration import calibration_tokens, layer_by_layer, layer_masking, rotary_tables
from bmx.quant.model import kernel_to_hf, linear_at


@pytest.fixture(scope="module")
def first_layer(tiny_ckpt, pmc_tokens):
    """The tiny model, its calibration tokens, and layer 0 with the inputs its linears saw."""
    model, _ = load(tiny_ckpt)
    tokens = calibration_tokens(pmc_tokens, num_sequences=8, seq_len=64)
    layer = next(layer_by_layer(model, tokens, chunk=4))
    return model, tokens, layer


def autoawq_quantizer(autoawq, duo_scaling: bool = True):
    _, AwqQuantizer, _ = autoawq
    quantizer = AwqQuantizer.__new__(AwqQuantizer)  # the search methods need only these settings
    quantizer.w_bit, quantizer.group_size, quantizer.zero_point = 4, GROUP_SIZE, True
    quantizer.duo_scaling, quantizer.max_chunk_memory, quantizer.n_parallel_calib_samples = duo_scaling, 1024 ** 3, None
    return quantizer


class SnapshotCopies(torch.nn.Module):
    """AutoAWQ snapshots the inspected block with `state_dict()` + `.cpu()`, a copy on a GPU but the
    same storage on a CPU, so between α candidates it would restore nothing. This wrapper makes the
    snapshot a copy here too; the forward is the wrapped module's."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return {key: value.clone() for key, value in super().state_dict(*args, **kwargs).items()}


def hf_layer_zero(tiny_ckpt):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(tiny_ckpt.parent / "hf").model.layers[0].float().eval()


def test_v_to_o_scaling_is_skipped_exactly_when_attention_is_grouped():
    names = lambda config: [(group.previous, group.linears) for group in scaling_groups(config)]  # noqa: E731
    gqa = preset("tiny", num_attention_heads=4, num_key_value_heads=2)
    mha = preset("tiny", num_attention_heads=4, num_key_value_heads=4)
    assert ("self_attn.v_proj", ("self_attn.o_proj",)) not in names(gqa)
    assert names(mha) == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ]


@pytest.mark.parametrize("group_index, duo_scaling", [(1, False), (1, True), (2, False)])
def test_scale_search_picks_autoawqs_scales(autoawq, first_layer, tiny_ckpt, group_index, duo_scaling):
    model, _, layer = first_layer
    group = scaling_groups(model.config)[group_index]  # (norm → gate, up) and (up → down) under GQA
    ours, _ = search_scales(layer, group, model, GROUP_SIZE, chunk=4, duo_scaling=duo_scaling)
    hf_layer = hf_layer_zero(tiny_ckpt)
    find = lambda path: hf_layer.get_submodule(path)  # noqa: E731
    _, _, theirs = autoawq_quantizer(autoawq, duo_scaling)._search_best_scale(
        hf_layer, find(group.previous), [find(path) for path in group.linears],
        torch.from_numpy(np.array(layer.input_of(group.linears[0]))), module2inspect=SnapshotCopies(find(group.inspected)))
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4)


def clip_error(weight, x, group_size, thresholds):
    """Per row and group, AutoAWQ's clipping objective in float64: mean over tokens of the squared
    change of the group's partial output when the group is clipped at `thresholds` and quantized."""
    rows, in_features = weight.shape
    w = weight.reshape(rows, -1, group_size)
    clipped = np.clip(w, -thresholds[..., None], thresholds[..., None]).reshape(rows, in_features)
    quantized = awq_format.fake_quantize(clipped, group_size, xp=np).reshape(w.shape).astype(np.float64)
    xg = x.reshape(x.shape[0], -1, group_size).astype(np.float64)
    change = np.einsum("tgk,ogk->otg", xg, quantized) - np.einsum("tgk,ogk->otg", xg, w.astype(np.float64))
    return np.mean(change ** 2, axis=1)


@pytest.mark.parametrize("path", ["self_attn.v_proj", "mlp.down_proj"])
def test_clipping_search_matches_autoawq(autoawq, first_layer, path):
    _, _, layer = first_layer
    linear = linear_at(nnx.merge(layer.graph, layer.state), path)
    weight = kernel_to_hf(np.asarray(linear.kernel[...]), linear.num_contracted)
    x = np.array(layer.input_of(path)).reshape(-1, weight.shape[1])  # 512 tokens: AutoAWQ keeps them all
    ours = np.asarray(_best_clip_rows(jnp.asarray(weight), jnp.asarray(x), GROUP_SIZE))
    theirs = autoawq_quantizer(autoawq)._compute_best_clip(torch.from_numpy(weight), torch.from_numpy(x)).numpy()[..., 0]
    differ = ~np.isclose(ours, theirs, rtol=1e-6, atol=0)  # the same shrink step, to the float32 ulp
    # The searches sum in different orders, so a near-tie between two thresholds can go either way;
    # then both choices must be equally good.
    assert differ.mean() <= 0.01, f"{differ.sum()} of {differ.size} clipping thresholds differ"
    ours_error, theirs_error = clip_error(weight, x, GROUP_SIZE, ours), clip_error(weight, x, GROUP_SIZE, theirs)
    np.testing.assert_allclose(ours_error[differ], theirs_error[differ], rtol=1e-4)
    clipped = np.asarray(clip_weight(jnp.asarray(weight), jnp.asarray(x), GROUP_SIZE))
    limit = np.repeat(ours, GROUP_SIZE, axis=1)
    np.testing.assert_array_equal(clipped, np.clip(weight, -limit, limit))


def test_folding_scales_leaves_the_float_layer_unchanged(first_layer):
    model, tokens, layer = first_layer
    groups = scaling_groups(model.config)
    rng = np.random.default_rng(0)
    scales = [jnp.asarray(rng.uniform(0.5, 2.0, layer.input_of(group.linears[0]).shape[-1]), jnp.float32)
              for group in groups]
    matrices, norms = fold_scales(*layer_matrices(layer), groups, scales)
    folded = nnx.merge(layer.graph, jax.tree.map(jnp.copy, layer.state))  # its own variables
    for path in LINEAR_PATHS:
        linear = linear_at(folded, path)
        linear.kernel.value = matrices[path].reshape(linear.kernel.shape)
    for name, weight in norms.items():
        getattr(folded, name).weight.value = weight
    original = nnx.merge(layer.graph, layer.state)
    hidden = model.model.embed_tokens(jnp.asarray(tokens[:2]))
    cos, sin = rotary_tables(model, *hidden.shape[:2])
    masking = layer_masking(model)
    np.testing.assert_allclose(np.asarray(folded(hidden, cos, sin, masking)),
                               np.asarray(original(hidden, cos, sin, masking)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(matrices["mlp.gate_proj"]), np.asarray(layer_matrices(layer)[0]["mlp.gate_proj"]))


def test_a_bfloat16_layer_is_searched_in_float32(tiny_ckpt, pmc_tokens):
    """The candidates Q(W·s)/s of a layer with bfloat16 parameters are not rounded to bfloat16: every α
    scores exactly as on float32 parameters holding the same values (rounded, the attention group's
    errors move by up to 0.4%, enough to flip a close choice of α)."""
    model, _ = load(tiny_ckpt, dtype="bfloat16")
    layer = next(layer_by_layer(model, calibration_tokens(pmc_tokens, num_sequences=4, seq_len=64), chunk=4))
    assert {leaf.dtype for leaf in jax.tree.leaves(layer.state)} == {jnp.dtype(jnp.bfloat16)}
    float32_twin = replace(layer, state=jax.tree.map(lambda array: array.astype(jnp.float32), layer.state))
    for group in scaling_groups(model.config):
        ours, _ = scale_search_errors(layer, group, model, GROUP_SIZE, chunk=4)
        theirs, _ = scale_search_errors(float32_twin, group, model, GROUP_SIZE, chunk=4)
        np.testing.assert_array_equal(ours, theirs, err_msg=group.previous)
