"""PPO for RLHF, the math only: pure tensor functions the PPO training loop calls.

    PPO          Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, value clipping)
    GAE          Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
    RLHF         Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences" (per-token KL penalty,
                 adaptive KL controller); Ouyang et al. 2022 (InstructGPT)
    KL k1/k2/k3  Schulman 2020, "Approximating KL Divergence" (blog note)

Shapes: B rows (completions), T completion tokens per row, right-padded; mask [B, T] is 1 (or True) on real
completion tokens. Every reduction is over mask positions only. Statistics come back as detached 0-dim tensors
(no device sync; call .item() to log them).

Whitening follows the variance convention of TRL's masked_var/masked_whiten (trl.core / trl.trainer.utils up
to the 0.x releases; TRL 1.16 no longer ships PPO): Bessel-corrected (unbiased, n/(n-1)) variance over the
masked elements and (x - mean) * rsqrt(var + 1e-8). We differ only where TRL divides by zero: with a single
masked element the variance is the biased one (0) instead of inf/nan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_shapes(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; "
                             "they must match element for element")


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be > 0 (got {v})")


def _bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


# ------------------------------------------------------------------ masked statistics
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·m / Σ m. With dim=None over all elements (an empty mask is an error); with a dim, rows without any
    masked element give 0. Values outside the mask are never read (inf/nan padding is harmless)."""
    _check_shapes("x", x, mask=mask)
    m = _bool(mask)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)
    if dim is None:
        if not m.any():
            raise ValueError("mask selects no element; masked statistics need at least one real token")
        return total / m.sum()
    return total / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked elements: mean((x - mean)²), times n/(n-1) (Bessel) when unbiased and n > 1."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = _bool(mask).sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with masked_mean / masked_var (unbiased); shift_mean=False adds the mean back
    (scales without centring, as PPO implementations do for rewards). Like TRL, every element is transformed,
    including those outside the mask; callers mask them."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


# ------------------------------------------------------------------ rewards and advantages
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π, with log r = log π_ref - log π (Schulman 2020):
    k1 = -log r (unbiased, can be negative), k2 = ½ (log r)², k3 = (r - 1) - log r (unbiased, ≥ 0)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return torch.expm1(log_r) - log_r


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF rewards (Ziegler et al. 2019, eq. 2; InstructGPT): r_t = -β·KL_t at every completion token,
    plus the reward model's scalar score at the last real token of the row. Returns (rewards, kl), both [B, T],
    zero outside the mask. scores [B]; logprobs/ref_logprobs [B, T] of the sampled tokens under π and π_ref."""
    _check_shapes("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if logprobs.dim() != 2 or scores.shape != logprobs.shape[:1]:
        raise ValueError(f"expected scores [B] and logprobs [B, T]; got scores {tuple(scores.shape)} and "
                         f"logprobs {tuple(logprobs.shape)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0 (got {kl_coef})")
    m = _bool(mask)
    if not m.any(dim=1).all():
        raise ValueError("every row needs at least one completion token in mask to receive its score")
    kl = torch.where(m, kl_estimate(logprobs, ref_logprobs, kl_estimator), logprobs.new_zeros(()))
    rewards = -kl_coef * kl
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, -1).max(dim=1).values  # index of the last real token of each row
    rewards = rewards.index_put((torch.arange(len(last), device=m.device), last),
                                scores.to(rewards.dtype), accumulate=True)
    return rewards, kl


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), token by token from the end:
        δ_t = r_t + γ·V_{t+1} - V_t,    A_t = δ_t + γλ·A_{t+1},    R_t = A_t + V_t
    with V, r and A taken as 0 outside the mask, so bootstrapping stops at the end of each row: the value after
    the last real token counts as 0 whatever `values` holds there (a 0 in mask ends the episode). Returns
    (advantages, returns) [B, T], zero outside the mask, detached (they are targets). Whiten the advantages
    afterwards with masked_whiten if wanted."""
    _check_shapes("rewards", rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"expected rewards [B, T]; got shape {tuple(rewards.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1] (got gamma={gamma}, lam={lam})")
    mb = _bool(mask)
    m = mb.to(values.dtype)
    zero = values.new_zeros(())
    r, v = torch.where(mb, rewards.to(values.dtype), zero), torch.where(mb, values, zero)  # padding never read
    adv = torch.zeros_like(v)
    next_adv = next_value = torch.zeros_like(v[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        next_value = v[:, t]
        adv[:, t] = next_adv
    return adv, (adv + v) * m


# ------------------------------------------------------------------ losses
def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise, averaged over the mask:
        ρ_t = exp(log π - log π_old),   L = mean( max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε)) )
    advantages [B, T] (or [B], one per row). Stats: clip_frac = share of tokens where the clipped term is the
    larger (the clip is binding: its gradient is 0); approx_kl = mean(½(log ρ)²) (k2, what TRL's PPOTrainer
    logged); approx_kl_k3 = mean((ρ - 1) - log ρ); ratio_mean = mean(ρ)."""
    _check_shapes("logprobs", logprobs, old_logprobs=old_logprobs, mask=mask)
    _check_positive(clip_range=clip_range)
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape) or logprobs.dim() != 2:
        raise ValueError(f"expected logprobs of shape [B, T] and advantages [B] or [B, T]; got logprobs "
                         f"{tuple(logprobs.shape)} and advantages {tuple(advantages.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   clip_range_value: float | None = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 / OpenAI baselines; Ziegler et al. 2019):
        V_clip = V_old + clip(V - V_old, -c, c),   L = ½·mean( max((V - R)², (V_clip - R)²) )
    clip_range_value=None gives ½·mean((V - R)²). Stats: clip_frac = share of tokens where the clipped error is
    the larger one; value_mean; explained_variance = 1 - var(R - V) / var(R) (unbiased variances)."""
    _check_shapes("values", values, old_values=old_values, returns=returns, mask=mask)
    err = (values - returns) ** 2
    if clip_range_value is None:
        worst, clip_frac = err, torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        _check_positive(clip_range_value=clip_range_value)
        v_clip = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        err_clip = (v_clip - returns) ** 2
        worst = torch.maximum(err, err_clip)
        clip_frac = masked_mean((err_clip > err).to(values.dtype), mask).detach()
    loss = 0.5 * masked_mean(worst, mask)
    with torch.no_grad():
        var_r = masked_var(returns, mask)
        stats = {"clip_frac": clip_frac, "value_mean": masked_mean(values, mask),
                 "explained_variance": 1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-12)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy H = -Σ_v p_v log p_v = logsumexp(z) - Σ_v p_v z_v of the softmax over the last axis, for logits
    [..., V]; returns [...] (half precision is computed in float32). Rows go chunk_size at a time, so only one
    chunk of probabilities is held.
    (For a policy model, align.logprobs.token_logprobs(return_entropy=True) computes it without full logits.)"""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size):
        z = chunk.float() if chunk.dtype in (torch.float16, torch.bfloat16) else chunk
        p = F.softmax(z, dim=-1)
        z_finite = torch.where(torch.isfinite(z), z, 0.0)  # -inf logits (masked vocab) have p = 0: no 0·inf nan
        out.append((torch.logsumexp(z, dim=-1) - (p * z_finite).sum(-1)).to(logits.dtype))
    return torch.cat(out).reshape(logits.shape[:-1]) if out else logits.new_zeros(logits.shape[:-1])


# ------------------------------------------------------------------ KL controllers and the value head
class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 (got {kl_coef})")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019, sec. 2.2): e = clip(KL/target - 1, -0.2, 0.2),
    β ← β·(1 + e·n_steps/horizon), where n_steps is the number of samples (or steps) since the last update."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        _check_positive(init_kl_coef=init_kl_coef, target=target, horizon=horizon)
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the policy's final hidden states h [B, T, dim] (after the final norm), e.g.
    model(ids, mask, return_logits=False).hidden_states, which skips the LM head. Returns [B, T].
    Weight init N(0, 1/(dim+1)), bias 0 (as in OpenAI's lm-human-preferences)."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, 1)
        nn.init.normal_(self.proj.weight, std=(dim + 1) ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.proj.in_features:
            raise ValueError(f"hidden_states last dim is {hidden_states.shape[-1]} but the value head was built for "
                             f"dim={self.proj.in_features}")
        h = self.dropout(hidden_states).to(self.proj.weight.dtype)
        return self.proj(h).squeeze(-1)
