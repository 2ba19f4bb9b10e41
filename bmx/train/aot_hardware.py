"""The accelerators bmx can compile for without having them: HBM, peak FLOP/s, bandwidth, topologies.

A topology is `GENERATION:SHAPE`, e.g. `v5p:4x4x4` (64 chips, a v5p-128 slice: v4 and v5p count two
TensorCores per chip in the slice name, and JAX sees one device per chip), `v5e:16x16` (v5e-256) or
`v6e:8x8`. `jax.experimental.topologies` gives compile-only devices for it through libtpu
(`pip install "jax[tpu]"`), with no TPU attached.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from bmx.train.flops import PEAK_FLOPS_BY_DEVICE_KIND

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per device, as the vendor states it
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device
    source: str


# One device per chip (v4/v5p megacore: JAX sees the chip's two TensorCores as one device).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, PEAK_FLOPS_BY_DEVICE_KIND["TPU v4"], 1200e9,
               "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s"),
    "v5e": Chip("TPU v5e", 16 * GiB, PEAK_FLOPS_BY_DEVICE_KIND["TPU v5e"], 819e9,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s"),
    "v5p": Chip("TPU v5p", 95 * GiB, PEAK_FLOPS_BY_DEVICE_KIND["TPU v5p"], 2765e9,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s"),
    "v6e": Chip("TPU v6e", 32 * GiB, PEAK_FLOPS_BY_DEVICE_KIND["TPU v6e"], 1640e9,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s"),
    "h100": Chip("NVIDIA H100 SXM", 80 * 10**9, PEAK_FLOPS_BY_DEVICE_KIND["NVIDIA H100"], 3.35e12,
                 "NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3, 3.35 TB/s"),
}

# Slice shapes are chips along each ICI axis: 3-D tori for v4/v5p, 2-D meshes for v5e/v6e.
_TPU_RANKS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_MEGACORE = {"v4", "v5p"}


@dataclass(frozen=True)
class Topology:
    generation: str  # a key of CHIPS
    shape: tuple[int, ...]  # chips along each axis

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)


def parse_topology(name: str) -> Topology:
    match = re.fullmatch(r"(\w+):(\d+(?:x\d+)*)", name.strip())
    if not match or match.group(1) not in _TPU_RANKS:
        raise ValueError(f"topology {name!r}: expected GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(_TPU_RANKS)}, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8")
    generation, shape = match.group(1), tuple(int(size) for size in match.group(2).split("x"))
    if len(shape) != _TPU_RANKS[generation] or min(shape) < 1:
        raise ValueError(f"topology {name!r}: a {generation} slice has {_TPU_RANKS[generation]} axes of chips, "
                         f"e.g. {'v5p:4x4x4' if _TPU_RANKS[generation] == 3 else 'v5e:16x16'}")
    return Topology(generation, shape)


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
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology.name,
                                                   chips_per_host_bounds=hosts, num_slices=1, **options)
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
