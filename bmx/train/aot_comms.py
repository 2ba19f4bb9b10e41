"""The collectives of a compiled step, what they move, over which link, and how long that takes.

Read from the compiled program's text (`compiled.as_text()`), after XLA's SPMD partitioning, fusion
and scheduling, so they are the collectives that would run:

- ICI: `all-gather`, `reduce-scatter`, `all-reduce`, `all-to-all`, `collective-permute` (and their
  `-start` forms) with their result shapes and replica groups. XLA:TPU splits an asynchronous
  collective into a chain of fused pieces that share one `channel_id`; a chain counts once.
- DCN (multi-slice TPU): XLA:TPU turns the cross-slice part of a collective into host transfers,
  `send`s tagged `_xla_megascale_transfer_type` (ALL_REDUCE, ALL_GATHER, ...); one per rendezvous key.

Time per device, ring algorithms (n devices in a group, S the bytes of the result on one device):
all-gather (n-1)/n·S, reduce-scatter (n-1)·S, all-reduce 2(n-1)/n·S, all-to-all (n-1)/n·S,
collective-permute S, over the bandwidth of the links the group spans (`bmx.train.chips`): on a
TPU torus, 2 links per physical axis the group covers (half that along an axis without wraparound
or covered only in part); through NVSwitch, the GPU's NVLink bandwidth; across slices, the chip's
DCN bandwidth. Latency and contention are ignored, so these are lower bounds on each collective.

Overlap, stated: collectives XLA issued asynchronously (an async start/done pair, TPU's async
collective fusions, DCN host transfers) are taken as hidden behind compute; synchronous ones stall
the step. `CommTime` keeps both so that the report can give the range from "all hidden" to "none".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from bmx.train.chips import Chip

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>\S+) = (?P<shape>.+?) "
                          r"(?P<op>all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
                          r"(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CHANNEL = re.compile(r"channel_id=(\d+)")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_SEND = re.compile(r"^\s*%\S+ = \((?P<shape>[a-z0-9]+\[[\d,]*\]).*?\) send\(")
_MEGASCALE = {name: re.compile(name + r'="([^"]+)"') for name in
              ("_xla_host_transfer_rendezvous", "_xla_megascale_target", "_xla_megascale_transfer_type")}


@dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS, or "dcn-" + the megascale transfer type in lower case
    result_bytes: float  # per device (for DCN: what one chip sends)
    groups: tuple[tuple[int, ...], ...]  # logical device ids (slice-local); () = every device
    asynchronous: bool
    name: str

    @property
    def crosses_slices(self) -> bool:
        return self.kind.startswith("dcn-")

    def group_size(self, num_devices: int) -> int:
        return len(self.groups[0]) if self.groups else num_devices


def array_bytes(shape_text: str, largest_only: bool = False) -> float:
    sizes = [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
             for dtype, dims in _ARRAY.findall(shape_text) if dtype in _DTYPE_BYTES]
    if not sizes:
        return 0.0
    return float(max(sizes) if largest_only else sum(sizes))


def _groups(line: str, kind: str) -> tuple[tuple[int, ...], ...]:
    if kind == "collective-permute":
        pairs = _PAIRS.search(line)
        return tuple(tuple(int(i) for i in pair.split(",")) for pair in re.findall(r"\{(\d+,\d+)\}", pairs.group(1))) \
            if pairs else ()
    if match := _IOTA_GROUPS.search(line):  # [groups, size]<=[dims]T(perm): iota reshaped, transposed, cut
        shape = [int(x) for x in match.group(1).split(",")]
        dims = [int(x) for x in match.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if match.group(3):
            ids = ids.transpose([int(x) for x in match.group(3).split(",")])
        return tuple(tuple(int(i) for i in row) for row in ids.reshape(shape[0], -1))
    if match := _EXPLICIT_GROUPS.search(line):
        groups = re.findall(r"\{([\d,]*)\}", match.group(1))
        return tuple(tuple(int(i) for i in group.split(",") if i) for group in groups)
    return ()


def _slice_count(text: str) -> int:
    count = 0
    for part in text.split(","):
        low, _, high = part.partition(":")
        count += int(high) - int(low) + 1 if high else 1
    return count


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled module's text, one entry per logical collective."""
    found: dict[tuple, Collective] = {}
    for line in hlo_text.splitlines():
        if match := _INSTRUCTION.match(line):
            kind, name = match.group("op"), match.group("name")
            channel = _CHANNEL.search(line)
            key = (kind, channel.group(1)) if channel else (kind, name)
            if key in found:
                continue  # another piece of the same asynchronous chain
            # A -start op's result is (operand, result, ...): the gathered result is its largest array.
            result = array_bytes(match.group("shape"), largest_only=bool(match.group("start")))
            asynchronous = bool(match.group("start")) or "async_collective" in line
            found[key] = Collective(kind, result, _groups(line, kind), asynchronous, name)
        elif "_xla_megascale_transfer_type" in line and (match := _SEND.match(line)):
            rendezvous, target, transfer = (pattern.search(line).group(1) for pattern in _MEGASCALE.values())
            if ("dcn", rendezvous) not in found:
                slices = _slice_count(target.split("}", 1)[0].lstrip("{"))  # "{1,2}x{0:15}": slices x devices
                kind = "dcn-" + transfer.lower().replace("_", "-")
                found["dcn", rendezvous] = Collective(kind, array_bytes(match.group("shape")), (tuple(range(slices)),),
                                                      True, rendezvous)
    return list(found.values())


def wire_bytes(kind: str, result_bytes: float, group_size: int) -> float:
    """Bytes one device sends in a ring implementation of an ICI collective."""
    n = group_size
    if n <= 1:
        return 0.0
    if kind == "all-gather":
        return (n - 1) / n * result_bytes
    if kind == "reduce-scatter":
        return (n - 1) * result_bytes
    if kind == "all-reduce":
        return 2 * (n - 1) / n * result_bytes
    if kind == "all-to-all":
        return (n - 1) / n * result_bytes
    return result_bytes  # collective-permute


def dcn_wire_bytes(kind: str, sent_bytes: float, slices: int) -> float:
    """Bytes one chip sends in a DCN transfer among `slices` slices of what it sends to each (`sent_bytes`)."""
    if slices <= 1:
        return 0.0
    if kind == "dcn-all-reduce":
        return 2 * (slices - 1) / slices * sent_bytes
    if kind in ("dcn-reduce-scatter", "dcn-all-to-all"):
        return (slices - 1) / slices * sent_bytes
    return (slices - 1) * sent_bytes  # all-gather: its piece to every other slice


@dataclass(frozen=True)
class CommTime:
    """Seconds per device per step."""

    ici: float = 0.0
    ici_synchronous: float = 0.0  # the part of `ici` XLA did not issue asynchronously
    dcn: float = 0.0


class CommModel:
    """Times the collectives of programs compiled for `mesh`, judged as `chip`.

    `torus_axes`: whether each physical axis of a TPU slice wraps around (`Topology.torus_axes`)."""

    def __init__(self, chip: Chip, mesh, torus_axes: tuple[bool, ...] = ()):
        self.chip, self.mesh, self.torus_axes = chip, mesh, torus_axes
        flat = list(mesh.devices.flat)
        first_slice = getattr(flat[0], "slice_index", None) or 0
        # Replica groups of a multi-slice program number the devices of one slice.
        self.slice_devices = [d for d in flat if (getattr(d, "slice_index", None) or 0) == first_slice]
        self.mesh_index = {d.id: np.unravel_index(i, mesh.devices.shape) for i, d in enumerate(flat)}
        self.position = {d.id: i for i, d in enumerate(self.slice_devices)}

    def mesh_axes(self, collective: Collective) -> tuple[str, ...]:
        """The mesh axes along which the members of a group differ (DCN transfers: the cross-slice axes)."""
        if collective.crosses_slices:
            slice_of = np.vectorize(lambda d: getattr(d, "slice_index", None) or 0)(self.mesh.devices)
            return tuple(axis for i, axis in enumerate(self.mesh.axis_names)
                         if slice_of.shape[i] > 1 and np.any(np.diff(slice_of, axis=i) != 0))
        members = self._members(collective)
        coordinates = np.array([self.mesh_index[d.id] for d in members])
        return tuple(axis for axis, column in zip(self.mesh.axis_names, coordinates.T) if len(set(column)) > 1)

    def _members(self, collective: Collective) -> list:
        group = collective.groups[0] if collective.groups else range(len(self.slice_devices))
        return [self.slice_devices[i] for i in group]

    def ici_bandwidth(self, members) -> float:
        chip = self.chip
        if chip.ici_switched:
            return chip.ici_link_bandwidth
        coords = np.array([d.coords for d in members])
        bandwidth = 0.0
        for axis, column in enumerate(coords.T):
            covered = len(set(column))
            if covered <= 1:
                continue
            axis_size = max(d.coords[axis] for d in self.slice_devices) + 1
            wraps = axis < len(self.torus_axes) and self.torus_axes[axis] and covered == axis_size
            bandwidth += chip.ici_link_bandwidth * chip.ici_links_per_axis * (1.0 if wraps else 0.5)
        return bandwidth or chip.ici_link_bandwidth

    def seconds(self, collective: Collective) -> float:
        if collective.crosses_slices:
            slices = len(collective.groups[0])
            return dcn_wire_bytes(collective.kind, collective.result_bytes, slices) / self.chip.dcn_bandwidth
        members = self._members(collective)
        if collective.kind == "collective-permute":
            return collective.result_bytes / self.ici_bandwidth(members) if members else 0.0
        size = collective.group_size(len(self.slice_devices))
        return wire_bytes(collective.kind, collective.result_bytes, size) / self.ici_bandwidth(members)

    def time(self, hlo_text: str) -> CommTime:
        ici = synchronous = dcn = 0.0
        for collective in parse_collectives(hlo_text):
            seconds = self.seconds(collective)
            if collective.crosses_slices:
                dcn += seconds
            else:
                ici += seconds
                synchronous += 0.0 if collective.asynchronous else seconds
        return CommTime(ici=ici, ici_synchronous=synchronous, dcn=dcn)

    def summary(self, hlo_text: str) -> list[CollectiveSummary]:
        """Collectives of one program grouped by kind, mesh axes and link, largest time first."""
        rows: dict[tuple, list] = {}
        for collective in parse_collectives(hlo_text):
            key = (collective.kind, self.mesh_axes(collective), "DCN" if collective.crosses_slices else "ICI")
            row = rows.setdefault(key, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += collective.result_bytes
            row[2] += self.seconds(collective)
        return sorted((CollectiveSummary(kind, axes, link, count, size, seconds)
                       for (kind, axes, link), (count, size, seconds) in rows.items()), key=lambda r: -r.seconds)


@dataclass(frozen=True)
class CollectiveSummary:
    kind: str
    mesh_axes: tuple[str, ...]
    link: str  # "ICI" or "DCN"
    count: int
    result_bytes: float  # per device, summed
    seconds: float
