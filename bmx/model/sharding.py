"""Logical axis names → device mesh: the one place where the model meets the mesh.

Parameters and activations are annotated with logical names; a table of rules (owned by the
trainer's config) maps each name to mesh axes. Outside a `logical_sharding` context, `constrain`
does nothing, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("bmx_logical_sharding", default=None)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names.

    A mesh axis already used by an earlier dimension is not used again (the later dimension stays
    replicated), so one rule table serves every array.
    """
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name in logical_axes:
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(axis for axis in axes if axis not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def logical_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context, `constrain` pins activations to the mesh according to `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_logical_sharding() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the enclosing `logical_sharding` context, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))
