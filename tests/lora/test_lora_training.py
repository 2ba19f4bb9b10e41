"""Training only the adapters: the base stays frozen, the loss falls, dropout is PEFT's inverted dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pytest
from generate.generation_testing import bmx_logits, hf_and_bmx

from bmx.lora import LoRAConfig, LoRALinear, apply_lora, split_lora, with_lora_dropout
from bmx.model import load
from bmx.model.layers import Linear


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random bmx checkpoint (loading one is much faster than initialising a model eagerly)."""
    root = tmp_path_factory.mktemp("lora_training")
    hf_and_bmx(root, vocab_size=128, hidden_size=32, intermediate_size=64)
    return root / "bmx"


def next_token_loss(model, tokens):
    logits = model(tokens)[:, :-1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def test_updating_lora_params_lowers_the_loss_and_leaves_the_base_untouched(checkpoint):
    model = apply_lora(load(checkpoint)[0], LoRAConfig(rank=4, alpha=8, dropout=0.05))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 16)))
    graphdef, lora_state, frozen = split_lora(model)
    lora_state, frozen = lora_state.to_pure_dict(), frozen.to_pure_dict()
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(lora_state)

    @jax.jit
    def step(lora_state, opt_state, key):
        def loss(lora_state):
            model = nnx.merge(graphdef, lora_state, with_lora_dropout(frozen, key))
            return next_token_loss(model, tokens)

        value, grads = jax.value_and_grad(loss)(lora_state)
        updates, opt_state = optimizer.update(grads, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, value

    losses = []
    for number in range(8):
        lora_state, opt_state, value = step(lora_state, opt_state, jax.random.key(number))
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.05
    trained = nnx.merge(graphdef, lora_state, frozen)
    _, _, frozen_after = split_lora(trained)
    jax.tree.map(np.testing.assert_array_equal, frozen_after.to_pure_dict(), frozen)


def test_dropout_is_off_without_a_key_follows_the_key_and_leaves_the_model_alone(checkpoint):
    model = apply_lora(load(checkpoint)[0], LoRAConfig(rank=4, alpha=8, dropout=0.3))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRALinear):
            module.lora_b.value = 0.1 * jnp.ones_like(module.lora_b[...])
    tokens = jnp.arange(12)[None]
    plain = bmx_logits(model, tokens)
    graphdef, state = nnx.split(model)

    def dropping(key):
        return nnx.merge(graphdef, with_lora_dropout(state.to_pure_dict(), key))

    first = bmx_logits(dropping(jax.random.key(1)), tokens)
    assert not np.allclose(first, plain)
    np.testing.assert_array_equal(bmx_logits(dropping(jax.random.key(1)), tokens), first)
    assert not np.allclose(bmx_logits(dropping(jax.random.key(2)), tokens), first)
    np.testing.assert_array_equal(bmx_logits(model, tokens), plain)  # pure: the model's dropout is still off


def test_dropout_keeps_the_expected_update():
    """Inverted dropout (as torch.nn.Dropout in PEFT): averaged over keys, the update is the undropped one."""
    base = Linear((16,), (8,), ("embed", "mlp"), std=0.5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    module = LoRALinear(base, rank=4, scale=2.0, dropout=0.25, leading_axes=(),
                        unit_noise=jax.random.uniform(jax.random.key(1), (16, 4), minval=-1, maxval=1))
    module.lora_b.value = jnp.ones_like(module.lora_b[...])
    x = jax.random.normal(jax.random.key(0), (3, 16))
    undropped = module(x)
    graphdef, state = nnx.split(module)

    def dropped(key):  # a key in the module's state turns its dropout on
        return nnx.merge(graphdef, {**state.to_pure_dict(), "dropout_key": jax.random.bits(key, (4,), jnp.uint32)})(x)

    outputs = jax.vmap(dropped)(jax.random.split(jax.random.key(3), 4000))
    assert float(jnp.mean(jnp.isclose(outputs, undropped))) < 0.05  # dropout did act
    np.testing.assert_allclose(outputs.mean(axis=0), undropped, atol=0.1 * float(jnp.abs(undropped).mean()))
