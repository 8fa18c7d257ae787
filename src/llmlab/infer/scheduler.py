"""Continuous batching (Orca, Yu et al. 2022; vLLM, Kwon et al. 2023) over paged KV memory.

Every engine step the scheduler picks which sequences run and how many of their tokens: running sequences
first (a decode is one token; a prompt cut by chunked prefill continues), then waiting ones in arrival order,
while a token budget and a sequence limit allow. A long prompt is prefilled a chunk per step, so decodes of
other requests keep flowing. When the pool runs out of blocks, the most recently arrived running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later from its
prompt and the tokens it already produced (recompute preemption; nothing it produced is lost).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache import BlockManager, OutOfBlocks, PagedKVCache


@dataclass(eq=False)
class Sequence:
    """One sample being generated: prompt + output tokens and where their KV lives."""

    seq_id: int
    arrival: int  # scheduling priority: lower arrived earlier
    token_ids: list[int]
    num_prompt: int
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix hashes of the full, computed blocks
    num_computed: int = 0  # tokens whose K/V are in the cache
    preemptions: int = 0
    reuse_prefix: bool = True  # may take cached prefix blocks

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence feeds this step
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, cache: PagedKVCache, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 512) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.cache, self.blocks = cache, cache.blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cached_tokens = 0  # prompt tokens whose K/V came from the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (it already holds its blocks)."""
        self.running.append(seq)
        self.running.sort(key=lambda s: (s.arrival, s.seq_id))

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        self.blocks.free_all(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: list[Sequence] = []
        num_new: list[int] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self._reserve(seq, n):
                victim = self.running[-1]  # the latest arrival gives way
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chosen.append(seq)
                num_new.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.num_computed == 0 and seq.reuse_prefix:
                self._reuse_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, n):
                self.release(seq)  # drop any prefix blocks taken; it waits for memory
                break
            self.waiting.popleft()
            self.running.append(seq)
            chosen.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(chosen, num_new, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Blocks for seq's next n tokens, with copy-on-write of a shared block it is about to write into.
        False (and nothing half-done that leaks) when the pool is exhausted."""
        bs = self.blocks.block_size
        need = -(-(seq.num_computed + n) // bs) - len(seq.block_table)
        if need > self.blocks.num_free:
            return False
        first = seq.num_computed // bs
        if seq.num_computed % bs and first < len(seq.block_table) and self.blocks.ref[seq.block_table[first]] > 1:
            if need + 1 > self.blocks.num_free:
                return False
            old = seq.block_table[first]
            new = self.blocks.allocate()
            self.cache.copy_block(old, new)
            self.blocks.free(old)
            seq.block_table[first] = new
        try:
            for _ in range(need):
                seq.block_table.append(self.blocks.allocate())
        except OutOfBlocks:  # cannot happen after the check above; kept so a bug cannot leak blocks
            return False
        return True

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Prefix caching: take the blocks already computed for the same leading tokens. At least one token
        is always left to compute, since its logits are needed."""
        bs = self.blocks.block_size
        parent = None
        for b in range((len(seq.token_ids) - 1) // bs):
            h = BlockManager.chain_hash(parent, seq.token_ids[b * bs:(b + 1) * bs])
            block = self.blocks.lookup(h)
            if block is None:
                break
            self.blocks.incref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * bs
        self.prefix_cached_tokens += seq.num_computed

    def computed(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq are in the cache: publish the blocks that became full."""
        seq.num_computed += n
        bs = self.blocks.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            b = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = BlockManager.chain_hash(parent, seq.token_ids[b * bs:(b + 1) * bs])
            self.blocks.register(seq.block_table[b], h)
            seq.block_hashes.append(h)

    def compact(self) -> None:
        """For the contiguous layout (one block of max_seq_len per sequence): move sequences into the lowest
        free blocks, so the running ones hold blocks 0..n-1 and a decode step reads its keys as a view of
        the pool instead of gathering them. One block copy per hole, at most one hole per finished request."""
        n = len(self.running)
        taken = {s.block_table[0] for s in self.running if s.block_table}
        holes = [b for b in range(n) if b not in taken]
        for seq in self.running:
            if not holes:
                break
            if seq.block_table and seq.block_table[0] >= n and self.blocks.ref[seq.block_table[0]] == 1:
                dst = holes.pop()
                self.blocks.take(dst)
                self.cache.copy_block(seq.block_table[0], dst)
                self.blocks.free(seq.block_table[0])
                seq.block_table[0] = dst

    def fork(self, parent: Sequence, seq_id: int) -> Sequence:
        """A copy of parent sharing all its blocks (n > 1 samples); writes copy the shared tail block."""
        for b in parent.block_table:
            self.blocks.incref(b)
        child = Sequence(seq_id, parent.arrival, list(parent.token_ids), parent.num_prompt, list(parent.block_table),
                         list(parent.block_hashes), parent.num_computed)
        self.add_running(child)
        return child
