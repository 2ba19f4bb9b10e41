"""TIES' threshold by radix select equals the sorted array's entry, ties, zeros and extremes included."""

import jax.numpy as jnp
import numpy as np
import pytest

from bmx.merge.methods import TIE_BLOCK, earliest_set, kth_largest_magnitude


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16", "float16"])
def test_kth_largest_equals_the_sorted_entry(dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(5000).astype(np.float32)
    values[:700] = 0.0  # many ties at zero
    values[700:900] = 0.25  # a tied block in the middle
    magnitudes = jnp.abs(jnp.asarray(values).astype(dtype)).astype(jnp.float32)
    expected = np.sort(np.asarray(magnitudes))
    for k in [1, 2, 17, 1000, 4100, 4300, 4999, 5000]:
        assert kth_largest_magnitude(magnitudes, jnp.int32(k)) == expected[expected.size - k], k
        if dtype != np.float32:  # 16-bit magnitudes as they are: one histogram of their bits, same entry
            narrow = kth_largest_magnitude(magnitudes.astype(dtype), jnp.int32(k))
            assert narrow.dtype == jnp.dtype(dtype) and float(narrow) == expected[expected.size - k], k


@pytest.mark.parametrize("size", [1, TIE_BLOCK - 1, TIE_BLOCK, 3 * TIE_BLOCK + 77])
@pytest.mark.parametrize("density", [0.002, 0.5, 1.0])
def test_earliest_set_flags_equal_the_cumulative_sum_cut(size, density):
    flags = jnp.asarray(np.random.default_rng(size).random(size) < density)
    total = int(jnp.sum(flags))
    running = np.cumsum(np.asarray(flags))
    for count in sorted({0, 1, total // 3, total // 2, max(total - 1, 0), total, total + 5}):
        expected = np.asarray(flags) & (running <= count)
        np.testing.assert_array_equal(np.asarray(earliest_set(flags, jnp.int32(count))), expected, err_msg=str(count))
