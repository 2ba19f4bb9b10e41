"""Human-readable and JSON forms of an `AotReport`."""

from __future__ import annotations

import dataclasses
from typing import Any

from bmx.train.aot_compile import AotReport

GiB = 2**30


def _gib(size: float) -> str:
    return f"{size / GiB:8.2f} GiB"


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value >= 1 else f"{value * 1e3:.3g} ms"


def _setting(report: AotReport) -> str:
    mesh = " ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    return (f"mesh {mesh} · remat {report.remat} · attention {report.attention} · seq {report.seq_len} · "
            f"global batch {report.global_batch_size} = {report.microbatch_per_device:g} per device × "
            f"{report.grad_accumulation} microbatch{'es' if report.grad_accumulation > 1 else ''}")


def format_report(report: AotReport, config_name: str = "") -> str:
    chip = report.chip
    lines = [f"bmx AOT report: {config_name} on {report.topology} ({report.num_devices} × {chip.name}, "
             f"compiled in {report.compile_seconds:.0f} s)", f"  {_setting(report)}",
             f"memory per device (HBM {chip.hbm_bytes / GiB:.1f} GiB)"]
    if report.memory is None:
        lines.append(f"  XLA refused the program: {report.compile_error}")
    else:
        memory = report.memory
        lines += [f"  arguments   {_gib(memory.arguments)}  parameters, optimizer state, batch",
                  f"  outputs     {_gib(memory.outputs)}  ({_gib(memory.aliased).strip()} of them written over "
                  "donated arguments)",
                  f"  temporaries {_gib(memory.temporaries)}",
                  f"  code        {_gib(memory.code)}",
                  f"  total       {_gib(memory.total)}  {memory.total / chip.hbm_bytes:.0%} of HBM: "
                  f"{'fits' if report.fits else 'DOES NOT FIT'}"]
    if report.largest_buffers:
        lines.append("largest buffers")
        lines += [f"  {_gib(buffer.size_bytes)}  {buffer.kind:<9} {buffer.shape:<28} {buffer.op_name}"
                  + (f"  ({buffer.values} values share it)" if buffer.values > 1 else "")
                  for buffer in report.largest_buffers]
    lines += ["FLOPs per device per step", f"  model (bmx MFU formula)  {report.model_flops:.3e}"]
    if report.xla_cost is not None:
        cost = report.xla_cost
        lines += [f"  XLA cost analysis        {cost.flops:.3e}  ({cost.flops / report.model_flops:.2f} × model: "
                  "rematerialisation, attention masking, softmax, optimizer)",
                  f"  XLA:TPU HBM traffic      {cost.bytes_accessed:.3e} bytes (compiled program, after fusion)",
                  f"step time per device ({chip.peak_flops / 1e12:.0f} TFLOP/s bf16 × {chip.matmul_efficiency:.0%} "
                  f"sustained, HBM {chip.hbm_bandwidth / 1e9:.0f} GB/s, ICI {chip.ici_link_bandwidth / 1e9:.0f} GB/s "
                  f"a link, DCN {chip.dcn_bandwidth / 1e9:.2f} GB/s a chip; {chip.source})",
                  f"  compute {_seconds(report.compute_seconds)} · HBM {_seconds(report.memory_seconds)} · "
                  f"ICI {_seconds(report.ici_seconds)} ({_seconds(cost.ici_synchronous_seconds)} synchronous) · "
                  f"DCN {_seconds(report.dcn_seconds)}"]
        hidden, exposed = report.step_seconds_range
        low, high = report.predicted_mfu_range
        lines += [f"  step {_seconds(report.step_seconds)} (collectives hidden … not hidden: {_seconds(hidden)} … "
                  f"{_seconds(exposed)}), {report.tokens_per_second:,.0f} tokens/s",
                  f"  predicted MFU {report.predicted_mfu:.1%} (range {low:.1%} … {high:.1%})",
                  "  overlap assumed: collectives XLA issued asynchronously run behind compute, synchronous ones "
                  "stall the step"]
    if report.collectives:
        lines.append("collectives in the compiled step (a loop body counted once)")
        lines += [f"  {row.link} {row.kind:<18} over {'×'.join(row.mesh_axes) or '-':<12} {row.count:>4} ops "
                  f"{row.result_bytes / 2**20:10.1f} MiB  {_seconds(row.seconds)}" for row in report.collectives[:8]]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def not_fitting_message(report: AotReport) -> str:
    if report.memory is not None:
        need = f"needs {report.memory.total / GiB:.2f} GiB per device"
    else:
        need = f"XLA: {report.compile_error}"
    biggest = "; ".join(f"{buffer.size_bytes / GiB:.2f} GiB {buffer.shape} ({buffer.op_name or buffer.kind})"
                        for buffer in report.largest_buffers[:4])
    return (f"does not fit on {report.topology}: {need}, a {report.chip.name} has "
            f"{report.chip.hbm_bytes / GiB:.1f} GiB. Largest buffers: {biggest or 'unknown'}. Try more "
            "train.grad_accumulation, model.remat=full, model.attention=splash or a larger mesh.fsdp.")


def report_dict(report: AotReport) -> dict[str, Any]:
    """Everything in the report, derived numbers included, as plain JSON values."""
    values = dataclasses.asdict(report)
    values["memory_total"] = None if report.memory is None else report.memory.total
    for name in ("microbatch_per_device", "compute_seconds", "memory_seconds", "ici_seconds", "dcn_seconds",
                 "step_seconds", "step_seconds_range", "predicted_mfu", "predicted_mfu_range", "tokens_per_second"):
        values[name] = getattr(report, name)
    return values
