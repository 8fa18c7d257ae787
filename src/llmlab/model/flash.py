"""FlashAttention in pure PyTorch: tiled attention with an online softmax (Dao et al. 2022; the loop order
and backward pass of FlashAttention-2, Dao 2023).

Forward: for each query tile, walk the key/value tiles keeping a running row max m, running sum l and an
unnormalized accumulator; rescale both by exp(m_old - m_new) whenever the max grows. The T×T matrix is never
formed; what is kept for backward is O and the row log-sum-exp L = m + log l.

Backward recomputes each tile's probabilities from L: P = exp(S - L), then
    dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - D) with D = rowsum(dO ∘ O),  dQ += dS K·s,  dK += dSᵀ Q·s.

It is a reference for the algorithm (exact to fp32 rounding), not a fast kernel: the tiles run as torch ops.
"""

from __future__ import annotations

import torch

from .mask import AttentionMask


def _tiles(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: AttentionMask, scale: float, block: int):
        B, H, Tq, _ = q.shape
        Tk, Dv = k.shape[2], v.shape[3]
        qf, kf, vf = q.float(), k.float(), v.float()
        out = torch.empty(B, H, Tq, Dv, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
        for q0, q1 in _tiles(Tq, block):
            qb = qf[:, :, q0:q1] * scale
            m = torch.full((B, H, q1 - q0), float("-inf"), device=q.device)
            l = torch.zeros(B, H, q1 - q0, device=q.device)
            acc = torch.zeros(B, H, q1 - q0, Dv, device=q.device)
            for k0, k1 in _tiles(Tk, block):
                if mask.block_is_hidden(q0, q1, k0, k1):
                    continue
                s = qb @ kf[:, :, k0:k1].transpose(-1, -2)
                bias = mask.block(q0, q1, k0, k1, q.device)
                if bias is not None:
                    s = s + bias
                m_new = torch.maximum(m, s.amax(dim=-1))
                p = torch.exp(s - m_new[..., None])
                alpha = torch.exp(m - m_new)
                l = l * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + p @ vf[:, :, k0:k1]
                m = m_new
            out[:, :, q0:q1] = acc / l[..., None]
            lse[:, :, q0:q1] = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.block = mask, scale, block
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale, block = ctx.mask, ctx.scale, ctx.block
        qf, kf, vf, do = q.float(), k.float(), v.float(), grad_out.float()
        Tq, Tk = q.shape[2], k.shape[2]
        D = (do * out).sum(dim=-1)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        for q0, q1 in _tiles(Tq, block):
            qb, dob = qf[:, :, q0:q1], do[:, :, q0:q1]
            for k0, k1 in _tiles(Tk, block):
                if mask.block_is_hidden(q0, q1, k0, k1):
                    continue
                kb, vb = kf[:, :, k0:k1], vf[:, :, k0:k1]
                s = (qb @ kb.transpose(-1, -2)) * scale
                bias = mask.block(q0, q1, k0, k1, q.device)
                if bias is not None:
                    s = s + bias
                p = torch.exp(s - lse[:, :, q0:q1, None])
                dv[:, :, k0:k1] += p.transpose(-1, -2) @ dob
                dp = dob @ vb.transpose(-1, -2)
                ds = p * (dp - D[:, :, q0:q1, None])
                dq[:, :, q0:q1] += (ds @ kb) * scale
                dk[:, :, k0:k1] += (ds.transpose(-1, -2) @ qb) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def flash_attention(q, k, v, mask: AttentionMask, scale: float, block: int = 64) -> torch.Tensor:
    """q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA/MQA: each K/V head serves `groups` query heads; autograd sums their gradients back
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _FlashAttention.apply(q, k, v, mask, scale, block)
