"""Cross-entropy of a linear output layer without materializing the logits.

For a vocabulary V and N tokens the logits are N×V floats (67 MB for 2048 tokens of an 8192 vocabulary,
gigabytes for 128k vocabularies), and autograd keeps several N×V buffers alive: the logits, the
log-softmax, its gradient. Here the tokens are processed in chunks: each chunk's logits are computed, turned
into the loss and straight away into the gradient (softmax - one-hot), multiplied back into the gradients of
the hidden states and the weight, and dropped. Peak extra memory is one chunk of logits (about 16 MB: small
enough to be reused by the allocator instead of being mapped afresh every time); the matmul FLOPs
are those of the plain path. (The same idea as Liger's fused linear cross-entropy and Apple's Cut
Cross-Entropy, Wijmans et al. 2024.)

    loss = (1/n) Σ_t [logsumexp(z_t) - z_t[y_t]],  z_t = W h_t + b,  n = number of labels != ignore_index
    ∂loss/∂z_t = (softmax(z_t) - onehot(y_t)) / n
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index: int, chunk: int, grad_enabled: bool):
        n_valid = (labels != ignore_index).sum().clamp_min(1)
        # Under torch.no_grad (evaluation) needs_input_grad still says True for parameters: skip the gradients.
        needs_grad = ctx.needs_input_grad if grad_enabled else (False,) * 3
        grad_h = torch.empty_like(h) if needs_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if bias is not None and needs_grad[2] else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], labels[start : start + chunk]
            z = (hc @ weight.t()).float()
            if bias is not None:
                z += bias.float()
            valid = yc != ignore_index
            target = yc.clamp_min(0)[:, None]
            picked = z.gather(1, target)[:, 0]
            # All in place on the chunk (no N×V temporaries): z ← exp(z - max) / Σ = softmax, then - onehot.
            zmax = z.amax(dim=-1, keepdim=True)
            z.sub_(zmax).exp_()
            total = z.sum(dim=-1, keepdim=True)
            loss += ((zmax + total.log())[:, 0] - picked).mul_(valid).sum()
            z.div_(total)
            z.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=z.dtype))
            z.mul_((valid.float() / n_valid)[:, None])  # zero on ignored rows, mean over the labelled ones
            gz = z.to(h.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = gz @ weight
            if grad_w is not None:
                if gz.dtype == grad_w.dtype:
                    grad_w.addmm_(gz.t(), hc)  # accumulate inside the matmul: no V×D temporary per chunk
                else:
                    grad_w += (gz.t() @ hc).float()
            if grad_b is not None:
                grad_b += z.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_loss).to(w_dtype),
            None if grad_b is None else (grad_b * grad_loss).to(b_dtype),
            None, None, None, None,
        )


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(h Wᵀ + b) against labels. h [N, D], weight [V, D], labels [N].
    chunk: tokens per chunk; by default as many as keep one chunk of logits near 4M floats (16 MB)."""
    chunk = chunk or max(16, 2**22 // weight.shape[0])
    if torch.is_autocast_enabled(h.device.type):  # follow autocast: matmuls in its dtype
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return _LinearCrossEntropy.apply(h, weight, bias, labels, ignore_index, chunk, torch.is_grad_enabled())
