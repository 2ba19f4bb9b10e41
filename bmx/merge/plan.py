"""Turn a merge config and its input models into one `TensorPlan` per output tensor.

Planning does every check that needs no tensor data (input counts, base model, layer ranges,
shapes, dtypes, every parameter resolved for every tensor), so a bad merge fails here,
before anything is written. It follows mergekit's planner: a `models:` config is one slice over
all layers (the base is added if it is not listed); layers get t = i/(L-1) within their slice,
weights outside the layers t = 0 and come from the first (embeddings) or last (final norm,
head) slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bmx.merge.config import MergeConfig, MergeConfigError, OutputSlice, SliceSource
from bmx.merge.method_specs import BasePolicy, MethodSpec, Sparsification, check_parameter_names
from bmx.merge.models import IncompatibleModelsError, InputModel
from bmx.merge.parameters import Scope, resolve_parameter

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
}


@dataclass(frozen=True)
class TensorInput:
    model: str  # reference in the config
    name: str  # tensor name inside that model
    parameters: Mapping[str, Any]  # per-input values (weight, density); the base gets only input-scoped ones


@dataclass(frozen=True)
class TensorPlan:
    name: str  # output tensor name
    inputs: tuple[TensorInput, ...]
    base_index: int | None
    parameters: Mapping[str, Any]  # shared values (t, normalize, lambda, ...)
    t: float  # position of the layer within its slice, 0 outside layers
    shape: tuple[int, ...]
    work_dtype: np.dtype  # what the inputs are cast to before merging (mergekit's `dtype`)
    out_dtype: np.dtype
    vocabulary: bool = False  # rows indexed by token id, re-indexed to the output tokenizer before merging


@dataclass(frozen=True)
class MergePlan:
    method: MethodSpec
    tensors: tuple[TensorPlan, ...]
    num_layers: int  # of the output model


def output_slices(config: MergeConfig, models: Mapping[str, InputModel]) -> tuple[OutputSlice, ...]:
    """The config as slices: `models:` becomes one slice over every layer, with the base appended if absent."""
    if config.slices is not None:
        return config.slices
    sources = [SliceSource(m.model, (0, models[m.model].num_layers), m.parameters) for m in config.models]
    if config.base_model is not None and config.base_model not in {s.model for s in sources}:
        sources.append(SliceSource(config.base_model, (0, models[config.base_model].num_layers)))
    return (OutputSlice(tuple(sources)),)


def _check_count(where: str, method: MethodSpec, what: str, count: int, minimum: int, maximum: int | None) -> None:
    if minimum <= count and (maximum is None or count <= maximum):
        return
    expected = f"exactly {minimum}" if minimum == maximum else (f"at least {minimum}" if count < minimum else f"at most {maximum}")
    raise MergeConfigError(f"{where}: {method.name} needs {expected} {what}, got {count}")


def _slice_base_index(method: MethodSpec, config: MergeConfig, slice_: OutputSlice, where: str) -> int | None:
    """The base's position among the slice's sources (None: no base), after mergekit's input-contract checks."""
    references = [s.model for s in slice_.sources]
    if len(set(references)) != len(references):
        raise MergeConfigError(f"{where}: a model is listed twice among the sources {references}")
    base = None if method.base is BasePolicy.IGNORED else (slice_.base_model or config.base_model)
    if base is not None and base not in references:
        raise MergeConfigError(f"{where}: base_model `{base}` is not among the sources {references}")
    if method.base is BasePolicy.REQUIRED and base is None:
        raise MergeConfigError(f"{where}: {method.name} needs a `base_model`")
    _check_count(where, method, "input models", len(references), method.min_inputs, method.max_inputs)
    if method.min_non_base is not None or method.max_non_base is not None:
        non_base = len(references) - (base is not None)
        _check_count(where, method, "models besides the base", non_base, method.min_non_base or 0, method.max_non_base)
    return None if base is None else references.index(base)


def _check_layer_ranges(slice_: OutputSlice, models: Mapping[str, InputModel], where: str) -> int:
    lengths = set()
    for source in slice_.sources:
        start, end = source.layer_range
        available = models[source.model].num_layers
        if end > available:
            raise MergeConfigError(f"{where}: layer_range {[start, end]} of `{source.model}` exceeds its {available} layers")
        lengths.add(end - start)
    if len(lengths) != 1:
        raise MergeConfigError(f"{where}: all sources of a slice must span the same number of layers, got {sorted(lengths)}")
    return lengths.pop()


def _check_della_window(values: Mapping[str, Any], where: str) -> None:
    """mergekit raises this mid-merge (`della_magprune`); bmx finds it before writing anything."""
    density, epsilon = values["density"], values["epsilon"]
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise MergeConfigError(f"{where}: epsilon {epsilon} must keep density ± epsilon inside (0, 1) (density {density})")


class _Planner:
    def __init__(self, config: MergeConfig, method: MethodSpec, models: Mapping[str, InputModel], vocabulary_rows: int | None):
        self.config, self.method, self.models = config, method, models
        self.vocabulary_rows = vocabulary_rows
        self.tensors: list[TensorPlan] = []

    def plan_tensor(self, out_name: str, in_names: list[str], slice_: OutputSlice, base_index: int | None, t: float) -> None:
        sources = slice_.sources
        present = [name in self.models[s.model].weights for s, name in zip(sources, in_names)]
        if not any(present) and out_name in self.models[sources[0].model].architecture.tied_weights:
            return  # tied to the embedding in every input: nothing to write
        specs = [self.models[s.model].weights.spec(name) for s, name in zip(sources, in_names)]
        shapes = {s.model: spec.shape for s, spec in zip(sources, specs)}
        vocabulary = out_name in self.models[sources[0].model].architecture.vocabulary_weights
        realigned = vocabulary and self.vocabulary_rows is not None  # rows are re-indexed to the output tokenizer
        compared = {model: shape[1:] for model, shape in shapes.items()} if realigned else shapes
        if len(set(compared.values())) > 1:
            hint = " (different vocabularies? set tokenizer_source)" if vocabulary and not realigned else ""
            raise IncompatibleModelsError(f"tensor {out_name!r}: shapes differ between models {shapes}{hint}")
        shape = (self.vocabulary_rows, *specs[0].shape[1:]) if realigned else specs[0].shape
        for source, spec in zip(sources, specs):
            if not jnp.issubdtype(spec.dtype, jnp.floating):
                raise IncompatibleModelsError(f"model `{source.model}`: tensor {spec.name!r} has dtype {spec.dtype}; only floating-point weights can be merged")
        work_dtype = DTYPES[self.config.dtype] if self.config.dtype else np.dtype(reduce(jnp.promote_types, (spec.dtype for spec in specs)))
        out_dtype = DTYPES[self.config.out_dtype] if self.config.out_dtype else work_dtype
        if np.float64 in (work_dtype, out_dtype) and not jax.config.jax_enable_x64:
            raise MergeConfigError(f"tensor {out_name!r}: merging in float64 needs JAX's 64-bit mode (set JAX_ENABLE_X64=1)")

        shared_scopes = (slice_.parameters, self.config.parameters)
        shared = {p.name: resolve_parameter(p, shared_scopes, out_name, t, out_name) for p in self.method.shared_parameters}
        inputs = []
        for index, (source, name) in enumerate(zip(sources, in_names)):
            scopes = (source.parameters, slice_.parameters, self.config.parameters)
            wanted = [p for p in self.method.input_parameters if index != base_index or p.scope is Scope.INPUT]
            values = {p.name: resolve_parameter(p, scopes, name, t, f"model `{source.model}`, tensor {name!r}") for p in wanted}
            if self.method.sparsification is Sparsification.DELLA_MAGPRUNE and index != base_index:
                _check_della_window(values, f"model `{source.model}`, tensor {name!r}")
            inputs.append(TensorInput(source.model, name, values))
        self.tensors.append(TensorPlan(out_name, tuple(inputs), base_index, shared, t, shape, work_dtype, out_dtype, realigned))

    def plan_slice(self, slice_: OutputSlice, base_index: int | None, first_output_layer: int, length: int) -> None:
        architecture = self.models[slice_.sources[0].model].architecture
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            out_names = architecture.layer_names(first_output_layer + offset)
            in_names = [architecture.layer_names(s.layer_range[0] + offset) for s in slice_.sources]
            for position, out_name in enumerate(out_names):
                self.plan_tensor(out_name, [names[position] for names in in_names], slice_, base_index, t)


def plan_merge(config: MergeConfig, method: MethodSpec, models: Mapping[str, InputModel], vocabulary_rows: int | None = None) -> MergePlan:
    """One TensorPlan per output tensor; `vocabulary_rows`: the output tokenizer's size when embeddings are re-indexed."""
    check_parameter_names(method, "parameters", config.parameters)
    slices = output_slices(config, models)
    planner = _Planner(config, method, models, vocabulary_rows)
    bases, lengths = [], []
    for index, slice_ in enumerate(slices):
        where = f"slices[{index}]" if config.slices is not None else "models"
        check_parameter_names(method, f"{where}.parameters", slice_.parameters)
        for source in slice_.sources:
            check_parameter_names(method, f"{where}: model `{source.model}` parameters", source.parameters)
        bases.append(_slice_base_index(method, config, slice_, where))
        lengths.append(_check_layer_ranges(slice_, models, where))
    architecture = models[slices[0].sources[0].model].architecture

    for name in architecture.pre_weights:
        planner.plan_tensor(name, [name] * len(slices[0].sources), slices[0], bases[0], 0.0)
    first_layer = 0
    for slice_, base_index, length in zip(slices, bases, lengths):
        planner.plan_slice(slice_, base_index, first_layer, length)
        first_layer += length
    for name in architecture.post_weights:
        planner.plan_tensor(name, [name] * len(slices[-1].sources), slices[-1], bases[-1], 0.0)
    return MergePlan(method, tuple(planner.tensors), num_layers=first_layer)
