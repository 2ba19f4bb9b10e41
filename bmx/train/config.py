"""The run configuration: one section per concern, each dataclass next to the code it configures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
