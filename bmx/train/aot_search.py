"""Search a small grid of parallelism and memory settings for the fastest one that fits.

The global batch (the recipe) stays fixed; a candidate is a mesh split (`data` × `fsdp` × `tensor`), a
remat policy and a per-device microbatch, which fixes the gradient accumulation. Each candidate is
AOT-compiled (`compile_report`); for one mesh and remat policy, microbatches are tried smallest first
and the first that does not fit ends that line, since a larger one needs more memory still.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from collections.abc import Callable, Sequence

from bmx.train.aot_compile import AotReport, compile_report
from bmx.train.aot_hardware import Topology, compile_only_devices
from bmx.train.config import RunConfig


@dataclass(frozen=True)
class SearchGrid:
    data: Sequence[int] = (1,)
    tensor: Sequence[int] = (1, 2, 4)  # fsdp takes the remaining devices
    remat: Sequence[str] = ("full", "dots_no_batch")
    per_device_batch: Sequence[int] = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Candidate:
    data: int
    fsdp: int
    tensor: int
    remat: str
    per_device_batch: int
    grad_accumulation: int


def candidates(global_batch_size: int, num_devices: int, grid: SearchGrid) -> list[Candidate]:
    """Every grid point that divides the devices and the global batch, microbatches ascending per line."""
    found = []
    for data in grid.data:
        for tensor in grid.tensor:
            if num_devices % (data * tensor):
                continue
            fsdp = num_devices // (data * tensor)
            for remat in grid.remat:
                for per_device_batch in sorted(grid.per_device_batch):
                    microbatch = per_device_batch * data * fsdp
                    if global_batch_size % microbatch:
                        continue
                    found.append(Candidate(data, fsdp, tensor, remat, per_device_batch,
                                           global_batch_size // microbatch))
    return found


def with_candidate(config: RunConfig, candidate: Candidate) -> RunConfig:
    config = copy.deepcopy(config)
    config.mesh = dataclasses.replace(config.mesh, data=candidate.data, fsdp=candidate.fsdp, tensor=candidate.tensor)
    config.model.remat = candidate.remat
    config.train.grad_accumulation = candidate.grad_accumulation
    return config


def search(config: RunConfig, topology: Topology, grid: SearchGrid = SearchGrid(),
           on_report: Callable[[Candidate, AotReport], None] = lambda candidate, report: None) -> list[AotReport]:
    """Reports of every tried candidate; the fitting ones first, by the point estimate of MFU, best first."""
    devices = compile_only_devices(topology)
    reports: list[AotReport] = []
    line_failed: set[tuple] = set()
    for candidate in candidates(config.train.global_batch_size, len(devices), grid):
        line = (candidate.data, candidate.tensor, candidate.remat)
        if line in line_failed:
            continue
        report = compile_report(with_candidate(config, candidate), topology, devices=devices)
        on_report(candidate, report)
        reports.append(report)
        if not report.fits:
            line_failed.add(line)
    return sorted(reports, key=lambda report: (not report.fits, -(report.predicted_mfu or 0.0)))


def format_table(reports: list[AotReport]) -> str:
    header = ("fits  data fsdp tensor  remat          batch/device  accumulation  HBM GiB   step s   tokens/s   MFU"
              "  (range)")
    rows = [header]
    for report in reports:
        memory = "-" if report.memory is None else f"{report.memory.total / 2**30:.1f}"
        step = "-" if report.step_seconds is None else f"{report.step_seconds:.3f}"
        tokens = "-" if report.tokens_per_second is None else f"{report.tokens_per_second:,.0f}"
        mfu = "-" if report.predicted_mfu is None else f"{report.predicted_mfu:.1%}"
        if report.predicted_mfu_range is not None:
            mfu += f"  ({report.predicted_mfu_range[0]:.0%}–{report.predicted_mfu_range[1]:.0%})"
        rows.append(f"{'yes' if report.fits else 'no':<5} {report.mesh['data']:>4} {report.mesh['fsdp']:>4} "
                    f"{report.mesh['tensor']:>6}  {report.remat:<14} {report.microbatch_per_device:>12g}  "
                    f"{report.grad_accumulation:>12}  {memory:>7}  {step:>7}  {tokens:>9}  {mfu}")
    return "\n".join(rows)
