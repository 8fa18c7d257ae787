"""The simplest KV cache: per-layer tensors that grow by concatenation along the sequence axis.

Layers call `update(layer, *tensors)` with what they want cached (K and V for standard attention; the
latent and the rotary key for MLA) and get back everything cached so far. The inference engine adds
preallocated and paged caches with the same method.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.key_valid: torch.Tensor | None = None  # [B, Tk] bool, False for padding
        self.key_pos: torch.Tensor | None = None  # [B, Tk] positions of the cached keys
        self.length = 0

    def update(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        old = self.layers.get(layer)
        new = tensors if old is None else tuple(torch.cat((a, b), dim=-2) for a, b in zip(old, tensors))
        self.layers[layer] = new
        return new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.layers.values() for t in ts)
