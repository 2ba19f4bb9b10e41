"""The run configuration: one section per concern, each dataclass next to the code it configures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal
from collections.abc import Callable

from bmx.config_io import ConfigError
from bmx.distributed import DistributedConfig
from bmx.lora.config import LoRAConfig
from bmx.train.checkpointing import CheckpointConfig
from bmx.train.mesh import MeshConfig
from bmx.train.optimizer import OptimizerConfig, ScheduleConfig
from bmx.train.wandb_logging import WandbConfig

DType = Literal["float32", "bfloat16"]


@dataclass
class ModelConfig:
    preset: str | None = None  # a `bmx.model.preset` name; the architecture of `init.from` when omitted
    overrides: dict[str, Any] = field(default_factory=dict)  # MistralConfig fields changed from the preset
    dtype: DType | None = None  # computation dtype; default bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: DType = "float32"  # master weights and optimizer state
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    attention: Literal["xla", "cudnn", "splash"] | None = None  # None: splash on TPU, cudnn on GPU, else xla


@dataclass
class DataConfig:
    path: str | None = None  # a directory made by `python -m bmx.data prepare`
    seed: int = 0  # shuffling seed (a new permutation every epoch)
    num_epochs: int | None = None  # None: repeat for as many steps as asked
    document_masking: bool = True  # with segment ids in the data, attend within documents only


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, over all processes
    grad_accumulation: int = 1  # microbatches per step
    z_loss: float = 0.0  # weight of the log-normaliser² auxiliary loss
    seq_len: int | None = None  # tokens per sequence; default: the prepared data's (must match it)
    loss_vocab_chunk: int | None = None  # vocabulary chunk of the loss; 0: full logits; None: 8192 when a
                                         # device's float32 logits would pass 1 GiB, else full
    eval_every: int = 0  # steps between held-out evaluations (0: never)
    eval_batches: int = 8  # validation batches per evaluation


@dataclass
class InitConfig:
    from_: str | None = None  # a bmx checkpoint to continue pretraining from (YAML key `from`)
    seed: int = 0  # parameter initialisation seed when training from scratch


@dataclass
class LoggingConfig:
    every: int = 1  # steps between metric lines
    tensorboard: bool = True
    progress: bool = True  # console progress bar
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; default from the device table
    wandb: WandbConfig | None = None  # also log to Weights & Biases (`pip install 'bmx[wandb]'`)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    task: Literal["pretrain", "sft"] = "pretrain"  # sft: LoRA adapters on a frozen `init.from` (see `lora`)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init: InitConfig = field(default_factory=InitConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # the adapters trained when task is sft
    export_hf: str | None = None  # write the final model as a Hugging Face directory here

    def __post_init__(self) -> None:  # at load time, so a bad value never reaches the 13 s of setup
        check_ranges(self)


def _positive(value) -> bool:
    return value > 0


def _non_negative(value) -> bool:
    return value >= 0


def _mesh_size(value) -> bool:
    return value >= 1 or value == -1


# Every numeric field of the run config and the values it accepts (None, where a field allows it,
# is always accepted). A new numeric field needs a line here: tests/train/test_hardening.py checks.
NUMERIC_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "data.seed": ("≥ 0", _non_negative),
    "data.num_epochs": ("≥ 1", _positive),
    **{f"mesh.{axis}": ("≥ 1, or -1 for the remaining devices", _mesh_size)
       for axis in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp")},
    "optimizer.learning_rate": ("> 0", _positive),
    "optimizer.b1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.b2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optimizer.eps": ("> 0", _positive),
    "optimizer.weight_decay": ("≥ 0", _non_negative),
    "optimizer.clip_norm": ("a number (≤ 0 disables clipping)", math.isfinite),
    "schedule.warmup_steps": ("≥ 0", _non_negative),
    "schedule.final_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "train.steps": ("≥ 1", _positive),
    "train.global_batch_size": ("≥ 1", _positive),
    "train.grad_accumulation": ("≥ 1", _positive),
    "train.z_loss": ("≥ 0", _non_negative),
    "train.seq_len": ("≥ 2 (a token and its target)", lambda v: v >= 2),
    "train.loss_vocab_chunk": ("≥ 0 (0: the full logits)", _non_negative),
    "train.eval_every": ("≥ 0 (0: never)", _non_negative),
    "train.eval_batches": ("≥ 1", _positive),
    "checkpoint.every": ("≥ 1", _positive),
    "checkpoint.keep": ("≥ 1", _positive),
    "logging.every": ("≥ 1", _positive),
    "logging.peak_flops": ("> 0", _positive),
    "init.seed": ("≥ 0", _non_negative),
    "distributed.num_processes": ("≥ 1", _positive),
    "distributed.process_id": ("≥ 0", _non_negative),
    "distributed.heartbeat_timeout_seconds": ("≥ 1", _positive),
    "distributed.initialization_timeout_seconds": ("≥ 1", _positive),
    "lora.rank": ("≥ 1", _positive),
    "lora.alpha": ("> 0", _positive),
    "lora.dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def numeric_fields(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Dotted key → value of every int or float leaf (not bools) of a nested config dict."""
    found = {}
    for key, value in values.items():
        if isinstance(value, dict):
            found.update(numeric_fields(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + key] = value
    return found


def check_ranges(config: RunConfig) -> None:
    """Refuse out-of-range numbers with a `ConfigError` naming the key (`train.steps: -3 is out of range`)."""
    from bmx.config_io import to_dict

    for key, value in numeric_fields(to_dict(config)).items():
        expected, accepts = NUMERIC_RANGES.get(key, (None, None))
        if accepts is not None and not (math.isfinite(value) and accepts(value)):
            raise ConfigError(f"{key}: {value!r} is out of range (expected {expected})")
    train, schedule = config.train, config.schedule
    if schedule.warmup_steps > train.steps:
        raise ConfigError(f"schedule.warmup_steps: {schedule.warmup_steps} is more than train.steps {train.steps}")
    if train.global_batch_size % train.grad_accumulation:
        raise ConfigError(f"train.global_batch_size: {train.global_batch_size} is not a multiple of "
                          f"train.grad_accumulation {train.grad_accumulation}")
    processes, process_id = config.distributed.num_processes, config.distributed.process_id
    if processes is not None and process_id is not None and process_id >= processes:
        raise ConfigError(f"distributed.process_id: {process_id} is not below distributed.num_processes {processes}")
