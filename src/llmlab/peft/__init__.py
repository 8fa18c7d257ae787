"""Parameter-efficient fine-tuning: LoRA (+rsLoRA, DoRA) on our Transformer, saved and loaded in PEFT's format."""

from .io import load_adapter, save_adapter
from .lora import (
    LoraConfig,
    LoraLinear,
    active_adapter,
    add_lora,
    lora_state_dict,
    merge_lora,
    set_adapter,
    trainable_parameters,
    unmerge_lora,
)

__all__ = [
    "LoraConfig", "LoraLinear", "active_adapter", "add_lora", "load_adapter", "lora_state_dict", "merge_lora",
    "save_adapter", "set_adapter", "trainable_parameters", "unmerge_lora",
]
