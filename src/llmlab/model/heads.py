"""Output heads on top of the final hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear
from .mlp import ACTIVATIONS


class LMHead(nn.Module):
    """Causal LM: logits = h W_eᵀ (weight tied to the token embedding when tie_embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = Linear(cfg.dim, cfg.vocab_size, bias=cfg.lm_head_bias)

    def forward(self, h, attention_mask=None):
        return self.proj(h)


class MLMHead(nn.Module):
    """BERT masked-LM head: dense → activation → LayerNorm → decoder (tied to the embedding, with bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.act = ACTIVATIONS[cfg.activation if not cfg.gated else "gelu"]
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.dim, cfg.vocab_size, bias=True)

    def forward(self, h, attention_mask=None):
        return self.proj(self.norm(self.act(self.dense(h))))


def pool(h: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """[B, T, D] -> [B, D]: first token (cls), mean over real tokens, or last real token (works with either
    padding side)."""
    if how == "cls":
        if attention_mask is None:
            return h[:, 0]
        first = attention_mask.long().argmax(dim=1)  # first real token (left padding puts it later)
        return h[torch.arange(h.shape[0], device=h.device), first]
    if attention_mask is None:
        return h.mean(dim=1) if how == "mean" else h[:, -1]
    m = attention_mask.to(h.dtype)
    if how == "mean":
        return (h * m[..., None]).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp_min(1)
    last = (torch.arange(h.shape[1], device=h.device) * attention_mask.long()).argmax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), last]


class ClassificationHead(nn.Module):
    """Sequence classification: pool → [BERT pooler: dense + tanh] → dropout → linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooling = cfg.pooling
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if cfg.classifier_pooler else None
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.proj = nn.Linear(cfg.dim, cfg.n_labels)

    def forward(self, h, attention_mask=None):
        x = pool(h, attention_mask, self.pooling)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.proj(self.dropout(x))


class TokenClassificationHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.proj = nn.Linear(cfg.dim, cfg.n_labels)

    def forward(self, h, attention_mask=None):
        return self.proj(self.dropout(h))


class SpanHead(nn.Module):
    """Extractive QA: logits [B, T, 2], start and end scores per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.dim, 2)

    def forward(self, h, attention_mask=None):
        logits = self.proj(h)
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask.bool()[..., None], torch.finfo(logits.dtype).min)
        return logits


HEADS = {
    "lm": LMHead,
    "mlm": MLMHead,
    "classification": ClassificationHead,
    "token_classification": TokenClassificationHead,
    "span": SpanHead,
}


def head_loss(cfg: ModelConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for the head; label -100 is ignored. The LM head predicts token t+1 from t."""
    if cfg.head == "lm":  # shift the labels, not the logits: slicing the logits costs a copy in backward
        labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    if cfg.head == "span":  # labels [B, 2]: start and end index
        start, end = logits.float().unbind(dim=-1)
        return (F.cross_entropy(start, labels[:, 0]) + F.cross_entropy(end, labels[:, 1])) / 2
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
