"""KV caches against no cache at all: the model's logits at every step are the same in fp32 whether keys
come from a full forward, the growing KVCache, the preallocated StaticCache or the paged pool (any block
size, blocks scattered in the pool, sequences of different lengths in one batch). Plus the block manager's
bookkeeping: reference counts, prefix hashes, eviction, copy on write."""

import random

import pytest
import torch

from llmlab.infer.cache import BlockManager, OutOfBlocks, PagedKVCache, StaticCache
from llmlab.model import KVCache, ModelConfig, Transformer

TOL = dict(atol=2e-5, rtol=2e-5)
VARIANTS = {
    "gqa": dict(),
    "mla": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
    "window": dict(sliding_window=5),
    "alibi": dict(position="alibi"),
    "learned": dict(position="learned", norm="layernorm", activation="gelu", qkv_bias=True),
    "moe": dict(n_experts=4, moe_top_k=2),
    "flash": dict(attn_backend="flash", flash_block_size=4, sliding_window=7),
    "math": dict(attn_backend="math"),
}


def model_for(variant: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", max_seq_len=64, **VARIANTS[variant])).eval()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def stepwise(model, cache, ids: list[int], prefill: int) -> torch.Tensor:
    """Logits for every position: the first `prefill` tokens in one forward, then one token per step."""
    rows = []
    with torch.no_grad():
        rows.append(model(torch.tensor([ids[:prefill]]), cache=cache).logits[0])
        for t in ids[prefill:]:
            rows.append(model(torch.tensor([[t]]), cache=cache).logits[0])
    return torch.cat(rows)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_and_growing_caches_equal_no_cache(variant):
    model = model_for(variant)
    rng = random.Random(1)
    ids = [rng.randrange(model.cfg.vocab_size) for _ in range(20)]
    ref = full_logits(model, ids)
    torch.testing.assert_close(stepwise(model, KVCache(), ids, 7), ref, **TOL)
    static = StaticCache(1, 32)
    torch.testing.assert_close(stepwise(model, static, ids, 7), ref, **TOL)
    assert static.length == 20
    with pytest.raises(ValueError, match="holds 10 tokens"):
        stepwise(model, StaticCache(1, 10), ids, 7)


def paged_logits(model, seqs: list[list[int]], block_size: int, chunks: list[list[int]], seed: int,
                 packed: bool = False) -> list[torch.Tensor]:
    """Run several sequences together through the paged pool, feeding chunk sizes chunks[i][step] per step
    (0 = the sequence sits this step out), with block ids handed out in a shuffled order so every table is
    non-contiguous; as rows of a padded batch, or (packed) back to back in one row. Returns each sequence's
    logits for all its positions."""
    n_blocks = sum(-(-len(s) // block_size) for s in seqs) + 3
    cache = PagedKVCache(n_blocks, block_size)
    order = list(range(n_blocks))
    random.Random(seed).shuffle(order)
    cache.blocks.free_ids = order
    tables = [[] for _ in seqs]
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    for step in range(max(map(len, chunks))):
        active = [i for i in range(len(seqs)) if step < len(chunks[i]) and chunks[i][step] > 0]
        if not active:
            continue
        for i in active:
            while len(tables[i]) * block_size < done[i] + chunks[i][step]:
                tables[i].append(cache.blocks.allocate())
        new = [chunks[i][step] for i in active]
        pieces = [seqs[i][done[i]:done[i] + n] for i, n in zip(active, new)]
        args = [tables[i] for i in active], [done[i] for i in active], new
        if packed:
            with torch.no_grad():
                logits = model(torch.tensor([sum(pieces, [])]), cache=cache.packed_view(*args)).logits[0]
            rows = logits.split(new)
        else:
            ids = torch.zeros(len(active), max(new), dtype=torch.long)
            for r, piece in enumerate(pieces):
                ids[r, :len(piece)] = torch.tensor(piece)
            with torch.no_grad():
                logits = model(ids, cache=cache.batch_view(*args)).logits
            rows = [logits[r, :n] for r, n in enumerate(new)]
        for r, i in enumerate(active):
            out[i].append(rows[r])
            done[i] += new[r]
    assert any(t != sorted(t) for t in tables if len(t) > 1), "block tables should be scattered"
    return [torch.cat(o) for o in out]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_paged_cache_equals_no_cache(variant, block_size, packed):
    model = model_for(variant)
    rng = random.Random(2)
    seqs = [[rng.randrange(model.cfg.vocab_size) for _ in range(n)] for n in (19, 6, 25)]
    # different prefill chunks, a sequence that joins late (0 = absent), decode steps of one token
    chunks = [[7, 5, 1, 1, 1, 1, 1, 1, 1], [0, 0, 3, 1, 1, 1], [4, 9, 1, 6, 1, 1, 1, 1, 1]]
    for s, c in zip(seqs, chunks):
        assert sum(c) == len(s)
    outs = paged_logits(model, seqs, block_size, chunks, seed=block_size, packed=packed)
    for s, o in zip(seqs, outs):
        torch.testing.assert_close(o, full_logits(model, s), **TOL)


@pytest.mark.parametrize("block_size", [1, 4])
def test_paged_cache_rows_alike(block_size):
    """Rows with the same lengths take the no-mask path (scalar offset): still exact."""
    model = model_for("gqa")
    rng = random.Random(4)
    seqs = [[rng.randrange(model.cfg.vocab_size) for _ in range(12)] for _ in range(3)]
    outs = paged_logits(model, seqs, block_size, [[5, 4, 1, 1, 1]] * 3, seed=9)
    for s, o in zip(seqs, outs):
        torch.testing.assert_close(o, full_logits(model, s), **TOL)


@pytest.mark.parametrize("variant", ["gqa", "mla"])
def test_a_lone_sequence_in_consecutive_blocks_reads_its_keys_in_place(variant):
    """Blocks 3, 4, 5, ... in order: the keys are a view of the pool (no gather), and exact."""
    model = model_for(variant)
    seq = [random.Random(6).randrange(model.cfg.vocab_size) for _ in range(14)]
    cache = PagedKVCache(12, 4)
    table, done, out = [3, 4, 5, 6], 0, []
    for n in (6, 1, 1, 5, 1):
        view = cache.batch_view([table], [done], [n])
        assert view.run_start == (3 if done + n > 4 else None)
        with torch.no_grad():
            out.append(model(torch.tensor([seq[done:done + n]]), cache=view).logits[0])
        done += n
    torch.testing.assert_close(torch.cat(out), full_logits(model, seq), **TOL)


def test_mla_pool_holds_the_latent_only():
    model = model_for("mla")
    cache = PagedKVCache(4, 4)
    view = cache.batch_view([[0, 1]], [0], [6])
    with torch.no_grad():
        model(torch.arange(6)[None], cache=view)
    shapes = {tuple(p.shape) for ps in cache.pools.values() for p in ps}
    assert shapes == {(1, 16, 16), (1, 16, 8)}  # [one shared head, slots, kv_lora_rank | qk_rope_head_dim]


# ------------------------------------------------------------------------------------------ block manager
def test_block_manager_counts_and_prefix_cache():
    bm = BlockManager(3, 4)
    a, b = bm.allocate(), bm.allocate()
    assert (a, b) == (0, 1) and bm.num_free == 1 and bm.in_use() == 2
    h = BlockManager.chain_hash(None, [1, 2, 3, 4])
    bm.register(a, h)
    bm.incref(a)
    bm.free(a)
    assert bm.ref[a] == 1
    bm.free(a)  # count 0 but cached: still findable, counted as free
    assert bm.lookup(h) == a and bm.num_free == 2
    bm.incref(a)  # reused by a later sequence
    assert bm.ref[a] == 1 and bm.num_free == 1
    bm.free(a)
    c = bm.allocate()  # the plain free block goes first
    assert c == 2 and bm.lookup(h) == a
    d = bm.allocate()  # then the cached one is evicted
    assert d == a and bm.lookup(h) is None
    with pytest.raises(OutOfBlocks):
        bm.allocate()
    assert bm.in_use() == bm.peak_in_use == 3 and sum(r > 0 for r in bm.ref) == 3
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(a)
        bm.free(a)
    # the chain: the same tokens after a different prefix are a different block
    assert BlockManager.chain_hash(h, [5]) != BlockManager.chain_hash(None, [5])


def test_copy_block_copies_every_layer():
    cache = PagedKVCache(3, 2)
    view = cache.batch_view([[0]], [0], [2])
    model = model_for("gqa")
    with torch.no_grad():
        model(torch.tensor([[3, 4]]), cache=view)
    cache.copy_block(0, 2)
    for pools in cache.pools.values():
        for p in pools:
            torch.testing.assert_close(p[:, 4:6], p[:, 0:2])
