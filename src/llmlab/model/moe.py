"""Mixture of experts feed-forward (Shazeer et al. 2017; Switch, Fedus et al. 2021; DeepSeekMoE, Dai et al.
2024): a router picks top_k of n_experts MLPs per token, plus optional always-on shared experts.

Dispatch is grouped by expert: the N·k (token, expert) assignments are sorted by expert id, each expert runs
once on the contiguous block of tokens routed to it, and the weighted outputs are scattered back with
index_add. The Python loop is over experts, never over tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .mlp import MLP


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_hidden_dim) for _ in range(cfg.n_experts))
        self.shared = MLP(cfg, cfg.moe_hidden_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (weights [N, k], expert ids [N, k], router logits [N, E], scores [N, E])."""
        logits = self.router(x).float()
        scores = logits.softmax(dim=-1) if self.cfg.router == "softmax" else logits.sigmoid()
        weights, experts = scores.topk(self.cfg.moe_top_k, dim=-1)
        if self.cfg.moe_norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, logits, scores

    def forward(self, x: torch.Tensor, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim] -> (output [B, T, dim], weighted auxiliary loss, a scalar). real [B, T] bool marks the
        tokens that are not padding: only they count in the auxiliary losses (as transformers' Mixtral does
        with its attention mask); padding is still dispatched, its output unused."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, logits, scores = self.route(x)
        k, E = self.cfg.moe_top_k, self.cfg.n_experts
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat_experts, minlength=E)
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            assignment = order[start : start + n]
            tokens = assignment // k
            y = self.experts[e](x[tokens]) * flat_weights[assignment, None].to(x.dtype)
            out.index_add_(0, tokens, y.to(out.dtype))
            start += n
        if self.shared is not None:
            out = out + self.shared(x)
        if real is not None and not bool(real.all()):
            real = real.reshape(-1)
            logits, scores = logits[real], scores[real]
            counts = torch.bincount(experts[real].flatten(), minlength=E)
        return out.view(shape), self.aux_loss(logits, scores, counts)

    def aux_loss(self, logits: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Switch load balancing: E · Σ_i f_i · P_i, with f_i the fraction of the N·k assignments that went to
        expert i and P_i the mean router probability of expert i (sigmoid scores normalized per token). It is
        1 under perfectly uniform routing. Router z-loss (ST-MoE, Zoph et al. 2022): mean_t logsumexp(z_t)²."""
        cfg = self.cfg
        total = logits.new_zeros(())
        if not len(logits):  # nothing but padding
            return total
        if cfg.moe_aux_loss_coef:
            probs = scores if cfg.router == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
            f = counts.float() / counts.sum()
            total = total + cfg.moe_aux_loss_coef * cfg.n_experts * (f * probs.mean(dim=0)).sum()
        if cfg.moe_z_loss_coef:
            total = total + cfg.moe_z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return total
