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
_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")
_INSTRUCTION = re.compile(r'^ from instruction: %(\S+) = .*?op_name="([^"]*)"')


@dataclass(frozen=True)
class Buffer:
    size_bytes: int
    shape: str  # e.g. f32[2,128,2048,2048]
    kind: str  # "argument", "temporary" or "output"
    op_name: str  # the JAX operation that produced it ("" when unknown)
    values: int = 1  # XLA values held in this region (aliases in place, or reuses at other times)


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


# Instructions that only pass a buffer on (loop state, tuples, in-place views): named after them, a
# region would read `while` rather than the JAX operation that filled it.
_PASS_THROUGH = ("while", "tuple", "get-tuple-element", "wide.param", "bitcast", "copy", "conditional")


def largest_buffers(dump_dir: str | Path, count: int = 8) -> list[Buffer]:
    """The `count` largest regions of memory in the train step's buffer assignment in `dump_dir`.

    XLA lists *values*, and many values share one region: a `while` loop's state, the in-place
    `dynamic_update_slice` that fills a `scan`'s stacked outputs and the allocation it starts from are
    one buffer, and a temporary region is reused by values that are not live at the same time. So values
    are grouped by (allocation, offset, size), each region counted once and named after the value that
    made it (`Buffer.values`: how many values it holds)."""
    dump_dir = Path(dump_dir)
    assignments = sorted(dump_dir.glob("*after_optimizations-buffer-assignment.txt"), key=lambda p: p.stat().st_size)
    if not assignments:
        return []
    assignment = assignments[-1]  # the step is the largest module compiled
    regions: dict[tuple[str, int, int], tuple[str, str, list[str]]] = {}  # -> (shape, kind, value names)
    allocation, kind = "", "temporary"
    with open(assignment, errors="replace") as lines:
        for line in lines:
            if match := _ALLOCATION.match(line):
                allocation, kind = match.group(1), _kind(match.group(3))
            elif match := _VALUE.match(line):
                name = match.group(1).split("{", 1)[0]  # "fusion.3{1}": element 1 of a tuple-shaped value
                size, offset = int(match.group(2)), int(match.group(3))
                shape = _shape_without_layout(match.group(4))
                region = regions.setdefault((allocation, offset, size), (shape, kind, []))
                region[2].append(name)
    top = sorted(regions.items(), key=lambda item: -item[0][2])[:count]
    values_dump = assignment.with_name(assignment.name.replace("buffer-assignment", "buffer-assignment-values"))
    wanted = {name for _, (_, _, names) in top for name in names}
    op_names = read_op_names(values_dump, wanted) if values_dump.exists() else {}

    def maker(names: list[str]) -> str:
        named = [name for name in names if op_names.get(name)]
        producers = [name for name in named if not name.startswith(_PASS_THROUGH)]
        return op_names[(producers or named)[0]] if named else ""

    return [Buffer(size, shape, kind, maker(names), len(set(names)))
            for (_, _, size), (shape, kind, names) in top]
