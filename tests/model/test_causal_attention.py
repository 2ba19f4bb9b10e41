"""The blocked causal attention's hand-written backward pass against autodiff of dense softmax attention.

The transformers parity tests check logits and parameter gradients for plain batches; these check
the masks a training batch can carry (packed documents, left padding, a window that cuts across
blocks, a fully padded query row) directly on the attention's q, k and v gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmx.model.attention import AttentionMasking, _allowed, _softmax_attention, causal_blocked_attention


def dense_reference(q, k, v, masking, scale):
    seq = q.shape[1]
    index = jnp.arange(seq)
    segments, valid = masking.segment_ids, masking.key_is_valid
    allowed = _allowed(index[:, None], index[None, :],
                       None if segments is None else segments[:, :, None],
                       None if segments is None else segments[:, None, :],
                       None if valid is None else valid[:, None, :], masking.sliding_window)
    return _softmax_attention(q, k, v, jnp.broadcast_to(allowed, (q.shape[0], seq, seq)), scale)


def random_inputs(seq, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, seq, 2, 3, 16), np.float32)
    k, v = (rng.standard_normal((2, seq, 2, 16), np.float32) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


MASKINGS = {
    "causal": lambda seq: AttentionMasking(None, None, None),
    "window across blocks": lambda seq: AttentionMasking(None, None, 45),
    "packed documents": lambda seq: AttentionMasking(
        None, jnp.asarray(np.repeat([[0, 1, 2, 3], [0, 0, 1, 1]], seq // 4, axis=1)), None),
    # Row 0 is left-padded; its padded queries see no valid key at all (a fully masked row).
    "left padding": lambda seq: AttentionMasking(jnp.arange(seq)[None, :] >= jnp.asarray([[37], [0]]), None, 30),
}


@pytest.mark.parametrize("name", MASKINGS)
def test_blocked_attention_and_its_gradients_equal_dense_autodiff(name):
    seq, block = 160, 32
    q, k, v = random_inputs(seq)
    masking = MASKINGS[name](seq)
    # A padded query sees no valid key; what it returns is arbitrary (and never reaches a loss),
    # so it is left out: its cotangent is zero and its output is not compared.
    seen = np.ones((2, seq), bool) if masking.key_is_valid is None else np.asarray(masking.key_is_valid)
    seen = seen[:, :, None, None, None]
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32) * seen)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent)

    def blocked(q, k, v):
        return causal_blocked_attention(q, k, v, masking, 0.25, block)

    def dense(q, k, v):
        return dense_reference(q, k, v, masking, 0.25)

    np.testing.assert_allclose(jax.jit(blocked)(q, k, v) * seen, dense(q, k, v) * seen, atol=2e-6, rtol=1e-5)
    ours = jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v)
    reference = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for got, want, what in zip(ours, reference, "qkv"):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"d{what}")


def test_blocked_attention_gradients_in_bfloat16_follow_float32():
    seq, block = 96, 32
    masking = MASKINGS["packed documents"](seq)
    grads = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = random_inputs(seq, dtype)

        def loss(q, k, v):
            return jnp.sum(causal_blocked_attention(q, k, v, masking, 0.25, block).astype(jnp.float32) ** 2)

        grads[dtype] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for low, high in zip(grads[jnp.bfloat16], grads[jnp.float32]):
        assert low.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(low, np.float32), high, atol=0.1, rtol=0.05)
