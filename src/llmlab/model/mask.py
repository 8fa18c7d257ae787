"""Which keys each query may see, described once and rendered by every attention backend.

A mask is a description (causal or not, padding, prefix lengths, sliding window, ALiBi slopes), not a
T×T tensor: `sdpa` and `math` materialize it, `flash` renders one tile at a time and skips tiles that
causality or the window hides entirely.

Causality and the window compare token indices (query i is key index offset + i); the prefix of a
prefix-LM is measured in positions (real tokens), so left padding does not shift it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A large finite negative instead of -inf: a fully masked row (a padding query) then yields a uniform,
# finite distribution instead of NaN, and the online softmax of the flash backend never sees -inf - -inf.
MASKED = -1e30


@dataclass
class AttentionMask:
    causal: bool
    n_queries: int
    n_keys: int
    q_offset: int | torch.Tensor = 0  # index of the first query among the keys (tokens already cached); a [B]
    # tensor when every row has its own (the inference engine's batches: keys left-aligned, rows of any length)
    key_valid: torch.Tensor | None = None  # [B, Tk] bool, False for padding
    key_pos: torch.Tensor | None = None  # [B, Tk] positions of the keys, needed with prefix_len
    prefix_len: torch.Tensor | None = None  # [B]: keys at positions < prefix_len are seen by every query
    window: int | None = None  # sliding window: a query sees keys with 0 <= i - j < window
    alibi: torch.Tensor | None = None  # [H] ALiBi slopes: bias -slope·|i - j|
    document_ids: torch.Tensor | None = None  # [B, T]: packed documents; a query sees keys of its own document
    query_valid: torch.Tensor | None = None  # [B, T] False for padding queries (default: from key_valid)
    # A packed batch (one row holding several sequences back to back, the engine's prompt chunks): a list of
    # (q0, q1, k0, k1, offset), queries q0:q1 of the row see only keys k0:k1, as one sequence whose first query
    # sits at index `offset` among them. Attention then runs segment by segment (see segment()).
    segments: list[tuple[int, int, int, int, int]] | None = None

    @property
    def is_trivial(self) -> bool:
        """Nothing but (optionally) plain causality with queries aligned to the end of the keys."""
        return (self.key_valid is None and self.prefix_len is None and self.window is None and self.alibi is None
                and self.document_ids is None and not isinstance(self.q_offset, torch.Tensor))

    def segment(self, offset: int, n_queries: int, n_keys: int) -> AttentionMask:
        """The mask of one segment of a packed batch: causality, window and ALiBi as for a lone sequence."""
        return AttentionMask(causal=self.causal, n_queries=n_queries, n_keys=n_keys, q_offset=offset,
                             window=self.window, alibi=self.alibi)

    def real_queries(self) -> torch.Tensor | None:
        """[B, T] bool, False for padding queries (None: all are real)."""
        if self.query_valid is not None or self.key_valid is None:
            return self.query_valid
        return self.key_valid[:, self.q_offset : self.q_offset + self.n_queries]

    def block(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor | None:
        """Additive float32 bias for queries [q0, q1) and keys [k0, k1): [B or 1, H or 1, q1-q0, k1-k0]."""
        offset = self.q_offset
        if isinstance(offset, torch.Tensor):
            offset = offset[:, None, None]
        qi = torch.arange(q0, q1, device=device)[None, :, None] + offset  # [B or 1, Tq, 1]
        kj = torch.arange(k0, k1, device=device)[None, None, :]
        allowed = None
        if self.causal:
            allowed = kj <= qi
            if self.prefix_len is not None:
                in_prefix = self.key_pos[:, None, k0:k1] < self.prefix_len[:, None, None]
                allowed = allowed | in_prefix
        if self.window is not None:
            dist = qi - kj
            near = ((dist >= 0) if self.causal else (dist > -self.window)) & (dist < self.window)
            allowed = near if allowed is None else allowed & near
        if self.key_valid is not None:
            valid = self.key_valid[:, None, k0:k1]
            allowed = valid if allowed is None else allowed & valid
        if self.document_ids is not None:
            docs = self.document_ids
            same = docs[:, q0:q1, None] == docs[:, None, k0:k1]
            allowed = same if allowed is None else allowed & same
        bias = None
        if allowed is not None:
            zero = torch.zeros((), device=device)
            bias = torch.where(allowed, zero, torch.full((), MASKED, device=device))[:, None]
        if self.alibi is not None:
            dist = (qi - kj).abs().float()
            alibi = -self.alibi.to(device).float()[None, :, None, None] * dist[:, None]
            bias = alibi if bias is None else bias + alibi
        return bias

    def block_is_hidden(self, q0: int, q1: int, k0: int, k1: int) -> bool:
        """True when no query in [q0, q1) may see any key in [k0, k1), for every sequence in the batch."""
        offset = self.q_offset
        lo, hi = (int(offset.min()), int(offset.max())) if isinstance(offset, torch.Tensor) else (offset, offset)
        first_q, last_q = q0 + lo, q1 - 1 + hi
        if self.causal and self.prefix_len is None and k0 > last_q:
            return True
        if self.window is not None and first_q - (k1 - 1) >= self.window:
            return True
        return False

    def dense(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        # Every layer asks for the same bias: build it once per (device, dtype).
        key = (str(device), dtype)
        cached = self.__dict__.setdefault("_dense", {})
        if key not in cached:
            bias = self.block(0, self.n_queries, 0, self.n_keys, device)
            # fp16 cannot hold -1e30
            cached[key] = None if bias is None else bias.clamp_min(torch.finfo(dtype).min).to(dtype)
        return cached[key]

    def sdpa_arguments(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for F.scaled_dot_product_attention, using its fused causal path when it can."""
        if self.is_trivial:
            if not self.causal or self.n_queries == 1:
                return None, False
            if self.n_queries == self.n_keys:
                return None, True
        return self.dense(device, dtype), False
