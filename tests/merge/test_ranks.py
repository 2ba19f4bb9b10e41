"""The magnitude ranks DELLA draws its keep probabilities from: one fast path for bfloat16 rows, the same ranks."""

import jax.numpy as jnp
import numpy as np
import pytest

from bmx.merge.sparsification import _ascending_ranks


@pytest.mark.parametrize("shape", [(64, 300), (5, 65536), (3, 1)])
def test_bfloat16_rows_rank_exactly_as_a_stable_double_argsort(shape):
    rng = np.random.default_rng(0)
    # Few distinct bfloat16 values, zeros and an infinity: many ties, broken by position.
    values = np.abs(rng.standard_normal(shape) * rng.integers(0, 3, shape)).astype(np.float32)
    values.flat[0] = np.inf
    magnitudes = jnp.asarray(values).astype(jnp.bfloat16)
    expected = np.argsort(np.argsort(np.asarray(magnitudes, np.float32), axis=-1, kind="stable"), axis=-1,
                          kind="stable")
    np.testing.assert_array_equal(np.asarray(_ascending_ranks(magnitudes)), expected)
    np.testing.assert_array_equal(np.asarray(_ascending_ranks(magnitudes.astype(jnp.float32))), expected)
