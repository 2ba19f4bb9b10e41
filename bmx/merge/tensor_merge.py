"""Merge one output tensor: pick the method's math and feed it the tensor's resolved parameters."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bmx.merge import entrywise, geometric, methods, sparsification
from bmx.merge.drop_masks import DropMasks
from bmx.merge.method_specs import MethodSpec, Sparsification
from bmx.merge.plan import TensorPlan


@dataclass(frozen=True)
class SlerpRecord:
    """What SLERP did on one tensor: the cosine between the inputs and whether it fell back to lerp."""

    name: str
    t: float
    cosine: float
    linear_fallback: bool


def merge_tensor(
    method: MethodSpec, plan: TensorPlan, tensors: list[jax.Array], drop_masks: DropMasks
) -> tuple[jax.Array, SlerpRecord | None]:
    """The merged tensor (in the plan's work dtype, float32 for arcee_fusion) from its inputs in that dtype."""
    if method.name == "slerp":
        base, other = tensors[plan.base_index], tensors[1 - plan.base_index]
        merged, cosine, linear_fallback = methods.slerp(np.float32(plan.parameters["t"]), base, other)
        return merged, SlerpRecord(plan.name, plan.parameters["t"], float(cosine), bool(linear_fallback))
    if method.task_vectors:
        return _merge_task_vectors(method, plan, tensors, drop_masks), None
    return _MERGES[method.name](plan, tensors, drop_masks), None


def _non_base(plan: TensorPlan, tensors: list[jax.Array]):
    """(input plan, tensor) of every input but the base, in config order."""
    return [(inp, tensor) for index, (inp, tensor) in enumerate(zip(plan.inputs, tensors)) if index != plan.base_index]


def _base(plan: TensorPlan, tensors: list[jax.Array]) -> jax.Array | None:
    return None if plan.base_index is None else tensors[plan.base_index]


def _linear(plan, tensors, _masks):
    weights = np.asarray([i.parameters["weight"] for i in plan.inputs], np.float32)
    return methods.linear(tuple(tensors), weights, normalize=plan.parameters["normalize"])


def _passthrough(plan, tensors, _masks):
    scale = plan.inputs[0].parameters["scale"]
    if scale is None:
        return tensors[0]  # bit for bit
    tensor = tensors[0]
    return (tensor.astype(methods.compute_dtype(tensor.dtype)) * np.float32(scale)).astype(tensor.dtype)


def _model_stock(plan, tensors, _masks):
    others = tuple(t for _, t in _non_base(plan, tensors))
    return geometric.model_stock(_base(plan, tensors), others, filter_wise=plan.parameters["filter_wise"])


def _nuslerp(plan, tensors, _masks):
    (first_input, first), (second_input, second) = _non_base(plan, tensors)
    t = geometric.nuslerp_t([first_input.parameters["weight"], second_input.parameters["weight"]])
    base = _base(plan, tensors)
    if base is not None:
        first, second = first - base, second - base
    merged = geometric.nuslerp(np.float32(t), np.float32(1 - t), first, second,
                               row_wise=plan.parameters["nuslerp_row_wise"], flatten=plan.parameters["nuslerp_flatten"])
    return merged if base is None else base + merged


def _multislerp(plan, tensors, _masks):
    others = _non_base(plan, tensors)
    if len(others) == 1:
        return others[0][1]
    weights = np.asarray([inp.parameters["weight"] for inp, _ in others], np.float32)
    merged, degenerate = geometric.multislerp(tuple(t for _, t in others), _base(plan, tensors), weights,
                                              np.float32(plan.parameters["eps"]),
                                              normalize_weights=plan.parameters["normalize_weights"])
    if bool(degenerate):
        raise ValueError(f"tensor {plan.name!r}: multislerp's weighted sum of the inputs' directions is zero "
                         "(antipodal inputs with balancing weights); choose other weights")
    return merged


def _karcher(plan, tensors, _masks):
    if len(tensors) == 1:
        return tensors[0]
    return geometric.karcher(tuple(tensors), geometric.karcher_weight_table(len(tensors)),
                             np.int32(plan.parameters["max_iter"]), np.float32(plan.parameters["tol"]))


def _sce(plan, tensors, _masks):
    others = tuple(t for _, t in _non_base(plan, tensors))
    if not others:
        return tensors[plan.base_index]
    return entrywise.sce(tensors[plan.base_index], others, np.float32(plan.parameters["select_topk"]),
                         int8_mask=plan.parameters["int8_mask"])


def _nearswap(plan, tensors, _masks):
    (_, other), = _non_base(plan, tensors)
    return entrywise.nearswap(tensors[plan.base_index], other, np.float32(plan.parameters["t"]))


def _arcee_fusion(plan, tensors, masks):
    (_, other), = _non_base(plan, tensors)
    base = tensors[plan.base_index]
    importance = entrywise.arcee_importance(base, other)
    sample = importance
    if importance.size > entrywise.ARCEE_QUANTILE_SAMPLE:  # mergekit samples with replacement here
        picks = masks.sample_indices(plan.name, importance.size, entrywise.ARCEE_QUANTILE_SAMPLE)
        sample = importance.reshape(-1)[picks]
    return entrywise.arcee_fusion(base, other, importance, sample)


def _ram(plan, tensors, _masks):
    others = tuple(t for _, t in _non_base(plan, tensors))
    if not others:
        return tensors[plan.base_index]
    return entrywise.ram(tensors[plan.base_index], others, np.float32(plan.parameters["epsilon"]))


def _ramplus_tl(plan, tensors, _masks):
    others = tuple(t for _, t in _non_base(plan, tensors))
    if not others:
        return tensors[plan.base_index]
    p = plan.parameters
    return entrywise.ramplus_tl(tensors[plan.base_index], others, np.float32(p["r"]), np.float32(p["alpha"]), np.float32(p["epsilon"]))


_MERGES = {
    "linear": _linear, "passthrough": _passthrough, "model_stock": _model_stock, "nuslerp": _nuslerp,
    "multislerp": _multislerp, "karcher": _karcher, "sce": _sce, "nearswap": _nearswap,
    "arcee_fusion": _arcee_fusion, "ram": _ram, "ramplus_tl": _ramplus_tl,
}


def _sparsified_delta(method: MethodSpec, plan: TensorPlan, delta: jax.Array, parameters, position: int, drop_masks: DropMasks) -> jax.Array:
    density, rescale = parameters["density"], plan.parameters["rescale"]
    kind = method.sparsification
    if kind is None or density >= 1:
        return delta
    if kind is Sparsification.MAGNITUDE:
        if density <= 0 or delta.size == 0:
            return jnp.zeros_like(delta)
        keep_count = max(1, int(density * delta.size))
        return methods.keep_largest(delta, np.int32(keep_count), rescale=rescale)
    if kind is Sparsification.MAGNITUDE_OUTLIERS:
        dropped_below, kept = sparsification.outlier_band(delta.size, density, parameters["gamma"])
        return sparsification.keep_magnitude_band(delta, np.int32(dropped_below), np.int32(kept), rescale=rescale)
    if kind is Sparsification.DELLA_MAGPRUNE:
        if density <= 0:
            return jnp.zeros_like(delta)
        epsilon = parameters["epsilon"]
        probabilities = sparsification.della_keep_probabilities(delta, np.float32(density - epsilon), np.float32(epsilon))
        keep = drop_masks(plan.name, position, probabilities.shape, probabilities)
        return sparsification.della_drop(delta, keep, rescale=rescale)
    keep = drop_masks(plan.name, position, plan.shape, density)
    return methods.drop_random(delta, keep, rescale=rescale)


def _merge_task_vectors(method: MethodSpec, plan: TensorPlan, tensors: list[jax.Array], drop_masks: DropMasks) -> jax.Array:
    base = tensors[plan.base_index]
    others = _non_base(plan, tensors)
    if not others:
        return base
    if base.size >= 2**31:
        raise ValueError(f"tensor {plan.name!r} has {base.size} entries; sparsification indexes with int32")
    deltas = tuple(
        _sparsified_delta(method, plan, tensor - base, inp.parameters, position, drop_masks)
        for position, (inp, tensor) in enumerate(others)
    )
    # Weights are rounded straight to the merge dtype, as mergekit builds them (torch.tensor(..., dtype)).
    weights = np.asarray([inp.parameters["weight"] for inp, _ in others], dtype=plan.work_dtype)
    return methods.merge_task_vectors(
        base,
        deltas,
        weights,
        np.asarray(plan.parameters["lambda"], methods.compute_dtype(plan.work_dtype)),
        sign_consensus=method.sign_consensus,
        normalize=plan.parameters["normalize"],
        int8_mask=plan.parameters["int8_mask"],
    )
