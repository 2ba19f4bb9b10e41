"""bmx LoRA against PEFT on transformers' Mistral: logits, PEFT files both ways, merging, gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from generate.generation_testing import bmx_logits, hf_and_bmx
from hf_reference import hf_logits
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import MistralForCausalLM

from bmx.convert import SafetensorsReader
from bmx.convert.__main__ import main as convert_main
from bmx.lora import (LoRAConfig, apply_lora, load_peft_adapter, lora_modules, lora_params, merge_lora,
                      save_peft_adapter, with_lora_dropout)
from bmx.lora.peft_format import module_name

# GQA 4 and head_dim ≠ hidden / heads, so q/k/v/o adapters must keep heads in the right order.
SHAPE = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, sliding_window=8)
TOLERANCE = 1e-4


def randomize_b(model, seed=1, scale=0.05):
    """Non-zero B everywhere, so the adapters change the logits."""
    key = jax.random.key(seed)
    for number, (_, module) in enumerate(lora_modules(model)):
        module.lora_b.value = scale * jax.random.normal(jax.random.fold_in(key, number), module.lora_b.shape)


def token_batch(vocab_size, seed=0):
    return np.random.default_rng(seed).integers(3, vocab_size, (2, 20))


def peft_logits(peft_model, input_ids):
    with torch.no_grad():
        return peft_model(input_ids=torch.as_tensor(input_ids)).logits.float().numpy()


def test_zero_initialised_b_leaves_logits_unchanged(tmp_path):
    reference, model = hf_and_bmx(tmp_path, **SHAPE)
    input_ids = token_batch(model.config.vocab_size)
    before = np.asarray(bmx_logits(model, input_ids))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.5))
    assert all(np.abs(np.asarray(m.lora_a[...])).max() > 0 for _, m in lora_modules(model))
    np.testing.assert_array_equal(np.asarray(bmx_logits(model, input_ids)), before)
    graphdef, state = nnx.split(model)
    dropping = nnx.merge(graphdef, with_lora_dropout(state.to_pure_dict(), jax.random.key(0)))
    # Dropout only feeds A, so B = 0 still adds nothing.
    np.testing.assert_array_equal(np.asarray(bmx_logits(dropping, input_ids)), before)
    assert np.abs(before - hf_logits(reference, input_ids)).max() <= TOLERANCE


def test_lora_params_are_exactly_a_and_b_of_every_projection(tmp_path):
    _, model = hf_and_bmx(tmp_path, **SHAPE)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    config = model.config
    shapes = {"/".join(map(str, path)): tuple(value.shape) for path, value in jax.tree_util.tree_leaves_with_path(
        lora_params(model).to_pure_dict(), is_leaf=lambda x: hasattr(x, "shape"))}
    layers, embed, mlp, heads, kv_heads, head_dim = (config.num_hidden_layers, config.hidden_size,
                                                     config.intermediate_size, 8, 2, 24)
    path = lambda block, name, ab: f"['model']/['layers']/['{block}']/['{name}']/['lora_{ab}']"  # noqa: E731
    assert shapes == {
        path("self_attn", "q_proj", "a"): (layers, embed, 4), path("self_attn", "q_proj", "b"): (layers, 4, heads, head_dim),
        path("self_attn", "k_proj", "a"): (layers, embed, 4), path("self_attn", "k_proj", "b"): (layers, 4, kv_heads, head_dim),
        path("self_attn", "v_proj", "a"): (layers, embed, 4), path("self_attn", "v_proj", "b"): (layers, 4, kv_heads, head_dim),
        path("self_attn", "o_proj", "a"): (layers, heads, head_dim, 4), path("self_attn", "o_proj", "b"): (layers, 4, embed),
        path("mlp", "gate_proj", "a"): (layers, embed, 4), path("mlp", "gate_proj", "b"): (layers, 4, mlp),
        path("mlp", "up_proj", "a"): (layers, embed, 4), path("mlp", "up_proj", "b"): (layers, 4, mlp),
        path("mlp", "down_proj", "a"): (layers, mlp, 4), path("mlp", "down_proj", "b"): (layers, 4, embed),
    }


def test_peft_export_loads_in_peft_with_the_same_logits(tmp_path):
    reference, model = hf_and_bmx(tmp_path, **SHAPE)
    config = LoRAConfig(rank=4, alpha=8, dropout=0.05)
    apply_lora(model, config)
    randomize_b(model)
    save_peft_adapter(model, config, tmp_path / "adapter")
    input_ids = token_batch(model.config.vocab_size)
    base_logits = hf_logits(reference, input_ids)
    stored = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (stored["r"], stored["lora_alpha"], stored["lora_dropout"]) == (4, 8, 0.05)
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    expected = peft_logits(peft_model, input_ids)
    assert np.abs(expected - base_logits).max() > 100 * TOLERANCE  # the adapter matters
    assert np.abs(np.asarray(bmx_logits(model, input_ids)) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_adapter_trained_by_peft_loads_into_bmx(tmp_path, use_rslora):
    reference, model = hf_and_bmx(tmp_path, **SHAPE)
    peft_config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, use_rslora=use_rslora, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft_model = get_peft_model(reference, peft_config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    load_peft_adapter(model, tmp_path / "peft_adapter")
    assert sorted(name for name, _ in lora_modules(model)) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    input_ids = token_batch(model.config.vocab_size, seed=3)
    assert np.abs(np.asarray(bmx_logits(model, input_ids)) - peft_logits(peft_model.eval(), input_ids)).max() <= TOLERANCE


def test_merge_lora_folds_b_a_alpha_over_r_into_each_kernel(tmp_path):
    _, model = hf_and_bmx(tmp_path, **SHAPE)
    config = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, config)
    randomize_b(model)
    input_ids = token_batch(model.config.vocab_size)
    adapted = np.asarray(bmx_logits(model, input_ids))
    expected = {}
    for name, module in lora_modules(model):
        kernel, a, b = (np.asarray(x, np.float64) for x in (module.base.kernel[...], module.lora_a[...], module.lora_b[...]))
        for layer in range(kernel.shape[0]):  # W + A·B·α/r per layer, A [in..., r] and B [r, out...] flattened
            delta = a[layer].reshape(-1, 4) @ b[layer].reshape(4, -1) * (8 / 4)
            expected[name, layer] = kernel[layer] + delta.reshape(kernel.shape[1:])
    merge_lora(model)
    assert not list(lora_modules(model))
    attention, mlp = model.model.layers.self_attn, model.model.layers.mlp
    for (name, layer), value in expected.items():
        kernel = getattr(attention if hasattr(attention, name) else mlp, name).kernel[...]
        np.testing.assert_allclose(np.asarray(kernel[layer]), value, atol=1e-6)
    assert np.abs(np.asarray(bmx_logits(model, input_ids)) - adapted).max() <= 1e-5


@pytest.mark.parametrize("base_kind", ["bmx", "hf"])
def test_merge_lora_command_equals_peft_merge_and_unload(tmp_path, base_kind):
    reference, model = hf_and_bmx(tmp_path, **SHAPE)
    config = LoRAConfig(rank=4, alpha=16)
    apply_lora(model, config)
    randomize_b(model)
    save_peft_adapter(model, config, tmp_path / "adapter")
    assert convert_main(["merge-lora", str(tmp_path / base_kind), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = PeftModel.from_pretrained(reference, tmp_path / "adapter").merge_and_unload().state_dict()
    ours = SafetensorsReader(tmp_path / "merged")
    assert sorted(ours.names()) == sorted(merged)
    for name, tensor in merged.items():
        np.testing.assert_allclose(ours.read(name), tensor.numpy(), atol=1e-6, err_msg=name)
    q_proj = module_name("q_proj", 0) + ".weight"
    assert np.abs(ours.read(q_proj) - SafetensorsReader(tmp_path / "hf").read(q_proj)).max() > 1e-3
    loaded = MistralForCausalLM.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(hf_logits(loaded, token_batch(64)), np.asarray(bmx_logits(model, token_batch(64))), atol=TOLERANCE)


def test_lora_gradients_equal_peft_gradients(tmp_path):
    reference, model = hf_and_bmx(tmp_path, **SHAPE)
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0)
    apply_lora(model, config)
    randomize_b(model)
    save_peft_adapter(model, config, tmp_path / "adapter")
    input_ids = token_batch(model.config.vocab_size, seed=5)

    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True)
    peft_model(input_ids=torch.as_tensor(input_ids), labels=torch.as_tensor(input_ids)).loss.backward()
    expected = {name: p.grad.numpy() for name, p in peft_model.named_parameters() if "lora_" in name}

    def loss(lora_state, graphdef, frozen):
        logits = nnx.merge(graphdef, lora_state, frozen)(jnp.asarray(input_ids))[:, :-1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), input_ids[:, 1:, None], -1))

    graphdef, lora_state, frozen = nnx.split(model, nnx.LoRAParam, ...)
    lora_gradients = jax.jit(jax.grad(loss), static_argnums=1)(lora_state, graphdef, frozen)
    gradients = nnx.merge(graphdef, lora_gradients, frozen)  # A, B hold dL/dA, dL/dB
    compared = 0
    for name, module in lora_modules(gradients):
        grad_a, grad_b = np.asarray(module.lora_a[...]), np.asarray(module.lora_b[...])
        for layer in range(model.config.num_hidden_layers):
            prefix = f"base_model.model.{module_name(name, layer)}"
            np.testing.assert_allclose(grad_a[layer].reshape(-1, 4).T, expected[f"{prefix}.lora_A.default.weight"],
                                       atol=1e-6, rtol=1e-3)
            np.testing.assert_allclose(grad_b[layer].reshape(4, -1).T, expected[f"{prefix}.lora_B.default.weight"],
                                       atol=1e-6, rtol=1e-3)
            compared += 2
    assert compared == len(expected) == 7 * 2 * model.config.num_hidden_layers
