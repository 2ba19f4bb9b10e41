"""`model.attention`: cuDNN's and splash's calls give the XLA path's outputs and gradients.

The reference is `grouped_query_attention` (itself checked against transformers in tests/model).
Off-GPU, the cuDNN wrapper runs `jax.nn.dot_product_attention` through XLA, which checks everything
bmx passes to the kernel (layout, GQA, window, masks); on a GPU the same test runs cuDNN itself.
Splash runs in the Pallas interpreter on CPU; its TPU compilation is checked in test_aot_report.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmx.model.attention import AttentionMasking, grouped_query_attention
from bmx.model import kernels
from bmx.model.kernels import cudnn_attention, splash_attention

BATCH, SEQ, KV_HEADS, QUERIES_PER_KV, HEAD_DIM = 2, 256, 2, 2, 32
ON_GPU = jax.default_backend() == "gpu"


def inputs(dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (BATCH, SEQ, KV_HEADS, QUERIES_PER_KV, HEAD_DIM), jnp.float32)
    k = jax.random.normal(keys[1], (BATCH, SEQ, KV_HEADS, HEAD_DIM), jnp.float32)
    v = jax.random.normal(keys[2], (BATCH, SEQ, KV_HEADS, HEAD_DIM), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def packed_documents():
    """Row 0: three documents; row 1: one document then right padding (segment 0 reused on purpose)."""
    segments = np.zeros((BATCH, SEQ), np.int32)
    segments[0, 70:180], segments[0, 180:] = 1, 2
    valid = np.ones((BATCH, SEQ), bool)
    valid[1, 200:] = False
    return jnp.asarray(segments), jnp.asarray(valid)


MASKINGS = {
    # windows below seq / 2 take the XLA path's block-local branch, above it the dense one
    "window 64": lambda: AttentionMasking(None, None, 64),
    "window 160": lambda: AttentionMasking(None, None, 160),
    "no window": lambda: AttentionMasking(None, None, None),
    "documents + padding, window 64": lambda: AttentionMasking(packed_documents()[1], packed_documents()[0], 64),
}


def weighted_sum(attention, masking):
    """A scalar through every valid query row, with position-dependent weights so gradients are specific."""
    weights = jax.random.normal(jax.random.key(7), (BATCH, SEQ, KV_HEADS, QUERIES_PER_KV, HEAD_DIM))
    valid = jnp.ones((BATCH, SEQ)) if masking.key_is_valid is None else masking.key_is_valid.astype(jnp.float32)

    def loss(q, k, v):
        out = attention(q, k, v, masking, HEAD_DIM ** -0.5).astype(jnp.float32)
        return jnp.sum(out * weights * valid[:, :, None, None, None])

    return loss


def assert_same_as_xla(kernel, masking, dtype, tolerance):
    q, k, v = inputs(dtype)
    reference = grouped_query_attention(q, k, v, masking, HEAD_DIM ** -0.5).astype(jnp.float32)
    got = kernel(q, k, v, masking, HEAD_DIM ** -0.5).astype(jnp.float32)
    valid = np.ones((BATCH, SEQ), bool) if masking.key_is_valid is None else np.asarray(masking.key_is_valid)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(reference)[valid], atol=tolerance, rtol=tolerance)
    reference_grads = jax.grad(weighted_sum(grouped_query_attention, masking), argnums=(0, 1, 2))(q, k, v)
    grads = jax.grad(weighted_sum(kernel, masking), argnums=(0, 1, 2))(q, k, v)
    for name, grad, reference_grad in zip("qkv", grads, reference_grads):
        scale = float(jnp.abs(reference_grad.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(reference_grad, np.float32),
                                   atol=tolerance * scale, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("masking_name", list(MASKINGS))
def test_cudnn_call_matches_the_xla_path(masking_name):
    implementation = "cudnn" if ON_GPU else "xla"
    dtype = jnp.bfloat16 if ON_GPU else jnp.float32  # cuDNN takes 16-bit inputs only

    def kernel(q, k, v, masking, scale):
        return cudnn_attention(q, k, v, masking, scale, implementation=implementation)

    assert_same_as_xla(kernel, MASKINGS[masking_name](), dtype, 2e-2 if ON_GPU else 2e-5)


@pytest.mark.parametrize("masking_name", ["window 64", "no window", "documents + padding, window 64"])
def test_splash_matches_the_xla_path_in_float32(masking_name, monkeypatch):
    monkeypatch.setattr(kernels, "SPLASH_BLOCK", 128)  # several tiles per row, some partly masked
    assert_same_as_xla(splash_attention, MASKINGS[masking_name](), jnp.float32, 2e-5)


def test_splash_matches_the_xla_path_in_bfloat16():
    assert_same_as_xla(splash_attention, MASKINGS["documents + padding, window 64"](), jnp.bfloat16, 3e-2)


def test_splash_runs_per_device_under_a_mesh():
    """Batch over data × fsdp and K/V heads over tensor, as the trainer's rules say (8 CPU devices)."""
    from bmx.model.sharding import logical_sharding
    from bmx.train.mesh import DEFAULT_RULES, MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    masking = MASKINGS["documents + padding, window 64"]()
    q, k, v = inputs(jnp.float32)
    q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # a batch of 4: one row per fsdp shard
    masking = AttentionMasking(jnp.concatenate([masking.key_is_valid] * 2), jnp.concatenate([masking.segment_ids] * 2),
                               masking.sliding_window)

    @jax.jit
    def sharded(q, k, v):
        with logical_sharding(mesh, DEFAULT_RULES):
            return splash_attention(q, k, v, masking, HEAD_DIM ** -0.5)

    reference = grouped_query_attention(q, k, v, masking, HEAD_DIM ** -0.5)
    valid = np.asarray(masking.key_is_valid)
    np.testing.assert_allclose(np.asarray(sharded(q, k, v))[valid], np.asarray(reference)[valid], atol=2e-5)


def test_the_model_runs_the_configured_kernel():
    """`Mistral(config, attention="splash")` gives the XLA model's logits on a real window."""
    from flax import nnx

    from bmx.model import Mistral, preset

    config = preset("tiny", num_hidden_layers=2, sliding_window=64, vocab_size=512)
    tokens = jax.random.randint(jax.random.key(3), (2, 256), 0, config.vocab_size)
    reference = Mistral(config, attention="xla", rngs=nnx.Rngs(0))(tokens)
    kernel_model = Mistral(config, attention="splash", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(kernel_model(tokens)), np.asarray(reference), atol=1e-4, rtol=1e-4)


def with_kernel(model, attention: str):
    """A model of `model`'s config and weights whose attention runs `attention`."""
    from flax import nnx

    from bmx.model import Mistral

    other = nnx.eval_shape(lambda: Mistral(model.config, attention=attention))
    nnx.update(other, nnx.state(model))
    return other


def test_generation_with_splash_equals_transformers_and_prefills_with_it(tmp_path, monkeypatch):
    """Greedy ids through a splash model equal transformers' past the window, and the prompt goes
    through splash (the decode steps attend to the cache). The XLA kernel's generation is
    tests/generate/test_generate_parity.py."""
    attention = "splash"
    from generate.generation_testing import hf_and_bmx, hf_greedy, random_prompts

    from bmx.generate import generate_token_ids

    reference, model = hf_and_bmx(tmp_path, sliding_window=8)
    calls = []
    original = kernels.ATTENTION_KERNELS[attention]
    monkeypatch.setitem(kernels.ATTENTION_KERNELS, attention,
                        lambda q, *args: calls.append(q.shape) or original(q, *args))
    prompts = random_prompts((5, 21), model.config.vocab_size)
    generated = generate_token_ids(with_kernel(model, attention), prompts, max_new_tokens=12)
    assert [g.token_ids for g in generated] == hf_greedy(reference, prompts, 12)
    # Traced once per layer, for the 32-token padded prompt only.
    assert [shape[:2] for shape in calls] == [(2, 32)] * model.config.num_hidden_layers


def test_unknown_attention_implementation_is_named():
    from flax import nnx

    from bmx.model import Mistral, preset

    with pytest.raises(ValueError, match="'flash'.*xla.*cudnn.*splash"):
        nnx.eval_shape(lambda: Mistral(preset("tiny", num_hidden_layers=1), attention="flash"))
