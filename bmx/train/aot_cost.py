"""XLA's FLOPs and HBM bytes for a whole train step, loops included.

XLA's cost analysis counts the body of a `while` loop once, whatever its trip count, so for the
scanned layer stack (and the gradient-accumulation scan) it reports about one layer's work. Here the
step is traced, every `scan` in its jaxpr is fully unrolled, and the loop-free program is lowered
for the same devices and shardings.

- FLOPs come from XLA's HLO cost analysis of that program before SPMD partitioning (the whole
  step's work, divided by the device count). XLA:TPU's analysis of the compiled program is not used
  for FLOPs: it rewrites large sharded matmuls into windowed convolutions and then counts about half
  of their work (7B layer, 32 sequences per chip on v5p:2x4x4: 8.6e13 against the 1.77e14 counted
  before partitioning and bmx's formula), so it predicted MFUs above 100 %.
- HBM bytes come from the program compiled for the TPU topology: traffic after fusion is a property
  of the compiled program, which the pre-partitioning HLO (every op a round trip to memory) is not.
- Collective times come from the same compiled program (`bmx.train.aot_comms`): which collectives
  XLA emitted, how many bytes, over which mesh axes and links.

Unrolling 32 layers makes compilation slow, so the cost is measured on 1 and 2 layers (and 1 and 2
microbatches) and extended bilinearly: with the per-device microbatch fixed, a step's cost is
`fixed + per_layer × L + per_microbatch × A + per_layer_microbatch × L × A` exactly, since unrolled
layers and microbatches are copies of one another.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from collections.abc import Callable

import jax
from jax.extend import core as jex_core


@dataclass(frozen=True)
class StepCost:
    """Per device, per step."""

    flops: float
    bytes_accessed: float  # HBM traffic XLA expects after fusion
    transcendentals: float
    ici_seconds: float = 0.0  # collectives inside a slice (`aot_comms`), as the compiled program runs them
    ici_synchronous_seconds: float = 0.0  # the part of ici_seconds XLA did not issue asynchronously
    dcn_seconds: float = 0.0  # transfers between slices

    def __add__(self, other: StepCost) -> StepCost:
        return StepCost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: StepCost) -> StepCost:
        return StepCost(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> StepCost:
        return StepCost(*(getattr(self, f.name) * factor for f in fields(self)))


def _unroll_jaxpr(jaxpr: jex_core.Jaxpr) -> jex_core.Jaxpr:
    equations = []
    for equation in jaxpr.eqns:
        params = {name: _unroll_param(value) for name, value in equation.params.items()}
        if equation.primitive.name == "scan":
            params["unroll"] = params["length"]
        equations.append(equation.replace(params=params))
    return jaxpr.replace(eqns=equations)


def _unroll_param(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        return jex_core.ClosedJaxpr(_unroll_jaxpr(value.jaxpr), value.consts)
    if isinstance(value, jex_core.Jaxpr):
        return _unroll_jaxpr(value)
    if isinstance(value, tuple) and any(isinstance(item, (jex_core.ClosedJaxpr, jex_core.Jaxpr)) for item in value):
        return tuple(_unroll_param(item) for item in value)
    return value


def unrolled(closed_jaxpr: jex_core.ClosedJaxpr) -> jex_core.ClosedJaxpr:
    """The same program with every scan (at any depth) fully unrolled: no while loops for XLA."""
    return jex_core.ClosedJaxpr(_unroll_jaxpr(closed_jaxpr.jaxpr), closed_jaxpr.consts)


def _hlo_cost_before_partitioning(lowered) -> dict[str, float]:
    """XLA's HLO cost analysis of the whole (unpartitioned) program, run by the CPU backend.

    Counting FLOPs needs no target hardware; `Lowered.cost_analysis()` would ask the compile-only TPU
    client, which has no analysis, so the CPU client counts the same HLO module.
    """
    from bmx.private_api import hlo_module_cost_analysis

    module = lowered.compiler_ir("hlo").as_hlo_module()
    return hlo_module_cost_analysis(module, jax.extend.backend.get_backend("cpu"))


def program_cost(lowered, num_devices: int, *, compiled=None, with_bytes: bool = True, comm_model=None) -> StepCost:
    """Per-device cost of a lowered program whose loops (if any) run once: FLOPs before partitioning ÷
    devices; HBM bytes, and collective times when given a `comm_model` (`aot_comms.CommModel`), from the
    program compiled for its devices (`compiled`, or compiled here)."""
    whole_program = _hlo_cost_before_partitioning(lowered)
    bytes_accessed, comm = 0.0, None
    if with_bytes:
        compiled = compiled or lowered.compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis  # older jax: one dict per program
        bytes_accessed = float(analysis.get("bytes accessed", 0.0))
        comm = comm_model.time(compiled.as_text()) if comm_model is not None else None
    return StepCost(flops=float(whole_program.get("flops", 0.0)) / num_devices, bytes_accessed=bytes_accessed,
                    transcendentals=float(whole_program.get("transcendentals", 0.0)) / num_devices,
                    ici_seconds=comm.ici if comm else 0.0,
                    ici_synchronous_seconds=comm.ici_synchronous if comm else 0.0,
                    dcn_seconds=comm.dcn if comm else 0.0)


def unrolled_xla_cost(step, args: tuple, *, with_bytes: bool = True, comm_model=None) -> StepCost:
    """Per-device cost of jitted `step` on abstract `args` (ShapeDtypeStructs with shardings), loops unrolled.

    The step's jaxpr holds the jitted call itself, with its in/out shardings, so the unrolled program is
    partitioned exactly as the real one. `with_bytes=False` skips the compile (FLOPs only, seconds not minutes).
    """
    flat_args = jax.tree.leaves(args)
    program = jax.jit(jex_core.jaxpr_as_fun(unrolled(jax.make_jaxpr(step)(*args))),
                      in_shardings=[arg.sharding for arg in flat_args])
    num_devices = len(flat_args[0].sharding.device_set)
    return program_cost(program.lower(*flat_args), num_devices, with_bytes=with_bytes, comm_model=comm_model)


def extrapolated_cost(cost_at: Callable[[int, int], StepCost], num_layers: int, accumulation: int) -> StepCost:
    """The cost at (num_layers, accumulation) from `cost_at(layers, microbatches)` at 1 and 2 of each.

    Only the points the target needs are measured: one layer or one microbatch needs no second point.
    """
    layer_points = (1, 2) if num_layers > 1 else (1,)
    microbatch_points = (1, 2) if accumulation > 1 else (1,)
    measured = {(layers, microbatches): cost_at(layers, microbatches)
                for microbatches in microbatch_points for layers in layer_points}
    base = measured[1, 1]
    cost = base
    if num_layers > 1:
        cost = cost + (measured[2, 1] - base).scaled(num_layers - 1)
    if accumulation > 1:
        cost = cost + (measured[1, 2] - base).scaled(accumulation - 1)
    if num_layers > 1 and accumulation > 1:
        per_layer_microbatch = measured[2, 2] - measured[2, 1] - measured[1, 2] + base
        cost = cost + per_layer_microbatch.scaled((num_layers - 1) * (accumulation - 1))
    return cost
