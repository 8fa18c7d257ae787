"""KV caches for the engine, all behind the interface the model already calls (`llmlab.model.KVCache`):
`length` (tokens cached), `key_valid`, `key_pos` and `update(layer, *tensors) -> everything cached so far`.

- StaticCache: one preallocated [B, h, max_len, d] buffer per cached tensor; a step writes in place and
  attends to a view of the filled part. No reallocation, fixed storage (what torch.compile wants).
- Paged (vLLM, Kwon et al. 2023): the KV memory is a pool of fixed-size blocks; each sequence owns a block
  table. BlockManager hands out blocks with reference counts, so sequences can share blocks: prefix caching
  (a full block is found again by the hash of its tokens and all tokens before it) and forking (n samples,
  beams) share blocks until one writes, which copies first (copy on write).
  PagedKVCache holds the pool; `batch_view(...)` returns the per-step object the model sees: it writes new
  keys into their slots and gathers each sequence's keys, right-aligned and left-padded, so the model's
  left-padding mask (causal with one query offset, padding keys invalid) is exactly right for sequences
  of different lengths in one batch.

Layers cache whatever they pass to update(): K and V for standard attention, the latent and the shared
rotary key for MLA, so MLA's cache is its small latent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


class StaticCache:
    def __init__(self, batch_size: int, max_len: int, *, device=None, dtype: torch.dtype | None = None) -> None:
        self.batch_size, self.max_len, self.device, self.dtype = batch_size, max_len, device, dtype
        self.buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.length = 0
        self.key_valid: torch.Tensor | None = None
        self.key_pos: torch.Tensor | None = None

    def update(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = tensors[0].shape[-2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"StaticCache holds {self.max_len} tokens; this step would fill {end}. "
                             "Create the cache with a larger max_len")
        bufs = self.buffers.get(layer)
        if bufs is None:
            bufs = tuple(t.new_zeros(*t.shape[:-2], self.max_len, t.shape[-1], dtype=self.dtype or t.dtype)
                         for t in tensors)
            self.buffers[layer] = bufs
        for buf, t in zip(bufs, tensors):
            buf[..., self.length:end, :] = t
        return tuple(buf[..., :end, :] for buf in bufs)

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (speculative decoding rolls back this way)."""
        self.length = min(self.length, length)
        if self.key_valid is not None:
            self.key_valid = self.key_valid[:, :length]
        if self.key_pos is not None:
            self.key_pos = self.key_pos[:, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.buffers.values() for t in ts)


class OutOfBlocks(RuntimeError):
    """The pool has no free block; the scheduler answers by preempting a sequence."""


class BlockManager:
    """Reference-counted blocks. A block with count 0 that holds a hashed full prefix stays findable (LRU)
    until its memory is needed; free() never loses a cached prefix early."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.hash_of: dict[int, int] = {}  # block -> prefix hash
        self.block_of: dict[int, int] = {}  # prefix hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with count 0, oldest first
        self.used = self.peak_in_use = 0  # blocks with count > 0, now and at most

    def _take(self, block: int) -> None:
        self.ref[block] = 1
        self.used += 1
        self.peak_in_use = max(self.peak_in_use, self.used)

    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def allocate(self) -> int:
        if self.free_ids:
            block = self.free_ids.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.block_of[self.hash_of.pop(block)]
        else:
            raise OutOfBlocks("no free KV block")
        self._take(block)
        return block

    def incref(self, block: int) -> None:
        if self.ref[block] == 0:
            self.evictable.pop(block)
            self._take(block)
        else:
            self.ref[block] += 1

    def free(self, block: int) -> None:
        if self.ref[block] <= 0:
            raise RuntimeError(f"block {block} freed more often than it was taken")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.used -= 1
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free_ids.append(block)

    def free_all(self, blocks: Sequence[int]) -> None:
        for b in reversed(blocks):  # the tail first: it is the least likely to be shared again
            self.free(b)

    # ---------------------------------------------------------------- prefix caching
    @staticmethod
    def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
        """A block's identity is its tokens and everything before them (the parent block's hash)."""
        return hash((parent, tuple(tokens)))

    def lookup(self, h: int) -> int | None:
        return self.block_of.get(h) if self.prefix_caching else None

    def register(self, block: int, h: int) -> None:
        """Publish a full block under its prefix hash (first writer wins; duplicates stay private)."""
        if self.prefix_caching and h not in self.block_of and block not in self.hash_of:
            self.block_of[h] = block
            self.hash_of[block] = h

    def in_use(self) -> int:
        return self.used


class PagedKVCache:
    """The block pool: for every layer and cached tensor, storage [num_blocks · block_size, h, d], created at
    the first write (its shape comes from what the layer caches). Slot s of block b is b · block_size + s."""

    def __init__(self, num_blocks: int, block_size: int, *, device=None, dtype: torch.dtype | None = None,
                 prefix_caching: bool = True) -> None:
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        self.block_size, self.device, self.dtype = block_size, device, dtype
        self.pools: dict[int, tuple[torch.Tensor, ...]] = {}

    def pool(self, layer: int, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        pools = self.pools.get(layer)
        if pools is None:
            n = self.blocks.num_blocks * self.block_size
            pools = tuple(torch.zeros(n, t.shape[1], t.shape[-1], device=t.device, dtype=self.dtype or t.dtype)
                          for t in tensors)
            self.pools[layer] = pools
        return pools

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for pools in self.pools.values():
            for p in pools:
                p[dst * bs:(dst + 1) * bs] = p[src * bs:(src + 1) * bs]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for ps in self.pools.values() for p in ps)

    def slots(self, table: Sequence[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    def batch_view(self, tables: Sequence[Sequence[int]], cached: Sequence[int], new: Sequence[int]) -> PagedBatch:
        """The cache object for one forward over len(tables) sequences: sequence i has cached[i] tokens in
        its blocks and feeds new[i] tokens (left-padded to max(new)). Its blocks must already cover
        cached[i] + new[i] tokens."""
        B, T = len(tables), max(new)
        K = max(c + n for c, n in zip(cached, new))
        dev = self.device
        gather = torch.zeros(B, K, dtype=torch.long)
        valid = torch.zeros(B, K, dtype=torch.bool)
        write_rows, write_cols, write_slots = [], [], []
        for i, (table, c, n) in enumerate(zip(tables, cached, new)):
            total = c + n
            gather[i, K - total:] = torch.tensor(self.slots(table, 0, total))
            valid[i, K - total:] = True
            write_rows += [i] * n
            write_cols += range(T - n, T)
            write_slots += self.slots(table, c, total)
        uniform = bool(valid.all())
        return PagedBatch(
            self, gather.to(dev), None if uniform else valid[:, :K - T].to(dev),
            torch.tensor(write_rows, device=dev), torch.tensor(write_cols, device=dev),
            torch.tensor(write_slots, device=dev), K - T, None if uniform else valid[:, K - T:].to(dev),
        )


class PagedBatch:
    """What the model sees for one step over paged memory (see PagedKVCache.batch_view)."""

    def __init__(self, cache: PagedKVCache, gather, past_valid, write_rows, write_cols, write_slots, past: int,
                 new_valid):
        self.cache, self.gather = cache, gather
        self.write_rows, self.write_cols, self.write_slots = write_rows, write_cols, write_slots
        self.length = past  # the model offsets its queries by this many keys
        self.key_valid = past_valid
        self.key_pos = torch.zeros(gather.shape[0], past, dtype=torch.long, device=gather.device)
        self.new_valid = new_valid  # [B, T] attention_mask for the new tokens (None: no padding)

    def update(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for pool, t in zip(self.cache.pool(layer, tensors), tensors):
            # t [B, h, T, d] -> the real tokens' rows go to their slots, then every sequence's keys come back
            pool[self.write_slots] = t[self.write_rows, :, self.write_cols].to(pool.dtype)
            out.append(pool[self.gather].transpose(1, 2).to(t.dtype))
        return tuple(out)
