"""Shared by the reference tests of tests/model: nano configs, models with re-drawn weights, padded batches."""

from __future__ import annotations

import torch
from torch import nn

from llmlab.model import ModelConfig, Transformer

V = 512  # nano vocabulary
MLA = dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
BACKENDS = ("sdpa", "math", "flash")
TOL = dict(atol=1e-5, rtol=1e-5)


def nano(**kw) -> ModelConfig:
    return ModelConfig.preset("nano", **kw)


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(nano(**kw)).eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.15) -> nn.Module:
    """Re-draw every parameter (matrices N(0, std²), gains 1 + N(0, 0.2²), biases N(0, 0.1²)) so attention is
    peaked and every parameter matters: with the 0.02 init, backends and masks differ by less than any tolerance."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if p.dim() >= 2:
            p.copy_(std * noise)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


def padded_batch(seqs: list[torch.Tensor], side: str, T: int | None = None):
    T = T or max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask
