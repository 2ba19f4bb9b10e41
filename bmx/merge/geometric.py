"""Merges that work with angles and norms: Model Stock, NuSLERP, Multi-SLERP, Karcher mean.

Each follows mergekit 0.1.5's kernel operation for operation, in the merge dtype (Karcher measures
norms in float32, as mergekit does). Python-float coefficients that mergekit computes in float64
are computed on the host here too and passed in as float32 scalars.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bmx.merge.methods import compute_dtype
from bmx.merge.model_axis import mean_models, sum_models


@partial(jax.jit, static_argnames=("filter_wise",))
def model_stock(base: jax.Array, others: tuple[jax.Array, ...], filter_wise: bool) -> jax.Array:
    """Average of the fine-tunes pulled towards the base by t = k·cos / (1 + (k−1)·cos).

    cos is the mean pairwise cosine between the fine-tunes' deltas from the base, over the whole
    tensor, or per row with `filter_wise`. Where 1 + (k−1)·cos vanishes the base is kept.
    """
    shape = base.shape
    if filter_wise:
        if base.ndim == 1:
            base, others = base[None], tuple(w[None] for w in others)
    else:
        base, others = base.reshape(-1), tuple(w.reshape(-1) for w in others)
    offsets = [w - base for w in others]
    cosines = []
    for index, a in enumerate(offsets):
        for b in offsets[index + 1:]:
            norm_product = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
            cosines.append(jnp.clip(jnp.sum(a * b, axis=-1) / jnp.maximum(norm_product, 1e-6), -1, 1))
    cos_theta = mean_models(jnp.stack(cosines))[..., None]
    count = len(others)
    denominator = 1 + (count - 1) * cos_theta
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, jnp.zeros_like(cos_theta), (count * cos_theta) / jnp.where(singular, 1, denominator))
    average = others[0]
    for w in others[1:]:
        average = average + w
    average = average / count
    return (t * average + (1 - t) * base).reshape(shape)


def nuslerp_t(weights: list[float]) -> float:
    """mergekit's interpolation position from the two weights (0.5 when they cancel)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@partial(jax.jit, static_argnames=("row_wise", "flatten"))
def nuslerp(t: jax.Array, one_minus_t: jax.Array, v0: jax.Array, v1: jax.Array, row_wise: bool, flatten: bool) -> jax.Array:
    """SLERP from v0 (t = 0) to v1 along the last axis, the first (`row_wise`) or the whole tensor (`flatten`)."""
    shape = v0.shape
    transpose = row_wise and not flatten and v0.ndim > 1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif transpose:
        v0, v1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)

    def normalize(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    dtype = v0.dtype
    t, one_minus_t = t.astype(dtype), one_minus_t.astype(dtype)
    cos_theta = jnp.clip(jnp.sum(normalize(v0) * normalize(v1), axis=-1, keepdims=True), -1, 1)
    colinear = (1 - jnp.square(cos_theta)) <= 1e-8**2
    theta = jnp.arccos(jnp.where(colinear, 0, cos_theta))
    sin_theta = jnp.sin(theta)
    spherical = (jnp.sin(one_minus_t * theta) * v0 + jnp.sin(t * theta) * v1) / sin_theta
    result = jnp.where(colinear, one_minus_t * v0 + t * v1, spherical)
    if transpose:
        result = jnp.swapaxes(result, 0, -1)
    return result.reshape(shape)


@partial(jax.jit, static_argnames=("normalize_weights",))
def multislerp(tensors: tuple[jax.Array, ...], base: jax.Array | None, weights: jax.Array, eps: jax.Array,
               normalize_weights: bool) -> tuple[jax.Array, jax.Array]:
    """Barycentric interpolation on the hypersphere: tangent-space mean at the weighted Euclidean mean.

    Returns (merged, degenerate): `degenerate` is True where the weighted mean of the unit vectors
    vanished and there were more than two inputs (mergekit raises; two inputs fall back to lerp).
    """
    stacked = jnp.stack(tensors)  # [inputs, *shape]
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(stacked.shape[0], -1)
    dtype = stacked.dtype
    weights, eps = weights.astype(dtype), eps.astype(dtype)
    if normalize_weights:
        weights = weights / jnp.sum(weights)
    norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = sum_models(units * weights[:, None])
    mean_norm = jnp.linalg.norm(mean)
    collapsed = mean_norm < eps
    mean = mean / mean_norm
    dots = jnp.sum(units * mean, axis=-1, keepdims=True)
    tangents = units - dots * mean
    tangent = sum_models(tangents * weights[:, None])
    tangent_norm = jnp.linalg.norm(tangent) + eps
    result = mean * jnp.cos(tangent_norm) + tangent * (jnp.sin(tangent_norm) / tangent_norm)
    result = (result * jnp.sum(norms[:, 0] * weights)).reshape(stacked.shape[1:])
    if len(tensors) == 2:
        result = jnp.where(collapsed, (stacked[0] * weights[0] + stacked[1] * weights[1]), result)
    if base is not None:
        result = result + base
    return result, collapsed & (len(tensors) != 2)


def _norm32(x: jax.Array) -> jax.Array:
    return jnp.linalg.norm(x.astype(compute_dtype(x.dtype)).reshape(-1))


def karcher_weight_table(count: int) -> np.ndarray:
    """Row c: the weight of each valid input when c of the `count` inputs are valid (non-zero).

    mergekit renormalises its equal weights 1/n over the valid inputs in Python floats; which
    inputs are valid depends on the data, so every case is precomputed here. [count + 1]
    """
    alpha = 1.0 / count
    return np.asarray([0.0] + [alpha / sum([alpha] * valid) for valid in range(1, count + 1)], np.float32)


@jax.jit
def karcher(tensors: tuple[jax.Array, ...], weight_table: jax.Array, max_iter: jax.Array, tol: jax.Array) -> jax.Array:
    """mergekit's Karcher mean with equal weights: iterate on the sphere, rescale by the mean norm.

    mergekit's data-dependent branches (zero inputs dropped, a vanishing first mean, inputs already
    within tol of the mean, convergence) are masks and a `while_loop` condition here. Norms are
    measured in float32 (float64 for float64 inputs), as mergekit does.
    """
    dtype = tensors[0].dtype
    count = len(tensors)
    norms = jnp.stack([_norm32(t) for t in tensors])  # [inputs]
    units = jnp.stack([jnp.where(n == 0, jnp.zeros_like(t), (t / n.astype(dtype)).astype(dtype)) for t, n in zip(tensors, norms)])
    valid = norms > tol
    weights = jnp.where(valid, weight_table[jnp.sum(valid)], 0).astype(jnp.float32)  # normalised over valid inputs
    mean = jnp.zeros_like(units[0])
    for index in range(count):
        mean = jnp.where(valid[index], mean + weights[index].astype(dtype) * units[index], mean)
    mean_norm = _norm32(mean)
    first_valid = units[jnp.argmax(valid)]
    mean = jnp.where(mean_norm < tol, first_valid, (mean / mean_norm.astype(dtype)).astype(dtype))

    def tangent_at(mean):
        tangent = jnp.zeros_like(mean)
        for index in range(count):
            unit = units[index]
            dot = jnp.clip(jnp.dot(mean.reshape(-1), unit.reshape(-1)), -1.0, 1.0)
            theta = jnp.arccos(dot)
            step = weights[index].astype(dtype) * (theta / jnp.sin(theta)) * (unit - dot * mean)
            tangent = jnp.where(valid[index] & (theta >= tol), tangent + step, tangent)
        return tangent

    def iterate(state):
        iteration, mean, _ = state
        tangent = tangent_at(mean)
        tangent_norm = _norm32(tangent)
        converged = tangent_norm < tol
        norm = tangent_norm.astype(dtype)
        stepped = (jnp.cos(norm) * mean + jnp.sin(norm) * (tangent / norm)).astype(dtype)
        unit_norm = _norm32(stepped)
        stepped = jnp.where(unit_norm > tol, (stepped / unit_norm.astype(dtype)).astype(dtype), stepped)
        return iteration + 1, jnp.where(converged, mean, stepped), converged

    _, mean, _ = jax.lax.while_loop(lambda s: (s[0] < max_iter) & ~s[2], iterate, (jnp.int32(0), mean, jnp.bool_(False)))
    scale = jnp.zeros((), norms.dtype)
    for index in range(count):
        scale = scale + np.float32(1.0 / count) * norms[index]
    result = (scale * mean).astype(dtype)
    return jnp.where(jnp.any(valid), result, jnp.zeros_like(result))
