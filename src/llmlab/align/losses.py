"""The DPO family of offline preference losses, computed from sequence log-probabilities.

Every function takes log-probability tensors of shape [B] (computed elsewhere, e.g. by llmlab.align.logprobs) and
returns per-example losses (the training loss is their mean) with the detached rewards that are logged.

Normalization conventions (those of TRL 1.16, so that numbers are comparable):
- DPO, cDPO, hinge, robust, CPO and KTO take log-probs summed over the completion tokens.
- IPO takes the same summed log-probs plus the completion lengths: its margin is averaged per token, while the
  logged rewards stay on the summed log-ratios.
- SimPO and ORPO take per-token averaged log-probs; the average is part of those methods.
`sequence_logps` turns per-token log-probs and a completion mask into either form.

Rewards are β·log(π/π_ref) for the reference-based losses and β·log π for the reference-free ones;
"rewards/accuracies" counts strict wins (a tie, e.g. at initialization, counts as 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logps(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """[B, T] per-token log-probs and a 0/1 completion mask -> [B]: the masked sum, or the mean when `average`
    (over at least one token, so an empty completion gives 0 rather than NaN)."""
    if token_logps.shape != mask.shape or token_logps.dim() != 2:
        raise ValueError(
            f"token_logps and mask must both be [B, T]; got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# --- outputs ---------------------------------------------------------------------------------------------------


@dataclass
class PreferenceLossOutput:
    """Per-example losses and rewards of a paired (chosen, rejected) loss."""

    losses: Tensor  # [B]; the training loss is losses.mean()
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        """Batch means under the names TRL logs."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {
            "loss": self.loss.item(),
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margins": margins.mean().item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
        }


@dataclass
class ORPOLossOutput(PreferenceLossOutput):
    """ORPO's odds-ratio term; `log_odds_ratio` is log(odds_chosen / odds_rejected) per example, detached."""

    log_odds_ratio: Tensor  # [B]

    def metrics(self) -> dict[str, float]:
        # TRL's names are shifted: its "log_odds_ratio" is the mean of log σ(log odds ratio) and its
        # "log_odds_chosen" is the mean log odds ratio itself. We keep its names so logs compare.
        return super().metrics() | {
            "log_odds_ratio": F.logsigmoid(self.log_odds_ratio).mean().item(),
            "log_odds_chosen": self.log_odds_ratio.mean().item(),
        }


@dataclass
class KTOLossOutput:
    """Per-example KTO losses (in input order, weights applied) and the unpaired rewards."""

    losses: Tensor  # [B]; the training loss is losses.mean()
    rewards: Tensor  # [B] β·log(π/π_ref), detached
    desirable: Tensor  # [B] bool
    kl: Tensor  # scalar reference point z0 that was used (detached, >= 0)

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        """TRL's KTO metrics: rewards are averaged within each group; the margin is the difference of those means
        (there are no pairs), present only when the batch has both groups; there is no accuracy."""
        out = {"loss": self.loss.item(), "kl": self.kl.item()}
        if self.desirable.any():
            out["rewards/chosen"] = self.rewards[self.desirable].mean().item()
        if (~self.desirable).any():
            out["rewards/rejected"] = self.rewards[~self.desirable].mean().item()
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


# --- validation ------------------------------------------------------------------------------------------------


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"expected 1-D log-prob tensors of one shape [B]; got {listed}")


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _smoothed_logistic(logits: Tensor, eps: float) -> Tensor:
    """-(1-ε)·log σ(x) - ε·log σ(-x): the logistic loss when the preference label is flipped with probability ε."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


# --- reference-based pairwise losses ---------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceLossOutput:
    """DPO and its pairwise variants on summed completion log-probs of the policy and the reference.

    The margin is h = log(π/π_ref)(y_w) - log(π/π_ref)(y_l). With `chosen_lengths`/`rejected_lengths` (completion
    token counts) each log-ratio is first divided by its length; IPO requires them (pass ones if your log-probs are
    already averaged), and "sigmoid" with lengths is TRL's "sigmoid_norm". `label_smoothing` (ε) applies to
    "sigmoid" (cDPO) and "robust" only.
    """
    _check_shapes(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                  ref_rejected=ref_rejected)
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or 'robust', not {loss_type!r}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if loss_type == "ipo" and chosen_lengths is None:
        raise ValueError(
            "loss_type='ipo' averages the log-ratios per token: pass chosen_lengths and rejected_lengths "
            "(completion token counts), or torch.ones(B) if the log-probs are already averaged"
        )

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    if chosen_lengths is None:
        h = chosen_logratios - rejected_logratios
    else:
        _check_shapes(policy_chosen=policy_chosen, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)

    if loss_type == "sigmoid":
        # DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log σ(β·h). With ε > 0 this is conservative DPO
        # (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): -(1-ε)·log σ(β·h) - ε·log σ(-β·h).
        losses = _smoothed_logistic(beta * h, label_smoothing)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): (h - 1/(2β))², β playing the role of τ; h is per token.
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        # SLiC hinge loss (Zhao et al. 2023, arXiv:2305.10425) on the reference-normalized margin: max(0, 1 - β·h).
        losses = torch.relu(1 - beta * h)
    else:
        # Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): an unbiased loss under labels flipped with
        # probability ε: [(1-ε)·(-log σ(β·h)) - ε·(-log σ(-β·h))] / (1 - 2ε).
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)

    return PreferenceLossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


# --- reference-free pairwise losses ----------------------------------------------------------------------------


def cpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> PreferenceLossOutput:
    """CPO's preference term on summed log-probs (TRL's CPOTrainer, loss_type="sigmoid"). The full CPO loss adds
    cpo_alpha × the chosen completions' NLL (behaviour cloning), which the training workflow computes."""
    _check_shapes(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    # CPO (Xu et al. 2024, arXiv:2401.08417, eq. 3): DPO with a uniform reference, -log σ(β·(log π(y_w) - log π(y_l)));
    # ε smooths the label as in cDPO.
    losses = _smoothed_logistic(beta * (chosen_logps - rejected_logps), label_smoothing)
    return PreferenceLossOutput(losses, beta * chosen_logps.detach(), beta * rejected_logps.detach())


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO on per-token averaged log-probs, no reference model. The target margin is γ = gamma_beta_ratio·β (SimPO's
    own parametrization); TRL's CPOConfig(loss_type="simpo", cpo_alpha=0) takes γ itself as `simpo_gamma`."""
    _check_shapes(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    # SimPO (Meng et al. 2024, arXiv:2405.14734): -log σ(β/|y_w|·log π(y_w) - β/|y_l|·log π(y_l) - γ)
    # = -log σ(β·(avg_w - avg_l - γ/β)); ε smooths the label as in cDPO.
    logits = beta * (chosen_avg_logps - rejected_avg_logps - gamma_beta_ratio)
    losses = _smoothed_logistic(logits, label_smoothing)
    return PreferenceLossOutput(losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler 2012: switch formulas at x = -log 2)."""
    cut = -math.log(2)  # each branch only sees its own side, so the unused one cannot put NaN in the gradient
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))), torch.log(-torch.expm1(x.clamp(min=cut))))


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float = 0.1) -> ORPOLossOutput:
    """ORPO's odds-ratio term β·L_OR on per-token averaged log-probs (computed in at least float32).

    The full ORPO loss is L_SFT + β·L_OR, where L_SFT is the NLL of the chosen sequence (in TRL over prompt and
    completion); the training workflow adds it: loss = nll + orpo_loss(...).loss.
    """
    _check_shapes(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    _check_beta(beta)
    if (chosen_avg_logps > 0).any() or (rejected_avg_logps > 0).any():
        raise ValueError("ORPO needs log-probabilities <= 0 (log odds = logp - log(1 - exp(logp)))")
    dtype = torch.promote_types(chosen_avg_logps.dtype, torch.float32)
    chosen, rejected = chosen_avg_logps.to(dtype), rejected_avg_logps.to(dtype)
    # ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 4 and 7): odds(y) = p/(1-p), so
    # log odds = logp - log(1 - exp(logp)); L_OR = -log σ(log odds(y_w) - log odds(y_l)).
    log_odds_ratio = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds_ratio)
    return ORPOLossOutput(losses, beta * chosen.detach(), beta * rejected.detach(), log_odds_ratio.detach())


# --- unpaired: KTO ---------------------------------------------------------------------------------------------


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point estimate: the batch mean of log(π/π_ref) on mismatched (prompt, completion) pairs that
    the data pipeline builds. `kto_loss` detaches it and clamps it at 0."""
    _check_shapes(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).mean()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO on summed completion log-probs of unpaired examples; `desirable` [B] bool labels each one and `kl` is the
    scalar reference point z0 (see `kto_kl`), used without gradient and clamped at 0 as in TRL."""
    _check_shapes(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    _check_beta(beta)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    if kl.numel() != 1:
        raise ValueError(f"kl must be a scalar tensor, got shape {tuple(kl.shape)}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"weights must be >= 0, got {desirable_weight} and {undesirable_weight}")
    z0 = kl.detach().reshape(()).clamp(min=0)
    logratios = policy_logps - ref_logps
    # KTO (Ethayarajh et al. 2024, arXiv:2402.01306): with r = log(π/π_ref) and value v = σ(β·(r - z0)) for
    # desirable and σ(β·(z0 - r)) for undesirable examples, the loss is λ_y·(1 - v).
    value = torch.where(desirable, torch.sigmoid(beta * (logratios - z0)), torch.sigmoid(beta * (z0 - logratios)))
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(value.dtype)
    return KTOLossOutput(weight * (1 - value), beta * logratios.detach(), desirable, z0)
