"""Paths that may be local or on an object store (`gs://bucket/…`): one place that tells them apart."""

from __future__ import annotations

from etils import epath


def is_local(path: epath.PathLike) -> bool:
    return "://" not in str(path)


def absolute(path: epath.PathLike) -> epath.Path:
    """`path` as an absolute `epath.Path` (orbax wants absolute paths; `gs://…` already is one and
    `epath.Path.absolute()` would glue the working directory in front of it)."""
    path = epath.Path(path)
    return path.absolute() if is_local(path) else path
