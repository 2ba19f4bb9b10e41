"""A mergekit YAML merge configuration, read with `yaml.safe_load` into small dataclasses.

The accepted keys are mergekit 0.1.5's (`models` or `slices`, `merge_method`, `base_model`,
`parameters`, `dtype`, `out_dtype`, `tokenizer_source` or the `tokenizer:` block), so configs written
for mergekit run unchanged. Keys mergekit has but bmx does not implement (`modules`, `chat_template`,
`residual_weight`) are refused by name rather than ignored.

A parameter setting is kept as written, with its `{filter, value}` entries turned into
`Conditional`s; `parameters.py` evaluates it per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import yaml

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "float64")


class MergeConfigError(ValueError):
    """The merge configuration is malformed or asks for something bmx does not do."""


@dataclass(frozen=True)
class Conditional:
    """One `{filter: ..., value: ...}` entry: applies to tensors whose name contains `filter`."""

    value: Any
    filter: str | None = None


@dataclass(frozen=True)
class SliceSource:
    """One input of an output slice: a model and the half-open layer range taken from it.

    `layer_range` is None for the `models:` form, meaning every layer of that model.
    """

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding comes from (mergekit's `TokenEmbeddingConfig`).

    kind: "model" (that model's row for the same token), "model_token" (a given token or id of a
    model), "zero", or None (no source given). `force` uses it even for models that have the token.
    """

    kind: str | None
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """The `tokenizer:` block: vocabulary source, per-token embedding sources, padding of the row count."""

    source: str = "union"
    tokens: Mapping[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    slices: tuple[OutputSlice, ...] | None = None
    models: tuple[SliceSource, ...] | None = None
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    # Directory of the YAML file: relative model paths are resolved against it first.
    config_dir: Path | None = None


_TOP_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer"}
_UNSUPPORTED_TOP_KEYS = {
    "modules": "multi-module models",
    "chat_template": "chat templates",
}


def _check_keys(where: str, entry: Any, allowed: set[str], unsupported: Mapping[str, str] = {}) -> dict:
    if not isinstance(entry, dict):
        raise MergeConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
    for key in entry:
        if key in unsupported:
            raise MergeConfigError(f"{where}: `{key}` ({unsupported[key]}) is not supported by bmx.merge")
        if key not in allowed:
            raise MergeConfigError(f"{where}: unknown key `{key}`; expected one of {sorted(allowed)}")
    return entry


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def parse_setting(where: str, setting: Any) -> Any:
    """A parameter value as mergekit accepts it: scalar, gradient list, `{filter, value}` or a list of those."""
    if _is_scalar(setting):
        return setting
    if isinstance(setting, dict):
        entry = _check_keys(where, setting, {"value", "filter"})
        if "value" not in entry:
            raise MergeConfigError(f"{where}: a conditional parameter needs a `value`")
        filter_ = entry.get("filter")
        if filter_ is not None and not isinstance(filter_, str):
            raise MergeConfigError(f"{where}: `filter` must be a string, got {filter_!r}")
        return Conditional(value=parse_setting(where, entry["value"]), filter=filter_)
    if isinstance(setting, list):
        if all(_is_scalar(item) for item in setting):
            return tuple(setting)
        if all(isinstance(item, dict) for item in setting):
            return tuple(parse_setting(f"{where}[{i}]", item) for i, item in enumerate(setting))
        raise MergeConfigError(f"{where}: a list must hold only scalars (a gradient) or only {{filter, value}} entries")
    raise MergeConfigError(f"{where}: unexpected parameter value {setting!r}")


def _parse_parameters(where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{where}: `parameters` must be a mapping, got {type(raw).__name__}")
    return {name: parse_setting(f"{where}.{name}", value) for name, value in raw.items()}


def _parse_model_name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise MergeConfigError(f"{where}: a model must be a path or name string, got {value!r}")
    if "+" in value:
        raise MergeConfigError(f"{where}: `{value}` applies a LoRA (`model+lora`), which bmx.merge does not support")
    return value


def _parse_source(where: str, raw: Any, needs_range: bool) -> SliceSource:
    allowed = {"model", "parameters"} | ({"layer_range"} if needs_range else set())
    entry = _check_keys(where, raw, allowed)
    if "model" not in entry:
        raise MergeConfigError(f"{where}: missing `model`")
    layer_range = None
    if needs_range:
        span = entry.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise MergeConfigError(f"{where}: `layer_range` must be [start, end] integers, got {span!r}")
        if not 0 <= span[0] < span[1]:
            raise MergeConfigError(f"{where}: `layer_range` {span} must satisfy 0 <= start < end")
        layer_range = (span[0], span[1])
    return SliceSource(
        model=_parse_model_name(f"{where}.model", entry["model"]),
        layer_range=layer_range,
        parameters=_parse_parameters(where, entry.get("parameters")),
    )


def _parse_slice(where: str, raw: Any) -> OutputSlice:
    entry = _check_keys(where, raw, {"sources", "base_model", "parameters"}, {"residual_weight": "residual weights"})
    sources = entry.get("sources")
    if not isinstance(sources, list) or not sources:
        raise MergeConfigError(f"{where}: `sources` must be a non-empty list")
    base = entry.get("base_model")
    return OutputSlice(
        sources=tuple(_parse_source(f"{where}.sources[{i}]", s, needs_range=True) for i, s in enumerate(sources)),
        base_model=_parse_model_name(f"{where}.base_model", base) if base is not None else None,
        parameters=_parse_parameters(where, entry.get("parameters")),
    )


def _parse_token_source(where: str, raw: Any) -> TokenSource:
    entry = _check_keys(where, raw, {"source", "force"})
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise MergeConfigError(f"{where}.force: expected true or false, got {force!r}")
    source = entry.get("source")
    if source is None:
        return TokenSource(kind=None, force=force)
    if isinstance(source, str):
        return TokenSource(kind="model", model=_parse_model_name(f"{where}.source", source), force=force)
    kind = source.get("kind") if isinstance(source, dict) else None
    if kind == "zero":
        _check_keys(f"{where}.source", source, {"kind"})
        return TokenSource(kind="zero", force=force)
    if kind == "model_token":
        _check_keys(f"{where}.source", source, {"kind", "model", "token_id", "token"})
        if ("token_id" in source) == ("token" in source):
            raise MergeConfigError(f"{where}.source: give exactly one of `token_id` or `token`")
        token_id = source.get("token_id")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise MergeConfigError(f"{where}.source.token_id: expected an integer, got {token_id!r}")
        return TokenSource(kind="model_token", model=_parse_model_name(f"{where}.source.model", source.get("model")),
                           token_id=token_id, token=source.get("token"), force=force)
    raise MergeConfigError(f"{where}.source: expected a model name, {{kind: zero}} or {{kind: model_token, model, token_id|token}}, got {source!r}")


def _parse_tokenizer(raw: Any) -> TokenizerSettings:
    entry = _check_keys("tokenizer", raw, {"source", "tokens", "pad_to_multiple_of"})
    source = entry.get("source", "union")
    if not isinstance(source, str) or not source:
        raise MergeConfigError(f"tokenizer.source: expected `union`, `base` or a model, got {source!r}")
    tokens = entry.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise MergeConfigError(f"tokenizer.tokens: expected a mapping of token -> settings, got {type(tokens).__name__}")
    multiple = entry.get("pad_to_multiple_of")
    if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0):
        raise MergeConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {multiple!r}")
    return TokenizerSettings(source=source, pad_to_multiple_of=multiple,
                             tokens={str(token): _parse_token_source(f"tokenizer.tokens[{token!r}]", value or {}) for token, value in tokens.items()})


def _parse_dtype(key: str, value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise MergeConfigError(f"`{key}: {value}` is not a supported dtype; expected one of {SUPPORTED_DTYPES}")
    return name


def parse_merge_config(raw: Any, config_dir: Path | None = None) -> MergeConfig:
    """Validate an already-loaded YAML document and build a `MergeConfig`."""
    entry = _check_keys("merge config", raw, _TOP_KEYS, _UNSUPPORTED_TOP_KEYS)
    if not isinstance(entry.get("merge_method"), str):
        raise MergeConfigError("merge config: `merge_method` (a string) is required")
    has_models, has_slices = bool(entry.get("models")), bool(entry.get("slices"))
    if has_models == has_slices:
        raise MergeConfigError("merge config: exactly one of `models` or `slices` must be given")
    for key in ("models", "slices"):
        if key in entry and not isinstance(entry[key], list):
            raise MergeConfigError(f"merge config: `{key}` must be a list")
    base = entry.get("base_model")
    tokenizer_source = entry.get("tokenizer_source")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise MergeConfigError(f"merge config: `tokenizer_source` must be a string, got {tokenizer_source!r}")
    if tokenizer_source is not None and entry.get("tokenizer") is not None:
        raise MergeConfigError("merge config: give `tokenizer_source` or a `tokenizer:` block, not both")
    return MergeConfig(
        merge_method=entry["merge_method"],
        models=tuple(_parse_source(f"models[{i}]", m, needs_range=False) for i, m in enumerate(entry["models"])) if has_models else None,
        slices=tuple(_parse_slice(f"slices[{i}]", s) for i, s in enumerate(entry["slices"])) if has_slices else None,
        base_model=_parse_model_name("base_model", base) if base is not None else None,
        parameters=_parse_parameters("parameters", entry.get("parameters")),
        dtype=_parse_dtype("dtype", entry.get("dtype")),
        out_dtype=_parse_dtype("out_dtype", entry.get("out_dtype")),
        tokenizer_source=tokenizer_source,
        tokenizer=_parse_tokenizer(entry["tokenizer"]) if entry.get("tokenizer") is not None else None,
        config_dir=config_dir,
    )


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read a mergekit YAML file (safe_load: plain data only, no Python objects)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MergeConfigError(f"{path}: not valid YAML ({error})") from None
    try:
        return parse_merge_config(raw, config_dir=path.resolve().parent)
    except MergeConfigError as error:
        raise MergeConfigError(f"{path}: {error}") from None
