"""AdaLoRA on llmlab's Transformer: LoRA whose rank budget is re-allocated during training by importance.

AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
arXiv:2303.10512) writes each update in SVD form,

    y = W x + s · P Λ Q x,      P = lora_B [out, r],  Λ = diag(lora_E) [r],  Q = lora_A [r, in],  s = alpha / r

with Λ = 0 at init (fresh == base) and P, Q ~ N(0, 0.02²) (as PEFT). Rank is pruned by zeroing singular values
λ_i (keeping P, Q: a pruned triplet may come back at a later allocation), so no matrix changes shape.

Importance (paper §3.2, PEFT's RankAllocator). For every entry w of P, Λ, Q, after each backward:

    I(w)   = |w · ∂L/∂w|                              (sensitivity)
    Ī_t    = β1 Ī_{t-1} + (1 - β1) I_t                (smoothed sensitivity)
    Ū_t    = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|        (uncertainty)
    s(w)   = Ī_t · Ū_t

and the score of triplet i of one matrix is  S_i = s(λ_i) + mean_k s(P_ki) + mean_j s(Q_ij).

Budget (paper eq. 12, PEFT's budget_schedule), b(0) = init_r · n, b(T) = target_r · n over the n adapted parts:

    t <= t_i:                b = init_r · n
    t_i < t < T - t_f:       b = floor((init_r·n - target_r·n) · (1 - (t - t_i)/(T - t_f - t_i))³ + target_r·n)
    t >= T - t_f:            b = target_r · n  (the final allocation is frozen for the last t_f steps)

with allocation every ΔT steps. Only the b triplets of highest S (over ALL matrices together) keep their λ; the
rest are set to 0. PEFT thresholds with kthvalue (ties can prune more than asked); we keep exactly the top b by
a stable sort, so the budget is met exactly.

Orthogonality (paper eq. 4): R = Σ_parts ||PᵀP − I||²_F + ||QQᵀ − I||²_F, added to the loss with a weight
(config.orth_reg_weight) so that P and Q stay near-orthogonal and λ keeps meaning a singular value. PEFT uses the
unsquared Frobenius norm averaged over matrices; we follow the paper's squared form.

Our fused `qkv` and gated `up` layers carry one (P, Λ, Q) per HF part (q, k, v; gate, up), as LoRA does
(lora.py). Like ia3.py, layers stay in place: a child module `adalora` and a forward hook add the update.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .lora import Part, resolve_targets


@dataclass
class AdaLoraConfig:
    init_r: int = 12
    target_r: int = 8              # average final rank per adapted part
    alpha: float = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    total_step: int = 1000         # T
    tinit: int = 0                 # t_i: warm-up steps at the full budget
    tfinal: int = 0                # t_f: final steps at the (frozen) target budget
    deltaT: int = 1                # allocate every deltaT steps
    beta1: float = 0.85            # EMA of the sensitivity
    beta2: float = 0.85            # EMA of the uncertainty
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not (isinstance(self.init_r, int) and isinstance(self.target_r, int) and 0 < self.target_r <= self.init_r):
            raise ValueError(f"AdaLoraConfig needs ints 0 < target_r <= init_r, got {self.target_r}, {self.init_r}")
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"AdaLoraConfig: tinit + tfinal ({self.tinit} + {self.tfinal}) must be below "
                             f"total_step ({self.total_step}), leaving steps for the budget to decrease")
        if self.deltaT < 1 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("AdaLoraConfig: deltaT >= 1 and beta1, beta2 in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.init_r

    def to_dict(self) -> dict:
        return asdict(self)


class SVDPart(nn.Module):
    """P Λ Q on rows [start, stop) of one Linear."""

    def __init__(self, part: Part, in_features: int, r: int, scaling: float, dtype, device):
        super().__init__()
        self.name, self.start, self.stop, self.scaling = part.name, part.start, part.stop, scaling
        self.lora_A = nn.Parameter(torch.randn(r, in_features, dtype=dtype, device=device) * 0.02)           # Q
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=device))                           # Λ
        self.lora_B = nn.Parameter(torch.randn(part.stop - part.start, r, dtype=dtype, device=device) * 0.02)  # P

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # s · P (λ ⊙ (Q x))
        return ((x @ (self.lora_A * self.lora_E).T) @ self.lora_B.T) * self.scaling


class AdaLoraLayer(nn.Module):
    """Child `adalora` of a targeted Linear, with the forward hook adding each part's update to its rows."""

    def __init__(self, parts: dict[str, SVDPart], dropout: float):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def hook(self, layer: nn.Linear, args, out):
        if not self.enabled:
            return out
        x = self.dropout(args[0])
        for p in self.parts.values():
            out[..., p.start:p.stop] += p.delta(x.to(p.lora_A.dtype)).to(out.dtype)
        return out


def adalora_parts(model: nn.Module) -> dict[str, dict[str, SVDPart]]:
    """module name -> part name -> SVDPart."""
    return {n: dict(m.adalora.parts) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(getattr(m, "adalora", None), AdaLoraLayer)}


def add_adalora(model: nn.Module, config: AdaLoraConfig) -> nn.Module:
    """Add an AdaLoRA adapter (Λ = 0: outputs unchanged) on the targets, freeze everything else. One AdaLoRA
    adapter per model; drive it with AdaLoraController."""
    if getattr(model, "adalora_config", None) is not None:
        raise ValueError("the model already has an AdaLoRA adapter")
    targets = resolve_targets(model, config.target_modules)
    modules = dict(model.named_modules())
    for module, parts in targets.items():
        layer = modules[module]
        if module == "head.proj" or not isinstance(layer, nn.Linear):
            raise ValueError(f"AdaLoRA target {module!r} must be a plain Linear and not the LM head")
        for p in parts:
            if config.init_r > min(layer.in_features, p.stop - p.start):
                raise ValueError(f"init_r={config.init_r} exceeds min(in, out) of {module} part {p.name!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module, parts in targets.items():
        layer = modules[module]
        W = layer.weight
        dtype = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
        layer.adalora = AdaLoraLayer({p.name: SVDPart(p, layer.in_features, config.init_r, config.scaling, dtype,
                                                      W.device) for p in parts}, config.dropout)
        layer.register_forward_hook(layer.adalora.hook)
    model.adalora_config = config
    return model


def set_adalora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the AdaLoRA updates off (the base model exactly) or on again."""
    for n, m in model.named_modules():
        if isinstance(m, AdaLoraLayer):
            m.enabled = enabled


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    """R = Σ_parts ||PᵀP − I||²_F + ||QQᵀ − I||²_F (unweighted; multiply by config.orth_reg_weight)."""
    total = None
    for parts in adalora_parts(model).values():
        for p in parts.values():
            I = torch.eye(p.lora_A.shape[0], dtype=p.lora_A.dtype, device=p.lora_A.device)
            r = ((p.lora_B.T @ p.lora_B - I) ** 2).sum() + ((p.lora_A @ p.lora_A.T - I) ** 2).sum()
            total = r if total is None else total + r
    if total is None:
        raise ValueError("the model has no AdaLoRA adapter (call add_adalora)")
    return total


class AdaLoraController:
    """Importance tracking and rank allocation. Per training step t (1-based, as PEFT's global_step):

        loss = lm_loss + config.orth_reg_weight * orthogonal_regularization(model)
        loss.backward(); optimizer.step()
        controller.update_and_allocate(t)        # reads the gradients: call before zero_grad
        optimizer.zero_grad()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config: AdaLoraConfig = getattr(model, "adalora_config", None)
        if self.config is None:
            raise ValueError("the model has no AdaLoRA adapter (call add_adalora)")
        self.parts = [(m, n, p) for m, ps in adalora_parts(model).items() for n, p in ps.items()]
        self.by_key = {(m, n): p for m, n, p in self.parts}
        self.init_budget = self.config.init_r * len(self.parts)
        self.target_budget = self.config.target_r * len(self.parts)
        self.exp_avg_ipt: dict[tuple[str, str, str], torch.Tensor] = {}   # Ī
        self.exp_avg_unc: dict[tuple[str, str, str], torch.Tensor] = {}   # Ū
        self.rank_pattern: dict[tuple[str, str], torch.Tensor] | None = None  # the frozen final allocation

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, allocate now?) at step t: full until t_i, cubic decrease, target from T - t_f on."""
        c = self.config
        end = c.total_step - c.tfinal
        if step <= c.tinit:
            return self.init_budget, False
        if step >= end:
            return self.target_budget, step == end
        mul = 1 - (step - c.tinit) / (end - c.tinit)
        return int((self.init_budget - self.target_budget) * mul ** 3 + self.target_budget), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """One EMA step of sensitivity and uncertainty for every P, Λ, Q entry with a gradient."""
        b1, b2 = self.config.beta1, self.config.beta2
        for module, name, p in self.parts:
            for t in ("lora_A", "lora_E", "lora_B"):
                w = getattr(p, t)
                if w.grad is None:
                    continue
                key = (module, name, t)
                ipt = (w * w.grad).abs()
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(w))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(w))
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def score(self, module: str, name: str, t: str) -> torch.Tensor:
        """s(w) = Ī · Ū (zeros before any update)."""
        key = (module, name, t)
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(getattr(self.by_key[(module, name)], t))
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[tuple[str, str], torch.Tensor]:
        """S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki), one [r] vector per part."""
        return {(m, n): self.score(m, n, "lora_E").view(-1) + self.score(m, n, "lora_A").mean(dim=1)
                + self.score(m, n, "lora_B").mean(dim=0) for m, n, _ in self.parts}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[tuple[str, str], torch.Tensor]:
        """Keep the λ of the `budget` highest-scoring triplets over all parts, zero the rest; returns the kept
        mask per part."""
        scores = self.triplet_scores()
        keys = list(scores)
        flat = torch.cat([scores[k].float().cpu() for k in keys])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, descending=True, stable=True)[:budget]] = True
        out, at = {}, 0
        for k in keys:
            r = scores[k].numel()
            mask = keep[at:at + r]
            at += r
            E = self.by_key[k].lora_E
            E.masked_fill_(~mask.to(E.device)[:, None], 0.0)
            out[k] = mask
        return out

    def update_and_allocate(self, step: int) -> int:
        """After backward at step t: update importance (before the final phase), then prune to the budget when
        the schedule says so; in the final phase keep the frozen allocation. Returns the budget."""
        c = self.config
        end = c.total_step - c.tfinal
        if step < end:
            self.update_ipt()
        budget, allocate = self.budget_schedule(step)
        if step > end and self.rank_pattern is not None:
            with torch.no_grad():
                for k, p in self.by_key.items():
                    p.lora_E.masked_fill_(~self.rank_pattern[k].to(p.lora_E.device)[:, None], 0.0)
        elif allocate:
            pattern = self.mask_to_budget(budget)
            if step == end:
                self.rank_pattern = pattern
        return budget

    def ranks(self) -> dict[tuple[str, str], int]:
        """Current rank (non-zero λ) of every part."""
        return {k: int((p.lora_E != 0).sum()) for k, p in self.by_key.items()}
