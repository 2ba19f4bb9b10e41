"""The model-axis reductions equal jnp's over axis 0 (they replace them only for speed on CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest

from bmx.merge.model_axis import mean_models, sum_models, var_models


@pytest.mark.parametrize("inputs", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reductions_equal_jnp_over_the_model_axis(inputs, dtype):
    stacked = jnp.asarray(np.random.default_rng(inputs).standard_normal((inputs, 7, 33), np.float32)).astype(dtype)
    step = 2.0 ** -7 if dtype == jnp.bfloat16 else 1e-6  # one rounding of the result apart at most
    for ours, reference in ((sum_models, lambda s: jnp.sum(s, axis=0)), (mean_models, lambda s: jnp.mean(s, axis=0)),
                            (var_models, lambda s: jnp.var(s, axis=0))):
        got, expected = ours(stacked), reference(stacked)
        assert got.dtype == expected.dtype == dtype and got.shape == expected.shape == (7, 33)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                                   rtol=step, atol=step * 1e-3)


def test_counts_of_booleans_are_int32_and_keepdims_keeps_the_axis():
    nonzero = jnp.asarray([[True, False, True], [True, True, False], [False, False, True]])
    counts = sum_models(nonzero, keepdims=True)
    assert counts.dtype == jnp.int32 and counts.tolist() == [[2, 1, 2]]
    assert sum_models(nonzero).tolist() == jnp.sum(nonzero, axis=0).tolist()
