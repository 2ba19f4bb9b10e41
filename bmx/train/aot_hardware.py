"""The TPU slices bmx can compile for without having them (the chips themselves: `bmx.train.chips`).

A topology is `GENERATION:SHAPE`, e.g. `v5p:4x4x4` (64 chips, a v5p-128 slice: v4 and v5p count two
TensorCores per chip in the slice name, and JAX sees one device per chip), `v5e:16x16` (v5e-256) or
`v6e:8x8`; `Topology.slices` > 1 is that many such slices joined by the data-center network (DCN).
`jax.experimental.topologies` gives compile-only devices for it through libtpu (`pip install "jax[tpu]"`),
with no TPU attached.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from bmx.train.chips import CHIPS, GiB, Chip  # noqa: F401 - the chip table, re-exported for the AOT tool

# Slice shapes are chips along each ICI axis: 3-D tori for v4/v5p, 2-D meshes for v5e/v6e.
_TPU_RANKS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_MEGACORE = {"v4", "v5p"}


@dataclass(frozen=True)
class Topology:
    generation: str  # a key of CHIPS
    shape: tuple[int, ...]  # chips along each axis of one slice
    slices: int = 1

    @property
    def slice_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def name(self) -> str:
        return self.slice_name if self.slices == 1 else f"{self.slices}x {self.slice_name}"

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape) * self.slices

    @property
    def torus_axes(self) -> tuple[bool, ...]:
        """Whether each axis of the slice wraps around: v4/v5p slices of whole 4x4x4 cubes are 3-D tori;
        v5e/v6e wrap only along a full 16-chip pod edge. Without wraparound a ring along an axis runs at
        half the bandwidth."""
        if self.generation in _MEGACORE:
            return tuple(all(size % 4 == 0 for size in self.shape) for _ in self.shape)
        return tuple(size == 16 for size in self.shape)


def parse_topology(name: str, slices: int = 1) -> Topology:
    if slices < 1:
        raise ValueError(f"--slices {slices}: a run has at least one slice")
    match = re.fullmatch(r"(\w+):(\d+(?:x\d+)*)", name.strip())
    if not match or match.group(1) not in _TPU_RANKS:
        raise ValueError(f"topology {name!r}: expected GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(_TPU_RANKS)}, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8")
    generation, shape = match.group(1), tuple(int(size) for size in match.group(2).split("x"))
    if len(shape) != _TPU_RANKS[generation] or min(shape) < 1:
        raise ValueError(f"topology {name!r}: a {generation} slice has {_TPU_RANKS[generation]} axes of chips, "
                         f"e.g. {'v5p:4x4x4' if _TPU_RANKS[generation] == 3 else 'v5e:16x16'}")
    return Topology(generation, shape, slices)


def compile_only_devices(topology: Topology) -> list:
    """The topology's devices, good for `jit(...).lower(...).compile()` and nothing else."""
    # libtpu takes a machine-wide lock unless told that several processes may load it (pytest workers,
    # a search running beside a test); compile-only use never touches a TPU, so sharing is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as error:  # pragma: no cover - part of jax
        raise RuntimeError("jax.experimental.topologies is missing from this jax") from error
    # Four chips per host (2 × 2), as on every multi-host slice of these generations; smaller slices fit in one.
    hosts = (min(2, topology.shape[0]), min(2, topology.shape[1]), 1)
    options = {"chip_config_name": "megacore"} if topology.generation in _MEGACORE else {}
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology.slice_name,
                                                   chips_per_host_bounds=hosts, num_slices=topology.slices,
                                                   **options)
    except Exception as error:  # noqa: BLE001 - libtpu missing or refusing the shape
        raise RuntimeError(f"cannot make compile-only devices for {topology.name}: {error}. "
                           f"AOT compilation needs libtpu: pip install \"jax[tpu]==<this jax's version>\"") from error
    devices = list(description.devices)
    if len(devices) != topology.num_devices:
        raise RuntimeError(f"{topology.name}: libtpu gave {len(devices)} devices, expected {topology.num_devices}")
    return devices


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None
