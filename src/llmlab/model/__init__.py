"""Model: one ModelConfig, one Transformer, every modern architecture by options."""

from .cache import KVCache
from .config import PRESETS, ModelConfig
from .transformer import ModelOutput, Transformer

__all__ = ["KVCache", "ModelConfig", "ModelOutput", "PRESETS", "Transformer"]
