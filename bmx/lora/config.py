"""What a LoRA adapter is: rank, alpha, dropout and the projections it adapts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass(frozen=True)
class LoRAConfig:
    """Defaults are BioMistral's SFT: rank 16, α 16, dropout 0.05 on every attention and MLP projection."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ALL_PROJECTIONS
    use_rslora: bool = False  # scale α/√r instead of α/r (PEFT's `use_rslora`)
    # QLoRA, in the trainer: the frozen base's decoder linears held quantized (bmx.quant) while the adapters train
    base_quantization: Literal["none", "int8", "nf4", "fp4"] = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [name for name in self.targets if name not in ALL_PROJECTIONS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: expected a non-empty subset of "
                             f"{list(ALL_PROJECTIONS)}")

    @property
    def scale(self) -> float:
        """What B·A is multiplied by: α/r (or α/√r with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
