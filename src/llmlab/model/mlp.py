"""Position-wise feed-forward networks: plain (ReLU, GELU, SiLU) and gated (SwiGLU, GeGLU; Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swiglu": F.silu,  # gated: silu(x W_gate) ⊙ (x W_up)
    "geglu": F.gelu,  # gated: gelu(x W_gate) ⊙ (x W_up)
}


class MLP(nn.Module):
    """Plain: down(act(up(x))). Gated: down(act(gate(x)) ⊙ up(x)), with gate and up fused into one matmul
    (`up.weight` holds [gate; up] stacked along the output dim)."""

    def __init__(self, cfg: ModelConfig, hidden_dim: int | None = None):
        super().__init__()
        hidden = hidden_dim or cfg.hidden_dim
        self.gated = cfg.gated
        self.act = ACTIVATIONS[cfg.activation]
        self.up = Linear(cfg.dim, hidden * (2 if self.gated else 1), bias=cfg.mlp_bias)
        self.down = Linear(hidden, cfg.dim, bias=cfg.mlp_bias)
        self.down.is_residual_projection = True
        self.up.row_major_output = self.down.row_major_output = False  # elementwise ops and a residual add follow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(h))
