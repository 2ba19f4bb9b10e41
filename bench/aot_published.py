"""Benchmark: bmx's AOT prediction of its own train step next to published measurements of the same shapes.

    python bench/aot_published.py [--only NAME[,NAME]] [--json FILE]

For each published run, bmx's step is compiled (libtpu compile-only devices, see README "Pod scale
without a pod") with that run's architecture, sequence length, per-chip batch and topology, and the
predicted MFU (point estimate and range) is printed next to the measured one. Published MFUs are
converted to bmx's MFU convention (`bmx.train.flops`: causal attention counted as half the score
matrix, no recompute) wherever the source gives tokens/s; otherwise the source's own MFU is quoted.

Sources:
- Mistral-7B, v6e-8, seq 8192, 6 per chip: 432 TFLOP/s/chip (MaxText's count, 47.1 % of 918),
  AI-Hypercomputer/tpu-recipes (training/trillium/Mistral-7B-MaxText).
- Llama-3.1-8B, v6e-256, seq 8192, 4 per chip: 45.46 % MFU, 7,207 tokens/s/chip, MaxText
  benchmarks (`llama3_1_8b_8192` in benchmarks/maxtext_trillium_model_configs.py: remat `custom`,
  layer inputs and q/k/v/o projections offloaded to host memory).
- Llama-2-70B, v5p-512, seq 4096: 65.4 % MFU, MaxText README (v5p); per-chip batch 4 assumed
  (as MaxText's published v6e config for this model).
- Llama-2-7B, 8 × H100, seq 4096: ≈ 51 % MFU, MaxText gpu-recipes (A3); per-GPU batch 4 assumed.
  Compiled for v5p:2x2x2 and judged as 8 H100s (`--judge-as h100`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

LLAMA_3_1_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "sliding_window": None,
                "rope_theta": 500000.0, "max_position_embeddings": 131072}
LLAMA_2_70B = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "sliding_window": None,
               "rope_theta": 10000.0, "max_position_embeddings": 4096}
LLAMA_2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "sliding_window": None,
              "rope_theta": 10000.0, "max_position_embeddings": 4096}
MISTRAL_7B_NO_WINDOW = {"sliding_window": None}  # MaxText's mistral-7b has no sliding window


@dataclass(frozen=True)
class PublishedRun:
    name: str
    topology: str
    judge_as: str | None
    architecture: dict
    seq_len: int
    per_chip_batch: int
    remat: str
    measured_mfu: float  # in bmx's convention where tokens/s are published, else the source's
    measured_note: str


def published_runs(chips: int | None = None) -> list[PublishedRun]:
    from bmx.model.config import preset
    from bmx.train.chips import CHIPS
    from bmx.train.flops import training_flops_per_token

    llama8b_flops = training_flops_per_token(preset("mistral-7b-v0.1", **LLAMA_3_1_8B), 8192)
    return [
        PublishedRun("mistral-7b-v6e-8", "v6e:2x4", None, MISTRAL_7B_NO_WINDOW, 8192, 6, "full", 432e12 / 918e12,
                     "432 TFLOP/s/chip, MaxText's FLOP count (tpu-recipes)"),
        PublishedRun("llama-3.1-8b-v6e-256", "v6e:16x16", None, LLAMA_3_1_8B, 8192, 4, "full",
                     7207 * llama8b_flops / CHIPS["v6e"].peak_flops,
                     "7,207 tokens/s/chip (MaxText: 45.46 % in its own count)"),
        PublishedRun("llama-2-70b-v5p-512", "v5p:4x8x8", None, LLAMA_2_70B, 4096, 4, "full", 0.654,
                     "65.4 % MFU, MaxText's count (MaxText README, v5p)"),
        PublishedRun("llama-2-7b-8xh100", "v5p:2x2x2", "h100", LLAMA_2_7B, 4096, 4, "full", 0.51,
                     "≈ 51 % MFU, MaxText's count (MaxText gpu-recipes, A3)"),
    ]


def run_config(run: PublishedRun, num_devices: int):
    from bmx.config_io import from_dict
    from bmx.train.config import RunConfig

    return from_dict(RunConfig, {
        "model": {"preset": "mistral-7b-v0.1", "overrides": run.architecture, "remat": run.remat,
                  "attention": "splash", "dtype": "bfloat16", "param_dtype": "float32"},
        "train": {"seq_len": run.seq_len, "global_batch_size": run.per_chip_batch * num_devices,
                  "grad_accumulation": 1},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated run names")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from bmx.train.aot_compile import compile_report, predicted_step
    from bmx.train.aot_format import format_report, report_dict
    from bmx.train.aot_hardware import CHIPS, compile_only_devices, parse_topology

    runs = [run for run in published_runs() if args.only is None or run.name in args.only.split(",")]
    rows, reports = [], {}
    for run in runs:
        topology = parse_topology(run.topology)
        chip = CHIPS[run.judge_as] if run.judge_as else topology.chip
        config = run_config(run, topology.num_devices)
        report = compile_report(config, topology, judged_as=chip)
        print(format_report(report, run.name), flush=True)
        fits = report.fits
        if not fits:  # still predict its time: the step-time model does not need the memory to fit
            report = predicted_step(config, compile_only_devices(topology), chip, topology.name)
            print(format_report(report, run.name + " (time only)"), flush=True)
        reports[run.name] = {**report_dict(report), "fits": fits}
        low, high = report.predicted_mfu_range
        inside = "yes" if low <= run.measured_mfu <= high else "no"
        rows.append(f"| {run.name} | {run.topology}{' as ' + run.judge_as if run.judge_as else ''} | "
                    f"{run.measured_mfu:.1%} ({run.measured_note}) | {report.predicted_mfu:.1%}"
                    f"{'' if fits else ' (does not fit in bmx)'} | "
                    f"{low:.1%} … {high:.1%} | {inside}, {100 * (report.predicted_mfu - run.measured_mfu):+.1f} pt |")
    print("| run | topology | measured MFU | predicted (point) | predicted range | inside, point − measured |")
    print("|---|---|---:|---:|---:|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(reports, file, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
