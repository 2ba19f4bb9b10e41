"""SwiGLU's hand-written backward pass against autodiff of silu(gate) · up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmx.model.layers import swiglu


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swiglu_gradients_equal_autodiff(dtype, tolerance):
    rng = np.random.default_rng(0)
    gate, up, cotangent = (jnp.asarray(rng.standard_normal((3, 5, 64)) * 4, dtype) for _ in range(3))
    plain = lambda gate, up: jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(swiglu(gate, up), np.float32), plain(gate, up), rtol=tolerance, atol=tolerance)
    ours = jax.vjp(swiglu, gate, up)[1](cotangent)
    reference = jax.vjp(plain, gate, up)[1](cotangent.astype(jnp.float32))
    for got, want in zip(ours, reference):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tolerance, atol=tolerance)
