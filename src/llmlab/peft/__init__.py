"""Parameter-efficient fine-tuning on our Transformer, saved and loaded in PEFT's format where PEFT has the
method: LoRA (+rsLoRA, DoRA; lora.py), (IA)³ (ia3.py), BitFit (bitfit.py), AdaLoRA (adalora.py), and the prompt
methods: prompt tuning, P-tuning, prefix tuning and P-tuning v2 (prompt.py); Houlsby/Pfeiffer bottleneck adapters
and AdapterFusion (adapters.py); layer-wise learning-rate decay (layerwise.py)."""

from .adapters import (
    AdapterConfig,
    add_adapter,
    add_fusion,
    load_bottleneck_adapter,
    save_bottleneck_adapter,
    set_adapters,
    set_fusion,
)
from .adalora import (
    AdaLoraConfig,
    AdaLoraController,
    adalora_parts,
    add_adalora,
    orthogonal_regularization,
    set_adalora_enabled,
)
from .bitfit import add_zero_biases, apply_bitfit
from .ia3 import IA3Config, add_ia3, ia3_state_dict, load_ia3, merge_ia3, save_ia3, set_ia3_adapter, unmerge_ia3
from .io import load_adapter, save_adapter
from .layerwise import layerwise_lr_groups
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
from .prompt import PrefixCache, PrefixTuning, PromptTuning, PTuning, load_prompt, p_tuning_v2, save_prompt

__all__ = [
    "AdapterConfig", "add_adapter", "add_fusion", "load_bottleneck_adapter", "save_bottleneck_adapter",
    "set_adapters", "set_fusion", "layerwise_lr_groups",
    "AdaLoraConfig", "AdaLoraController", "IA3Config", "LoraConfig", "LoraLinear", "PTuning", "PrefixCache",
    "PrefixTuning", "PromptTuning", "active_adapter", "adalora_parts", "add_adalora", "add_ia3", "add_lora",
    "add_zero_biases", "apply_bitfit", "ia3_state_dict", "load_adapter", "load_ia3", "load_prompt",
    "lora_state_dict", "merge_ia3", "merge_lora", "orthogonal_regularization", "p_tuning_v2", "save_adapter",
    "save_ia3", "save_prompt", "set_adapter", "set_adalora_enabled", "set_ia3_adapter", "trainable_parameters",
    "unmerge_ia3", "unmerge_lora",
]
