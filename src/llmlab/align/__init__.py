"""Preference alignment on our Transformer: log-probs of completions (logprobs.py), the DPO family of offline
preference losses (losses.py), reward models and reward functions (reward.py), the math of PPO (ppo.py) and
GRPO (grpo.py), and the workflows: train_reward_model (rm.py), dpo (dpo.py), ppo (ppo_train.py) and grpo
(grpo_train.py), with rollouts on the inference engine (rollout.py)."""

from .logprobs import SequenceLogprobs, sequence_logprobs, target_mask, token_logprobs
from .losses import cpo_loss, dpo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss
from .reward import RewardModel, bradley_terry_loss, check_same_tokenizer

__all__ = ["RewardModel", "SequenceLogprobs", "bradley_terry_loss", "check_same_tokenizer", "cpo_loss", "dpo_loss",
           "kto_kl", "kto_loss", "orpo_loss", "sequence_logprobs", "simpo_loss", "target_mask", "token_logprobs"]
