"""Model I/O: llmlab checkpoints (safetensors) and Hugging Face directories in and out."""

from .checkpoint import CheckpointError, load_checkpoint, load_generation_config, save_checkpoint
from .hf import config_from_hf, config_to_hf, load_hf, save_hf, state_dict_from_hf, state_dict_to_hf

__all__ = [
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "load_checkpoint",
    "load_generation_config",
    "load_hf",
    "save_checkpoint",
    "save_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
