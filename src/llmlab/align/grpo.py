"""GRPO and its descendants, the math only: group-relative advantages and the clipped policy loss.

    GRPO     Shao et al. 2024, "DeepSeekMath" (group baseline, no critic, k3 KL to the reference)
    DAPO     Yu et al. 2025 (asymmetric clip ε_low/ε_high, token-level normalisation over the batch)
    Dr. GRPO Liu et al. 2025, "Understanding R1-Zero-Like Training" (no std scaling, constant normaliser)
    GSPO     Zheng et al. 2025 (sequence-level importance ratio)
    and the other aggregations TRL 1.16's GRPOTrainer offers: bnpo, cispo (MiniMax-M1 2025), sapo (Gao et al.
    2025), luspo (2026), vespo (2026); two-sided clipping `delta` (INTELLECT-2, 2025); the importance-weighted
    ("bias-corrected") KL of DeepSeek-V3.2 (2025).

Conventions and defaults follow TRL 1.16 (trl.trainer.grpo_trainer.GRPOTrainer._compute_loss and GRPOConfig):
loss_type "dapo", beta 0.0, epsilon 0.2 (epsilon_high defaults to epsilon), scale_rewards "group", std
unbiased with eps 1e-4, importance_sampling_level "token", use_bias_correction_kl True. The test suite checks
every loss type against TRL's own _compute_loss. Shapes: logprobs/mask [B, T] over completion tokens;
advantages [B] (one per completion, rows grouped as [g0 g0 ... g1 g1 ...]) or [B, T].
"""

from __future__ import annotations

import math

import torch

from .ppo import _check_positive, _check_shapes, kl_estimate

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO-style clipped surrogate
REWARD_SCALES = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std along dim 1 ignoring NaNs: sqrt(Σ(x - x̄)² / (n - 1)); NaN where fewer than 2 values."""
    mean = torch.nanmean(x, dim=1, keepdim=True)
    n = (~x.isnan()).sum(dim=1, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=1, keepdim=True) * n / (n - 1).clamp(min=1)
    return torch.where(n > 1, var, torch.full_like(var, float("nan"))).sqrt()


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str | bool = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath sec. 4.1.2): Â_i = (r_i - mean(group)) / (std + eps).
    scale="group" divides by the unbiased std of the row's group, "batch" by the unbiased std of all rewards
    (PPO-Lite; the baseline stays the group mean), "none" not at all (Dr. GRPO). True/False mean "group"/"none"
    as in TRL. A NaN reward (unscorable completion) is left out of the mean and std and gets advantage 0; a
    group of one has std 0. rewards [B] with B = n_groups · group_size, consecutive rows forming a group."""
    if isinstance(scale, bool):
        scale = "group" if scale else "none"
    if scale not in REWARD_SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(REWARD_SCALES)} (or True/False)")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B]; got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be a positive int dividing the batch size {rewards.numel()} "
                         f"(got {group_size}); the batch holds group_size completions per prompt")
    r = rewards if rewards.is_floating_point() else rewards.float()
    groups = r.view(-1, group_size)
    centred = groups - torch.nanmean(groups, dim=1, keepdim=True)
    if scale == "group":
        std = _nanstd(groups) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = _nanstd(r.view(1, -1)) if r.numel() > 1 else torch.zeros_like(r[:1]).view(1, 1)
        centred = centred / (std + eps)
    return torch.nan_to_num(centred, nan=0.0).view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ‖π_ref) (Schulman 2020; DeepSeekMath eq. 4):
    exp(ref - logp) - (ref - logp) - 1, unbiased and never negative."""
    _check_shapes("logprobs", logprobs, ref_logprobs=ref_logprobs)
    return kl_estimate(logprobs, ref_logprobs, "k3")


@torch.no_grad()
def _vespo_weights(advantages, log_ratio, m, k_pos, lam_pos, k_neg, lam_neg) -> torch.Tensor:
    """VESPO gamma weight of the sequence ratio w = exp(Σ_t log ρ_t): φ(w) = e^λ·w^k·e^(-λw) (φ(1) = 1), with
    (k, λ) chosen by the sign of the advantage; computed in log space, clamped as TRL does, detached."""
    log_w = (log_ratio.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lam_pos, lam_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              importance_sampling_level: str = "token", delta: float | None = None, kl_bias_correction: bool = True,
              num_items_in_batch: float | torch.Tensor | None = None,
              sapo_temperatures: tuple[float, float] = (1.0, 1.05),
              vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO family's policy loss (to minimise) and its statistics (TRL's metric names).

    ρ = exp(log π_θ - log π_old) per token, or exp(mean_t(log π_θ - log π_old)) per row when
    importance_sampling_level="sequence" (GSPO). old_logprobs=None means on-policy (π_old = π_θ detached).
    Per-token loss ℓ_t by loss_type:
      grpo/bnpo/dr_grpo/dapo/luspo  -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A)  (ρ first capped at `delta`)
      cispo   -sg(min(ρ, ε_high))·A·log π_θ            (epsilon_high is the absolute cap here, e.g. 5.0)
      sapo    -(4/τ)·sigmoid(τ(ρ - 1))·A, τ = sapo_temperatures[0] if A > 0 else [1]
      vespo   -sg(φ(w))·A·log π_θ with vespo_params = (k_pos, λ_pos, k_neg, λ_neg)
    plus β·KL_t with the k3 estimator (times ρ when kl_bias_correction). Aggregation over the mask:
      grpo, sapo    mean over rows of (Σ_t ℓ_t / |o_i|)             (DeepSeekMath eq. 3)
      bnpo          Σ ℓ / (tokens in this batch)
      dapo, cispo, vespo  Σ ℓ / num_items_in_batch (tokens in the whole accumulated batch; default: this batch)
      dr_grpo       Σ ℓ / (B · max_completion_length)
      luspo         mean over rows of Σ_t ℓ_t
    Stats: kl (when ref_logprobs is given), clip_ratio/{low,high,region}_mean (clipped types: share of tokens,
    or of rows at sequence level, whose ratio left the range on the side where the clip binds),
    cispo_clip_ratio, vespo/phi_seq_mean."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; choose one of "
                         f"{', '.join(IS_LEVELS)}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T]; got shape {tuple(logprobs.shape)}")
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    _check_shapes("logprobs", logprobs, old_logprobs=old, mask=mask)
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logprobs.shape)}; got {tuple(advantages.shape)}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_positive(epsilon_low=epsilon_low, epsilon_high=eps_high)
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (got {beta})")
    if beta != 0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference model's log-probs); pass them or set beta=0")
    if ref_logprobs is not None:
        _check_shapes("logprobs", logprobs, ref_logprobs=ref_logprobs)
    if delta is not None and not delta > 1:
        raise ValueError(f"delta caps the ratio from above and must be > 1 (got {delta}); INTELLECT-2 uses 1+ε < δ")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError("loss_type='dr_grpo' divides by B·max_completion_length; pass max_completion_length "
                         f"(a positive int, the generation limit; got {max_completion_length})")
    if loss_type == "sapo":
        _check_positive(sapo_temperature_pos=sapo_temperatures[0], sapo_temperature_neg=sapo_temperatures[1])

    m = mask.to(logprobs.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    adv = adv.to(logprobs.dtype)
    log_ratio = logprobs - old
    if importance_sampling_level == "sequence":  # GSPO: geometric mean of the token ratios, one per row
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w)

    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        if kl_bias_correction:  # DeepSeek-V3.2: weight by ρ so the gradient is the unbiased reverse-KL gradient
            kl = kl * ratio

    stats: dict[str, torch.Tensor] = {}
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logprobs
        stats["cispo_clip_ratio"] = ((ratio > eps_high) & (adv > 0)).to(m.dtype)
    elif loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        low = (ratio < 1.0 - epsilon_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        stats.update({"clip_ratio/low_mean": low.to(m.dtype), "clip_ratio/high_mean": high.to(m.dtype),
                      "clip_ratio/region_mean": (low | high).to(m.dtype)})
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1]).to(ratio.dtype)
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
    else:  # vespo
        phi = _vespo_weights(adv, log_ratio, m, *vespo_params)
        per_token = -phi * adv * logprobs
        stats["vespo/phi_seq_mean"] = phi
    if beta != 0:
        per_token = per_token + beta * kl
    per_token = per_token * m  # broadcasts [B, 1] sequence-level losses over the row's tokens

    if loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "luspo":
        loss = per_token.sum(-1).mean()
    else:  # dapo, cispo, vespo
        n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=m.dtype)
        loss = per_token.sum() / n.clamp(min=1.0)

    def batch_mean(x: torch.Tensor) -> torch.Tensor:  # per-row values: mean over rows; per-token: over the mask
        if x.shape[-1] == 1 and m.shape[-1] > 1:
            return x.mean()
        x = x.expand_as(m)
        return (x * m).sum() / m.sum().clamp(min=1.0)

    with torch.no_grad():
        stats = {k: batch_mean(v.detach()) for k, v in stats.items()}
        if kl is not None:
            stats["kl"] = batch_mean(kl.detach())
    return loss, stats
