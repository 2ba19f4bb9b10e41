"""Compile a run's train step for hardware we do not have, and say whether and how well it would run.

`compile_report(config, topology)` builds exactly what `python -m bmx.train` builds (mesh, shardings,
jitted step with donation; `bmx.train.setup.build`) from abstract shapes, compiles it for the
topology's compile-only devices, and reads per-device memory from XLA's buffer assignment and
FLOPs/bytes from XLA's cost analysis (loops unrolled, see `aot_cost`).

Prediction, per device: compute = XLA's FLOPs (rematerialisation included) / (peak × the chip's sustained
matmul efficiency), HBM = bytes / bandwidth, their roofline max(compute, HBM); ICI and DCN time of the
collectives XLA emitted (`aot_comms`). The step is somewhere between
- collectives fully hidden: max(roofline, ICI, DCN), and
- not hidden at all: roofline + ICI + DCN;
the point estimate hides what XLA issued asynchronously and adds what it did not:
max(roofline, asynchronous ICI, DCN) + synchronous ICI. MFU = bmx's model FLOPs / (step × peak).
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field

import jax

from bmx.train.aot_buffers import Buffer, largest_buffers
from bmx.train.aot_comms import CollectiveSummary, CommModel
from bmx.train.aot_cost import StepCost, extrapolated_cost, program_cost, unrolled_xla_cost
from bmx.train.aot_hardware import Chip, Topology, compile_only_devices
from bmx.train.config import RunConfig
from bmx.train.flops import average_attention_span, training_flops_per_token
from bmx.train.setup import TrainSetup, build


@dataclass
class MemoryPerDevice:
    arguments: int  # parameters, optimizer state, batch (and frozen parameters)
    outputs: int
    aliased: int  # outputs written over donated arguments
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclass
class AotReport:
    topology: str
    chip: Chip
    num_devices: int
    mesh: dict[str, int]
    remat: str
    attention: str
    seq_len: int
    global_batch_size: int
    grad_accumulation: int
    fits: bool
    memory: MemoryPerDevice | None  # None when XLA refused the program for lack of memory
    compile_error: str  # XLA's message when it refused the program
    largest_buffers: list[Buffer]
    model_flops: float  # per device per step, bmx's MFU formula (no rematerialisation)
    xla_cost: StepCost | None  # per device per step, from XLA (None when not fitting or not asked)
    compile_seconds: float
    notes: list[str] = field(default_factory=list)
    collectives: list[CollectiveSummary] = field(default_factory=list)  # of the compiled step (a loop body once)

    @property
    def microbatch_per_device(self) -> float:
        batch_devices = self.mesh["data"] * self.mesh["fsdp"]
        return self.global_batch_size / self.grad_accumulation / batch_devices

    @property
    def compute_seconds(self) -> float | None:
        """XLA's FLOPs at the chip's sustained matmul rate."""
        if self.xla_cost is None:
            return None
        return self.xla_cost.flops / (self.chip.peak_flops * self.chip.matmul_efficiency)

    @property
    def memory_seconds(self) -> float | None:
        return None if self.xla_cost is None else self.xla_cost.bytes_accessed / self.chip.hbm_bandwidth

    @property
    def ici_seconds(self) -> float | None:
        return None if self.xla_cost is None else self.xla_cost.ici_seconds

    @property
    def dcn_seconds(self) -> float | None:
        return None if self.xla_cost is None else self.xla_cost.dcn_seconds

    @property
    def step_seconds_range(self) -> tuple[float, float] | None:
        """(collectives fully hidden, collectives not hidden at all)."""
        if self.xla_cost is None:
            return None
        roofline = max(self.compute_seconds, self.memory_seconds)
        return (max(roofline, self.ici_seconds, self.dcn_seconds), roofline + self.ici_seconds + self.dcn_seconds)

    @property
    def step_seconds(self) -> float | None:
        """The point estimate: XLA's asynchronous collectives hidden behind compute, its synchronous ones not."""
        if self.xla_cost is None:
            return None
        roofline = max(self.compute_seconds, self.memory_seconds)
        synchronous = self.xla_cost.ici_synchronous_seconds
        return max(roofline, self.ici_seconds - synchronous, self.dcn_seconds) + synchronous

    def _mfu(self, step_seconds: float) -> float:
        return self.model_flops / (step_seconds * self.chip.peak_flops)

    @property
    def predicted_mfu(self) -> float | None:
        return None if self.xla_cost is None else self._mfu(self.step_seconds)

    @property
    def predicted_mfu_range(self) -> tuple[float, float] | None:
        """(lowest: collectives not hidden, highest: fully hidden)."""
        if self.xla_cost is None:
            return None
        hidden, exposed = self.step_seconds_range
        return self._mfu(exposed), self._mfu(hidden)

    @property
    def tokens_per_second(self) -> float | None:
        return None if self.xla_cost is None else self.global_batch_size * self.seq_len / self.step_seconds


def aot_run_config(config: RunConfig) -> RunConfig:
    """The run config made compilable without data or checkpoints: shapes come from the config alone.

    The data is never read (the sequence length is `train.seq_len`), and the architecture of `init.from`
    becomes `model.preset` + `model.overrides`, so the step can be rebuilt with fewer layers.
    """
    config = copy.deepcopy(config)
    if config.train.seq_len is None:
        raise ValueError("AOT compilation reads no data: set train.seq_len (e.g. train.seq_len=2048)")
    config.data.path = None
    if config.init.from_ is not None and config.model.preset is None:
        from bmx.checkpoints import read_model_config

        try:
            architecture = read_model_config(config.init.from_)
        except (OSError, ValueError) as error:
            raise ValueError(f"init.from {config.init.from_} cannot be read here ({error}); name its "
                             "architecture instead, e.g. model.preset=mistral-7b-v0.1") from error
        config.model.preset, config.model.overrides = "mistral-7b-v0.1", architecture.to_dict()
    config.init.from_ = None  # model.preset names the checkpoint's architecture
    if config.model.dtype is None:
        config.model.dtype = "bfloat16"  # what the trainer picks on TPU and GPU
    return config


def step_arguments(setup: TrainSetup, config: RunConfig) -> tuple:
    """Abstract (params, optimizer state, batch, frozen) for `setup.train_step`, with their shardings."""
    batch = {name: jax.ShapeDtypeStruct((config.train.global_batch_size, setup.seq_len), dtype,
                                        sharding=setup.data_sharding)
             for name, dtype in {"inputs": "int32", "targets": "int32", "loss_mask": "float32"}.items()}
    return setup.trainable.abstract_params, setup.abstract_opt_state, batch, setup.trainable.abstract_frozen


def _compile_with_buffer_dump(lowered) -> tuple[object | None, str, list[Buffer]]:
    """(compiled step or None, XLA's out-of-memory message, largest buffers)."""
    with tempfile.TemporaryDirectory(prefix="bmx_aot_") as dump_dir:
        try:
            compiled, error = lowered.compile(compiler_options={"xla_dump_to": dump_dir}), ""
        except jax.errors.JaxRuntimeError as exception:
            if "RESOURCE_EXHAUSTED" not in str(exception):
                raise
            compiled, error = None, str(exception).strip()
        return compiled, error, largest_buffers(dump_dir)


def _variant(config: RunConfig, layers: int, microbatches: int) -> RunConfig:
    """The same run with `layers` layers and `microbatches` microbatches of the same size per step."""
    variant = copy.deepcopy(config)
    microbatch = config.train.global_batch_size // config.train.grad_accumulation
    variant.model.overrides = {**config.model.overrides, "num_hidden_layers": layers}
    variant.train.grad_accumulation, variant.train.global_batch_size = microbatches, microbatch * microbatches
    return variant


def attention_training_flops_per_token(model_config, seq_len: int) -> float:
    """The attention term of `bmx.train.flops.training_flops_per_token` (QKᵀ and PV, forward + backward)."""
    span = average_attention_span(seq_len, model_config.sliding_window)
    return 3 * model_config.num_hidden_layers * 4 * model_config.num_attention_heads * model_config.head_dim * span


def xla_step_cost(config: RunConfig, devices, num_layers: int, *, with_bytes: bool = True,
                  comm_model: CommModel | None = None) -> StepCost:
    """XLA's per-device cost of one step at `num_layers` and the config's accumulation (see `aot_cost`)."""
    def cost_at(layers: int, microbatches: int) -> StepCost:
        variant = _variant(config, layers, microbatches)
        setup = build(variant, devices)
        return unrolled_xla_cost(setup.train_step, step_arguments(setup, variant), with_bytes=with_bytes,
                                 comm_model=comm_model)

    return extrapolated_cost(cost_at, num_layers, config.train.grad_accumulation)


def compile_report(config: RunConfig, topology: Topology, *, with_cost: bool = True, devices=None,
                   judged_as: Chip | None = None) -> AotReport:
    """`judged_as`: measure against another chip's HBM, peak and bandwidth, the TPU compile standing in for
    it (for GPUs, which jax cannot compile for without one)."""
    started = time.perf_counter()
    chip = judged_as or topology.chip
    config = aot_run_config(config)
    devices = compile_only_devices(topology) if devices is None else devices
    setup = build(config, devices)
    lowered = setup.train_step.lower(*step_arguments(setup, config))
    compiled, error, buffers = _compile_with_buffer_dump(lowered)
    memory, collectives = None, []
    comm_model = CommModel(chip, setup.mesh, topology.torus_axes)
    if compiled is not None:
        collectives = comm_model.summary(compiled.as_text())
        stats = compiled.memory_analysis()
        memory = MemoryPerDevice(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                                 aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                                 code=stats.generated_code_size_in_bytes)
    fits = memory is not None and memory.total <= chip.hbm_bytes
    tokens_per_device = config.train.global_batch_size * setup.seq_len / len(devices)
    model_flops = training_flops_per_token(setup.model_config, setup.seq_len) * tokens_per_device
    cost, notes = (_measured_cost(config, setup, lowered, compiled, devices, comm_model) if fits and with_cost
                   else (None, []))
    if judged_as is not None:
        notes.append(f"compiled by XLA:TPU for {topology.name} standing in for {len(devices)} × {chip.name}: "
                     "same mesh, shardings and step; memory and HBM traffic are the TPU program's")
        if chip.ici_switched:
            notes.append(f"collectives timed as NVLink within a node ({chip.ici_link_bandwidth / 1e9:.0f} GB/s a GPU "
                         "one way, whatever the group's shape)"
                         + ("" if len(devices) <= (chip.ici_domain or len(devices)) else
                            f"; more than {chip.ici_domain} GPUs span nodes, which this TPU stand-in does not model"))
    return AotReport(
        topology=topology.name, chip=chip, num_devices=len(devices), mesh=dict(setup.mesh.shape),
        remat=config.model.remat, seq_len=setup.seq_len,
        global_batch_size=config.train.global_batch_size, grad_accumulation=config.train.grad_accumulation,
        attention=_attention_of(setup),
        fits=fits, memory=memory, compile_error=error, largest_buffers=buffers, model_flops=model_flops,
        xla_cost=cost, compile_seconds=time.perf_counter() - started, notes=notes, collectives=collectives)


def predicted_step(config: RunConfig, devices, chip: Chip, name: str) -> AotReport:
    """The step-time prediction alone, for devices at hand (e.g. one GPU, `bench/gpu.py`): XLA's cost of
    the step compiled for `devices`, judged as `chip`; no memory compile (`memory` is None)."""
    started = time.perf_counter()
    config = aot_run_config(config)
    setup = build(config, devices)
    comm_model = CommModel(chip, setup.mesh)
    cost, notes = _measured_cost(config, setup, None, None, devices, comm_model)
    tokens_per_device = config.train.global_batch_size * setup.seq_len / len(devices)
    return AotReport(
        topology=name, chip=chip, num_devices=len(devices), mesh=dict(setup.mesh.shape), remat=config.model.remat,
        attention=_attention_of(setup), seq_len=setup.seq_len, global_batch_size=config.train.global_batch_size,
        grad_accumulation=config.train.grad_accumulation, fits=True, memory=None, compile_error="",
        largest_buffers=[], model_flops=training_flops_per_token(setup.model_config, setup.seq_len) * tokens_per_device,
        xla_cost=cost, compile_seconds=time.perf_counter() - started, notes=notes)


def _measured_cost(config: RunConfig, setup: TrainSetup, lowered, compiled, devices,
                   comm_model: CommModel) -> tuple[StepCost, list[str]]:
    """XLA's per-device cost of the step (see `aot_cost`), attention kernels' work added; and notes on it."""
    num_layers, notes = setup.model_config.num_hidden_layers, []
    if lowered is not None and num_layers == 1 and config.train.grad_accumulation == 1:  # every loop runs once
        cost = program_cost(lowered, len(devices), compiled=compiled, comm_model=comm_model)
    else:
        cost = xla_step_cost(config, devices, num_layers, comm_model=comm_model)
    attention = _attention_of(setup)
    if attention != "xla":
        # XLA cannot see inside a Pallas/cuDNN kernel: count its work with bmx's formula (a lower bound:
        # kernels compute whole tiles), again in the backward pass when the layer is rematerialised.
        recompute = 4 / 3 if config.model.remat != "none" else 1.0
        tokens_per_device = config.train.global_batch_size * setup.seq_len / len(devices)
        kernel_flops = attention_training_flops_per_token(setup.model_config, setup.seq_len) * recompute
        cost = cost + StepCost(flops=kernel_flops * tokens_per_device, bytes_accessed=0.0, transcendentals=0.0)
        notes.append(f"XLA FLOPs include {kernel_flops * tokens_per_device:.3e} for the {attention} attention "
                     "kernel, from bmx's formula (XLA does not count inside kernels)")
    return cost, notes


def _attention_of(setup: TrainSetup) -> str:
    from flax import nnx

    return nnx.eval_shape(lambda: setup.build_model(0)).attention
