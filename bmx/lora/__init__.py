"""LoRA for bmx Mistral: adapters, PEFT-format export/import, merging, and SFT data for the trainer.

    apply_lora(model, LoRAConfig())           # rank 16, α 16, dropout 0.05 on all 7 projections (B = 0)
    lora_params(model)                        # only A and B: what the optimizer updates
    with_lora_dropout(state, key)             # a state with fresh dropout keys: training forwards
    save_peft_adapter(model, config, dir)     # adapter_model.safetensors + adapter_config.json
    load_peft_adapter(model, dir)             # a PEFT adapter onto a bmx model
    merge_lora(model)                         # W + (A·B)·α/r in place;  merge_lora_to_hf for checkpoints
"""

from bmx.lora.adapters import apply_lora, lora_modules, lora_params, merge_lora, split_lora, with_lora_dropout
from bmx.lora.config import ALL_PROJECTIONS, LoRAConfig
from bmx.lora.layers import LoRALinear
from bmx.lora.merge_to_hf import merge_lora_to_hf
from bmx.lora.peft_format import load_peft_adapter, read_peft_adapter, save_peft_adapter

__all__ = ["LoRAConfig", "LoRALinear", "ALL_PROJECTIONS", "apply_lora", "lora_modules", "lora_params", "split_lora",
           "with_lora_dropout", "merge_lora", "merge_lora_to_hf", "save_peft_adapter", "load_peft_adapter",
           "read_peft_adapter"]
