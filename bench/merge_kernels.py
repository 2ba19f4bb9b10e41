"""Benchmark: the merge's per-tensor kernels against the plain JAX they replace, on one 7B-sized tensor.

    python bench/merge_kernels.py [--rows 14336] [--cols 4096] [--repeats 3]

- Reductions over the model axis (`bmx.merge.model_axis`, adds in input order) against
  `jnp.sum/var(stacked, axis=0)`, for 2 and 3 inputs in bfloat16 (accumulated in float32).
- DARE's keep mask (`bmx.merge.drop_masks`, a keyed counter hash) against `jax.random.bernoulli`
  with threefry keys.

Each row: best of `--repeats` after a compile run, and the factor by which the kernel bmx uses is
faster. The results are checked to be equal (reductions) or to keep the density (masks).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bmx.merge.drop_masks import SeededDropMasks, tensor_key
from bmx.merge.model_axis import sum_models, var_models


def best_seconds(function, *args, repeats: int) -> tuple[float, jax.Array]:
    result = jax.block_until_ready(function(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=14336, help="default: Mistral-7B's MLP width")
    parser.add_argument("--cols", type=int, default=4096, help="default: Mistral-7B's hidden size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = (args.rows, args.cols)
    rng = np.random.default_rng(0)
    rows = []
    for inputs in (2, 3):
        stacked = jnp.asarray(rng.standard_normal((inputs, *shape), np.float32) * 0.01).astype(jnp.bfloat16)
        for name, plain, ours in (
                ("sum over models", lambda s: jnp.sum(s, axis=0), sum_models),
                ("variance over models", lambda s: jnp.var(s, axis=0), var_models)):
            plain_s, expected = best_seconds(jax.jit(plain), stacked, repeats=args.repeats)
            ours_s, got = best_seconds(jax.jit(ours), stacked, repeats=args.repeats)
            # Same float32 sums in another order, one bfloat16 rounding: at most one bf16 step apart.
            relative = np.abs(np.asarray(got, np.float32) - np.asarray(expected, np.float32)) / np.maximum(
                np.abs(np.asarray(expected, np.float32)), 1e-30)
            rows.append((f"{name}, {inputs} × bf16", plain_s, ours_s, f"max relative difference {relative.max():.1e}"))
    masks = SeededDropMasks(seed=0)
    key = tensor_key(0, "model.layers.0.mlp.up_proj.weight", 1)
    plain_s, reference = best_seconds(jax.jit(lambda k: jax.random.bernoulli(k, 0.5, shape)), key, repeats=args.repeats)
    ours_s, keep = best_seconds(lambda: masks("model.layers.0.mlp.up_proj.weight", 1, shape, 0.5), repeats=args.repeats)
    rows.append(("DARE keep mask, density 0.5", plain_s, ours_s,
                 f"kept {float(jnp.mean(keep)):.5f} (threefry: {float(jnp.mean(reference)):.5f})"))

    cpu = jax.devices()[0].device_kind
    print(f"one [{args.rows}, {args.cols}] tensor per input, jax {jax.__version__} on {cpu}, best of {args.repeats}\n")
    print("| kernel | plain JAX (ms) | bmx (ms) | bmx faster by | check |")
    print("|---|---:|---:|---:|---|")
    for name, plain_s, ours_s, check in rows:
        print(f"| {name} | {plain_s * 1e3:,.1f} | {ours_s * 1e3:,.1f} | {plain_s / ours_s:.1f}× | {check} |")


if __name__ == "__main__":
    main()
