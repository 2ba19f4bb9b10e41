"""The hand-written backward passes of SwiGLU and RMSNorm against autodiff of their plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmx.model.layers import rms_norm, swiglu


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swiglu_gradients_equal_autodiff(dtype, tolerance):
    rng = np.random.default_rng(0)
    gate, up, cotangent = (jnp.asarray(rng.standard_normal((3, 5, 64)) * 4, dtype) for _ in range(3))

    def plain(gate, up):
        return jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)

    np.testing.assert_allclose(np.asarray(swiglu(gate, up), np.float32), plain(gate, up), rtol=tolerance, atol=tolerance)
    ours = jax.vjp(swiglu, gate, up)[1](cotangent)
    reference = jax.vjp(plain, gate, up)[1](cotangent.astype(jnp.float32))
    for got, want in zip(ours, reference):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rms_norm_gradients_equal_autodiff(dtype, tolerance):
    rng = np.random.default_rng(1)
    x, cotangent = (jnp.asarray(rng.standard_normal((3, 5, 64)) * 3, dtype) for _ in range(2))
    weight = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32)

    def plain(x, weight):
        x32 = x.astype(jnp.float32)
        return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5) * weight

    np.testing.assert_allclose(np.asarray(rms_norm(x, weight, 1e-5), np.float32), plain(x, weight),
                               rtol=tolerance, atol=tolerance)
    ours = jax.vjp(lambda x, w: rms_norm(x, w, 1e-5), x, weight)[1](cotangent)
    reference = jax.vjp(plain, x, weight)[1](cotangent.astype(jnp.float32))
    for got, want, original in zip(ours, reference, (x, weight)):
        assert got.dtype == original.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tolerance,
                                   atol=tolerance * float(np.abs(want).max()))
