"""Self-attention: multi-head with grouped K/V heads (MHA, GQA, MQA) and DeepSeek-V2 multi-head latent
attention (MLA), over three interchangeable backends.

Backends (`ModelConfig.attn_backend`):
  sdpa   torch's scaled_dot_product_attention (fused kernels; GQA without copying K/V)
  math   softmax(Q Kᵀ·s + bias) V written out; can return the attention probabilities
  flash  tiled online-softmax reference of the FlashAttention algorithm (flash.py)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .flash import flash_attention
from .linear import Linear
from .mask import AttentionMask
from .norm import RMSNorm
from .position import apply_rotary, yarn_mscale

Rope = tuple[torch.Tensor, torch.Tensor] | None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    cfg: ModelConfig,
    scale: float,
    training: bool,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> ([B, H, Tq, Dv], probs [B, H, Tq, Tk] or None).

    Padding queries get an output of exactly zero (and no gradient): a left-padding query may see no key at
    all, and each backend would otherwise fill that row differently."""
    if mask.segments is not None:  # a packed batch: each sequence attends to its own keys
        if need_weights:
            raise ValueError("attention probabilities are not available for a packed batch; run the sequences "
                             "as rows of a padded batch instead")
        outs = [attend(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], mask.segment(offset, q1 - q0, k1 - k0), cfg,
                       scale, training)[0] for q0, q1, k0, k1, offset in mask.segments]
        return torch.cat(outs, dim=2), None
    dropout = cfg.attn_dropout if training else 0.0
    backend = "math" if need_weights else cfg.attn_backend
    probs = None
    if backend == "sdpa":
        bias, is_causal = mask.sdpa_arguments(q.device, q.dtype)
        B, H, Tq, D = q.shape
        Hkv = k.shape[1]
        if Tq == 1 and H != Hkv and not is_causal and (bias is None or bias.shape[1] == 1):
            # One query (a decode step) under GQA: the G query heads that share a K/V head go in as G queries
            # of that head (their mask is the same row), so each K/V head is read once, not G times.
            out = F.scaled_dot_product_attention(
                q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=bias, dropout_p=dropout, scale=scale
            ).view(B, H, 1, v.shape[-1])
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=is_causal, scale=scale, enable_gqa=H != Hkv
            )
    elif backend == "flash":
        out = flash_attention(q, k, v, mask, scale, cfg.flash_block_size)
    else:
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * scale
        bias = mask.dense(q.device, torch.float32)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1).to(q.dtype)
        out = F.dropout(probs, dropout) @ v if dropout else probs @ v
    real = mask.real_queries()
    if real is not None:
        out = out * real[:, None, :, None].to(out.dtype)
    return out, probs if need_weights else None


class Attention(nn.Module):
    """MHA / GQA / MQA. One fused projection produces Q (n_heads) then K and V (n_kv_heads each)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.qkv = Linear(cfg.dim, qkv_out, bias=cfg.qkv_bias)
        self.out = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attn_out_bias)
        self.out.is_residual_projection = True
        self.out.row_major_output = False  # a residual add follows
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x, rope: Rope, mask: AttentionMask, cache=None, layer: int = 0, need_weights=False):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
        if self.q_norm is None and rope is not None:  # q and k are adjacent heads: rotate them in one pass
            (q, k), v = apply_rotary(qkv[:, :H + Hkv], *rope).split((H, Hkv), dim=1), qkv[:, H + Hkv:]
        else:
            q, k, v = qkv.split((H, Hkv, Hkv), dim=1)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y, probs = attend(q, k, v, mask, self.cfg, self.scale, self.training, need_weights)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D)), probs


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2, arXiv:2405.04434, §2.1).

    K and V come from a shared latent c_kv = RMSNorm(W_dkv x) of kv_lora_rank numbers per token, expanded per
    head by W_ukv into a no-position key part k_c and the value. Position enters through a decoupled key
    k_r = RoPE(W_kr x), one head shared by all heads, and a per-head rotary query part. The cache keeps only
    [c_kv, k_r]: (kv_lora_rank + qk_rope_head_dim) numbers per token and layer, whatever the head count.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.n_heads
        self.nope, self.rope, self.vdim, self.rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        qk = self.nope + self.rope
        if cfg.q_lora_rank > 0:
            self.q_down = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_up = Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = Linear(cfg.dim, H * qk, bias=cfg.qkv_bias)
        self.kv_down = Linear(cfg.dim, self.rank + self.rope, bias=cfg.qkv_bias)  # [c_kv ; k_r]
        self.kv_norm = RMSNorm(self.rank, cfg.norm_eps)
        self.kv_up = Linear(self.rank, H * (self.nope + self.vdim), bias=False)
        self.out = Linear(H * self.vdim, cfg.dim, bias=cfg.attn_out_bias)
        self.out.is_residual_projection = True
        self.scale = 1.0 / math.sqrt(qk)
        if cfg.rope_scaling == "yarn":  # DeepSeek-V2: YaRN's temperature on every dim, rotary or not
            self.scale *= yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim) ** 2

    def forward(self, x, rope: Rope, mask: AttentionMask, cache=None, layer: int = 0, need_weights=False):
        B, T, _ = x.shape
        H = self.cfg.n_heads
        q = self.q_up(self.q_norm(self.q_down(x))) if self.cfg.q_lora_rank > 0 else self.q_proj(x)
        q_nope, q_rot = q.view(B, T, H, -1).transpose(1, 2).split((self.nope, self.rope), dim=-1)
        latent, k_rot = self.kv_down(x).split((self.rank, self.rope), dim=-1)
        latent, k_rot = self.kv_norm(latent)[:, None], k_rot[:, None]  # [B, 1, T, *]: one shared "head"
        if rope is not None:
            q_rot, k_rot = apply_rotary(q_rot, *rope), apply_rotary(k_rot, *rope)
        if cache is not None:
            latent, k_rot = cache.update(layer, latent, k_rot)
        Tk = latent.shape[2]
        k_nope, v = self.kv_up(latent[:, 0]).view(B, Tk, H, -1).transpose(1, 2).split((self.nope, self.vdim), -1)
        k = torch.cat((k_nope, k_rot.expand(B, H, Tk, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        y, probs = attend(q, k, v, mask, self.cfg, self.scale, self.training, need_weights)
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.vdim)), probs


def make_attention(cfg: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
