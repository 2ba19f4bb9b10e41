"""The one table of accelerators: peak FLOP/s, HBM, interconnect and sustained matmul efficiency.

The MFU metric (`bmx.train.flops.peak_flops_per_device`) and the AOT tool (`python -m bmx.train.aot`)
both read it. Numbers are per device as JAX sees it (v4/v5p: one device per chip, its two
TensorCores as one), from the vendor pages cited in `source`; bandwidths are bytes/s.

Interconnect, as the step-time model uses it (`bmx.train.aot_comms`):
- TPU chips sit on a torus (v4/v5p: 3-D, v5e/v6e: 2-D) and drive `ici_links_per_axis` links along
  each axis (one each way), each `ici_link_bandwidth` in one direction. Google states the chip's
  bidirectional ICI total; one link one way is that total ÷ (ports × 2).
- NVIDIA GPUs reach the other GPUs of their node through NVSwitch (`ici_switched`): any group inside
  the node gets the per-GPU NVLink bandwidth, whatever its shape; `ici_domain` GPUs per node.
- Between slices (TPU) or nodes (GPU), each chip gets `dcn_bandwidth` of the host network.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    device_kinds: tuple[str, ...]  # prefixes of `jax.Device.device_kind` that name this chip
    peak_flops: float  # dense bf16 FLOP/s (no sparsity)
    hbm_bytes: int
    hbm_bandwidth: float
    ici_link_bandwidth: float  # one link, one direction (NVSwitch: the GPU's NVLink total, one direction)
    ici_links_per_axis: int  # links along one torus axis (2: one to each neighbour); 1 for NVSwitch
    ici_switched: bool  # NVSwitch: every group inside the domain gets the full bandwidth
    ici_domain: int | None  # devices sharing the fast interconnect (GPU: per node); None: the whole slice
    dcn_bandwidth: float  # per chip, one direction, to other slices / nodes
    matmul_efficiency: float  # sustained fraction of peak_flops on large bf16 matmuls
    source: str


# Sustained-matmul efficiencies: NVIDIA from Stas Bekman's "Maximum Achievable Matmul FLOPS" table
# (github.com/stas00/ml-engineering, compute/accelerator/README.md: H100 SXM 792.1 of 989, A100 SXM
# 267.9 of 312, best bf16 shape); v6e from a device-timed 8192³ bf16 GEMM (github.com/yangwhale/
# gpu-tpu-pedia, tpu/v7_perf: ~79 %). No GEMM measurement of v4/v5e/v5p was found: there the value is
# the best end-to-end MFU MaxText publishes on that chip (a whole step cannot beat its matmuls), a
# lower bound: v5p 71.5 % (32B, v5p-128), v5e 66.9 % (32B, v5e-256), MaxText docs "Runtime Performance
# Results" and configs/v5e/README.md; v4 taken as v5p's.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", ("TPU v4",), 275e12, 32 * GiB, 1200e9,
               ici_link_bandwidth=45e9, ici_links_per_axis=2, ici_switched=False, ici_domain=None,
               dcn_bandwidth=6.25e9, matmul_efficiency=0.715,
               source="cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s; ICI 45 GB/s "
                      "a link one way (jax-ml.github.io/scaling-book); DCN taken as v5p's"),
    "v5e": Chip("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, 819e9,
                ici_link_bandwidth=50e9, ici_links_per_axis=2, ici_switched=False, ici_domain=None,
                dcn_bandwidth=200e9 / 8 / 8, matmul_efficiency=0.669,
                source="cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s, ICI 400 GB/s "
                       "bidirectional over 4 ports, 2 × 100 Gbps NICs per 8-chip host"),
    "v5p": Chip("TPU v5p", ("TPU v5p", "TPU v5"), 459e12, 95 * GiB, 2765e9,
                ici_link_bandwidth=100e9, ici_links_per_axis=2, ici_switched=False, ici_domain=None,
                dcn_bandwidth=50e9 / 8, matmul_efficiency=0.715,
                source="cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s, ICI 1200 GB/s "
                       "bidirectional over 6 ports, DCN 50 Gbps per chip"),
    "v6e": Chip("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, 1640e9,
                ici_link_bandwidth=100e9, ici_links_per_axis=2, ici_switched=False, ici_domain=None,
                dcn_bandwidth=25.6e12 / 8 / 256, matmul_efficiency=0.79,
                source="cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s, ICI 800 GB/s "
                       "bidirectional over 4 ports, DCN 25.6 Tbps per 256-chip pod"),
    "h100": Chip("NVIDIA H100 SXM", ("NVIDIA H100",), 989e12, 80 * 10**9, 3.35e12,
                 ici_link_bandwidth=450e9, ici_links_per_axis=1, ici_switched=True, ici_domain=8,
                 dcn_bandwidth=400e9 / 8, matmul_efficiency=792.1 / 989,
                 source="NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3, 3.35 TB/s, "
                        "NVLink 900 GB/s bidirectional; DGX H100: one 400 Gb/s ConnectX-7 per GPU"),
    "h200": Chip("NVIDIA H200", ("NVIDIA H200",), 989e12, 141 * 10**9, 4.8e12,
                 ici_link_bandwidth=450e9, ici_links_per_axis=1, ici_switched=True, ici_domain=8,
                 dcn_bandwidth=400e9 / 8, matmul_efficiency=792.1 / 989,
                 source="NVIDIA H200 datasheet: H100's compute and NVLink, 141 GB HBM3e, 4.8 TB/s "
                        "(matmul efficiency taken as H100's)"),
    "a100": Chip("NVIDIA A100 SXM", ("NVIDIA A100",), 312e12, 80 * 10**9, 2.039e12,
                 ici_link_bandwidth=300e9, ici_links_per_axis=1, ici_switched=True, ici_domain=8,
                 dcn_bandwidth=200e9 / 8, matmul_efficiency=267.9 / 312,
                 source="NVIDIA A100 datasheet: 312 TFLOP/s dense bf16, 80 GB HBM2e, 2039 GB/s, NVLink 600 GB/s "
                        "bidirectional; DGX A100: one 200 Gb/s HDR NIC per GPU"),
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The chip whose `device_kinds` prefixes `device_kind` (e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3')."""
    # Longest prefix first: "TPU v5" (v5p's kind) must not claim "TPU v5 lite" (v5e's).
    prefixes = sorted(((prefix, chip) for chip in CHIPS.values() for prefix in chip.device_kinds),
                      key=lambda item: -len(item[0]))
    return next((chip for prefix, chip in prefixes if device_kind.startswith(prefix)), None)
