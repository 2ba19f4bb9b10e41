"""The largest buffers of a compiled program, read from XLA's buffer-assignment dump.

`memory_analysis()` gives totals only, and XLA:TPU's out-of-memory error names no buffer; but with
`xla_dump_to` XLA writes its buffer assignment even when the program does not fit. Each value there
has a size, a shape and the HLO instruction that made it, whose `op_name` metadata is the JAX
operation (e.g. `.../vmap(bskgd,btkd->bkgst)/dot_general`: attention scores).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+), (.*):$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")
_INSTRUCTION = re.compile(r'^ from instruction: %(\S+) = .*?op_name="([^"]*)"')


@dataclass(frozen=True)
class Buffer:
    size_bytes: int
    shape: str  # e.g. f32[2,128,2048,2048]
    kind: str  # "argument", "temporary" or "output"
    op_name: str  # the JAX operation that produced it ("" when unknown)


def _kind(allocation_description: str) -> str:
    if "parameter" in allocation_description:
        return "argument"
    if "temp" in allocation_description:
        return "temporary"
    return "output" if "live-out" in allocation_description else "temporary"


def _shape_without_layout(shape: str) -> str:
    return shape.split("{", 1)[0]


def read_op_names(values_dump: Path, wanted: set[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    with open(values_dump, errors="replace") as lines:
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match and match.group(1) in wanted:
                names[match.group(1)] = match.group(2).replace("\\'", "'")
    return names


def largest_buffers(dump_dir: str | Path, count: int = 8) -> list[Buffer]:
    """The `count` largest distinct values of the train step's buffer assignment in `dump_dir`."""
    dump_dir = Path(dump_dir)
    assignments = sorted(dump_dir.glob("*after_optimizations-buffer-assignment.txt"), key=lambda p: p.stat().st_size)
    if not assignments:
        return []
    assignment = assignments[-1]  # the step is the largest module compiled
    values: dict[str, tuple[int, str, str]] = {}
    kind = "temporary"
    with open(assignment, errors="replace") as lines:
        for line in lines:
            if match := _ALLOCATION.match(line):
                kind = _kind(match.group(3))
            elif match := _VALUE.match(line):
                name = match.group(1).split("{", 1)[0]  # "fusion.3{1}": element 1 of a tuple-shaped value
                size, shape = int(match.group(2)), _shape_without_layout(match.group(3))
                if size > values.get(name, (0,))[0]:
                    values[name] = (size, shape, kind)
    top = sorted(values.items(), key=lambda item: -item[1][0])[:count]
    values_dump = assignment.with_name(assignment.name.replace("buffer-assignment", "buffer-assignment-values"))
    op_names = read_op_names(values_dump, {name for name, _ in top}) if values_dump.exists() else {}
    return [Buffer(size, shape, kind, op_names.get(name, "")) for name, (size, shape, kind) in top]
