"""TIES' threshold by radix select equals the sorted array's entry, ties, zeros and extremes included."""

import jax.numpy as jnp
import numpy as np
import pytest

from bmx.merge.methods import kth_largest_magnitude


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_kth_largest_equals_the_sorted_entry(dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(5000).astype(np.float32)
    values[:700] = 0.0  # many ties at zero
    values[700:900] = 0.25  # a tied block in the middle
    magnitudes = jnp.abs(jnp.asarray(values).astype(dtype)).astype(jnp.float32)
    expected = np.sort(np.asarray(magnitudes))
    for k in [1, 2, 17, 1000, 4100, 4300, 4999, 5000]:
        assert kth_largest_magnitude(magnitudes, jnp.int32(k)) == expected[expected.size - k], k
