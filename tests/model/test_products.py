"""`bmx.model.products`: 16-bit products taken through float32 on CPU give the float32 product, rounded."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bmx.model import products

# (x shape, y shape, dimensions): plain rows, one row (padded to two), one row per batch entry,
# several contracted axes, the outputs-first layout.
CASES = {
    "rows": ((5, 64), (64, 48), (((1,), (0,)), ((), ()))),
    "one_row": ((1, 64), (64, 48), (((1,), (0,)), ((), ()))),
    "one_row_per_batch_entry": ((3, 1, 64), (3, 64, 16), (((2,), (1,)), ((0,), (0,)))),
    "two_contracted_axes": ((1, 4, 16), (4, 16, 24), (((1, 2), (0, 1)), ((), ()))),
    "outputs_first": ((1, 64), (48, 64), (((1,), (1,)), ((), ()))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_bfloat16_product_is_the_float64_product_rounded(case, out_dtype):
    x_shape, y_shape, dimensions = CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal(y_shape), jnp.bfloat16)
    out = jax.jit(lambda x, y: products.dot_general(x, y, dimensions, out_dtype))(x, y)
    exact = jax.lax.dot_general(np.asarray(x, np.float64), np.asarray(y, np.float64), dimensions)
    assert out.dtype == out_dtype and out.shape == exact.shape
    # Float32 accumulation then one rounding: within half a unit in the last place of the result.
    ulp = np.abs(np.asarray(exact)) * float(jnp.finfo(out_dtype).eps) + 1e-5
    assert (np.abs(np.asarray(out, np.float64) - np.asarray(exact)) <= ulp).all()


def test_einsum_matches_jnp_einsum_in_float32():
    rng = np.random.default_rng(1)
    p = jnp.asarray(rng.random((2, 2, 3, 7)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, 2, 7, 8)), jnp.bfloat16)
    out = products.einsum("bkgt,bktd->bkgd", p, v, jnp.bfloat16)
    reference = jnp.einsum("bkgt,bktd->bkgd", p.astype(jnp.float32), v.astype(jnp.float32)).astype(jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference, np.float32), rtol=1e-2, atol=1e-3)


def test_tpu_programs_keep_the_requested_result_type():
    """Lowered for TPU, the product is one bfloat16-result dot (no float32 copy of the activations)."""
    x = jax.ShapeDtypeStruct((8, 64), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((64, 48), jnp.bfloat16)
    cpu = jax.jit(lambda x, y: products.dot_general(x, y, (((1,), (0,)), ((), ())), jnp.bfloat16)).trace(x, y)
    tpu_text = cpu.lower(lowering_platforms=("tpu",)).as_text()
    cpu_text = cpu.lower().as_text()
    assert "8x48xbf16" in tpu_text and "8x48xf32" not in tpu_text
    assert "8x48xf32" in cpu_text


def test_one_row_is_multiplied_as_two_on_cpu():
    x = jax.ShapeDtypeStruct((1, 64), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((48, 64), jnp.bfloat16)
    text = jax.jit(lambda x, y: products.dot_general(x, y, (((1,), (1,)), ((), ())), jnp.bfloat16)).lower(x, y).as_text()
    assert "2x1x48xf32" in text  # x stacked with a zero row
