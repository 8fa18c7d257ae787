"""Training: one trainer loop with a pluggable loss, AdamW and schedules, exact checkpoint/resume, and the
pretraining and SFT workflows (typed configs filled from YAML recipes and key=value overrides).
Imports model, data, tokenizer and io (checkpoint files)."""

from .config import TrainConfig
from .optim import Schedule, build_optimizer, parameter_groups
from .pretraining import PretrainConfig, PretrainData, TokenizerSpec, pretrain
from .recipe import RecipeError, load_recipe, save_recipe, valid_keys
from .sample import generate
from .supervised import SFTConfig, SFTData, sft
from .state import list_checkpoints, seed_everything
from .trainer import LossFn, Trainer, TrainingDiverged, TrainResult, lm_loss

__all__ = ["LossFn", "PretrainConfig", "PretrainData", "RecipeError", "SFTConfig", "SFTData", "Schedule",
           "TokenizerSpec", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "build_optimizer",
           "generate", "list_checkpoints", "lm_loss", "load_recipe", "parameter_groups", "pretrain", "save_recipe",
           "seed_everything", "sft", "valid_keys"]
