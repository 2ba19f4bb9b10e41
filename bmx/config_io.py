"""YAML → nested dataclasses, with `key.sub=value` overrides and errors that list the valid keys.

Config dataclasses live next to the code they configure; this module only knows how to fill them:
an unknown key or a value of the wrong type is an error naming the key and what was expected.
A file may `include:` others (see `load_yaml`), so a config states only what differs from its base.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Sequence

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that bmx cannot accept."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _yaml_key(name: str) -> str:
    """Python names that are keywords (`from`) are spelled with a trailing underscore in the dataclass."""
    return name[:-1] if name.endswith("_") else name


def _coerce(value: Any, expected: Any, key: str) -> Any:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {expected}")
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(map(_yaml_key, _field_types(expected)))}, got {value!r}")
        return from_dict(expected, value, prefix=f"{key}.")
    if origin is typing.Literal:
        if value not in typing.get_args(expected):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(expected))}")
        return value
    if origin is dict:  # typing.get_origin gives the builtin for typing.Dict too
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return (tuple if origin is tuple else list)(value)
    if expected is Any:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML reads "2e-5" as a string
            return float(value)
        except ValueError:
            pass
    if expected in (int, float, str, bool) and not (isinstance(value, expected) and
                                                    not (expected is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    types_by_name = _field_types(cls)
    by_yaml_key = {_yaml_key(name): name for name in types_by_name}
    unknown = sorted(set(values) - set(by_yaml_key))
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + key for key in unknown)}; valid keys here: "
                          f"{', '.join(prefix + key for key in sorted(by_yaml_key))}")
    kwargs = {by_yaml_key[key]: _coerce(value, types_by_name[by_yaml_key[key]], prefix + key)
              for key, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {_yaml_key(field.name): convert(getattr(value, field.name)) for field in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(item) for item in value]
        return value

    return convert(config)


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (the value parsed as YAML) to a nested dict, returning a copy."""
    import copy

    values = copy.deepcopy(values)
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key:
            raise ConfigError(f"override {override!r} is not of the form key.sub=value")
        node = values
        *parents, leaf = key.split(".")
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {parent} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: not valid YAML: {getattr(error, 'problem', None) or error}") from None
    return values


INCLUDE_KEY = "include"


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: mappings merge key by key, anything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:  # also the refusal of tags such as !!python/object
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


def load_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving `include: FILE` (or a list of files) first.

    Included files are read in order, each overriding the previous, and the including file's own keys
    override them all; paths are relative to the including file. This lets a hardware config state
    only what differs from the recipe it includes.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _including:
        chain = " -> ".join(str(p) for p in (*_including, resolved))
        raise ConfigError(f"{path}: include cycle: {chain}")
    values = _read_mapping(path)
    includes = values.pop(INCLUDE_KEY, None)
    if includes is None:
        return values
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not includes or not all(isinstance(item, str) for item in includes):
        raise ConfigError(f"{path}: {INCLUDE_KEY}: expected a file name or a list of file names, got {includes!r}")
    merged: dict[str, Any] = {}
    for item in includes:
        included = path.parent / item
        if not included.is_file():
            raise ConfigError(f"{path}: {INCLUDE_KEY}: {item} not found (looked for {included})")
        merged = merge_values(merged, load_yaml(included, (*_including, resolved)))
    return merge_values(merged, values)


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    values = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(values, overrides))
