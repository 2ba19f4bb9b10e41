"""Per-tensor parameter values: filters, gradients and precedence, as mergekit 0.1.5 resolves them.

A setting is a scalar, a gradient (a list of numbers: layer i of L gets t = i/(L-1), placed on the
list's points and interpolated linearly between neighbours), a `{filter, value}` entry or a list
of them (the first whose filter is a substring of the tensor name wins; no filter or `*` matches
everything). Settings are looked up from the most specific scope to the least: the model's own
`parameters`, then the slice's, then the top-level ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from collections.abc import Iterable, Mapping

from bmx.merge.config import Conditional, MergeConfigError

REQUIRED = object()
OPTIONAL_FLOAT = "optional float"  # a number or None (passthrough's `scale`)


class Scope(StrEnum):
    """Which inputs a parameter is given for."""

    SHARED = "shared"  # one value per tensor (e.g. slerp's t)
    INPUT = "input"  # one value per input model (e.g. linear's weight)
    NON_BASE = "non_base"  # one value per input except the base (e.g. ties' density)


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    kind: type | str  # float, int, bool or OPTIONAL_FLOAT
    scope: Scope
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


_TRUE_WORDS = {"true", "yes", "on", "1", "t", "y"}
_FALSE_WORDS = {"false", "no", "off", "0", "f", "n"}


def coerce(spec: ParameterSpec, value: Any, where: str) -> float | bool:
    """A YAML scalar as the parameter's type (PyYAML reads `1e-3` as a string, so numeric text counts)."""
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise MergeConfigError(f"{where}: parameter `{spec.name}` must be a boolean, got {value!r}")
    if spec.kind is OPTIONAL_FLOAT and value is None:
        return None
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise MergeConfigError(f"{where}: parameter `{spec.name}` must be a number, got {value!r}")
    if spec.kind is int:  # pydantic's lax int: whole numbers only
        if not number.is_integer():
            raise MergeConfigError(f"{where}: parameter `{spec.name}` must be a whole number, got {value!r}")
        return int(number)
    return number


def evaluate_setting(spec: ParameterSpec, setting: Any, tensor_name: str, t: float, where: str) -> Any:
    """The value of one setting for one tensor at layer position t, or None if no filter matched."""
    if isinstance(setting, Conditional):
        setting = (setting,)
    if not isinstance(setting, tuple):
        return coerce(spec, setting, where)
    if not setting:
        return None
    if not any(isinstance(entry, Conditional) for entry in setting):
        values = [coerce(spec, entry, where) for entry in setting]
        if spec.kind is bool or None in values:  # discrete values are picked, not interpolated
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        lower = int(scaled)
        upper = min(len(values) - 1, lower + 1)
        fraction = scaled - lower
        return coerce(spec, (1 - fraction) * values[lower] + fraction * values[upper], where)
    for condition in setting:
        if condition.filter is None or condition.filter == "*" or (tensor_name and condition.filter in tensor_name):
            return evaluate_setting(spec, condition.value, tensor_name, t, where)
    return None


def resolve_parameter(
    spec: ParameterSpec, scopes: Iterable[Mapping[str, Any]], tensor_name: str, t: float, where: str
) -> Any:
    """The first scope (most specific first) whose setting yields a value; else the default."""
    for scope in scopes:
        if spec.name in scope:
            value = evaluate_setting(spec, scope[spec.name], tensor_name, t, where)
            if value is not None:
                return value
    if spec.required:
        raise MergeConfigError(f"{where}: missing required parameter `{spec.name}`")
    return spec.default
