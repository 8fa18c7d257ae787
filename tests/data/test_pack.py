"""PackedLoader: rows cover the token stream exactly, a new permutation each epoch, exact resume; with
mask_documents a packed batch gives the nano model the loss its documents give alone."""

import json

import numpy as np
import pytest
import torch

from llmlab.data import PackedLoader, tokenize_to_shards, validation_batches
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train

DOCS = [f"Story {i}. " + "A fox ran far, then a dog sat still. " * (i % 5 + 1) for i in range(30)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tok = train(DOCS, vocab_size=300, special_tokens=["<|endoftext|>"])
    return tokenize_to_shards(DOCS, tok, tmp_path_factory.mktemp("pack") / "shards", progress=False)


def epoch_batches(loader):
    it = iter(loader)
    return [next(it) for _ in range(loader.batches_in_epoch())]


def test_rows_cover_the_stream_exactly(shards):
    T, B = 16, 4
    loader = PackedLoader(shards, seq_len=T, batch_size=B, shuffle=False)
    n_rows = len(shards) // T
    assert loader.rows_per_epoch == n_rows and loader.tokens_per_batch == B * T
    batches = epoch_batches(loader)
    assert len(batches) == n_rows // B
    ids = torch.cat([b["input_ids"] for b in batches]).flatten()
    assert ids.tolist() == shards.tokens(0, len(batches) * B * T).tolist()
    for b in batches:
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (B, T)
        assert torch.equal(b["labels"], b["input_ids"])  # not shifted: the model shifts
    shuffled = epoch_batches(PackedLoader(shards, seq_len=T, batch_size=1))  # batch 1: every row
    rows = sorted(tuple(b["input_ids"][0].tolist()) for b in shuffled)
    assert rows == sorted(tuple(shards.tokens(r * T, T).tolist()) for r in range(n_rows))


def test_a_new_permutation_each_epoch(shards):
    def firsts(seed, epochs=3):
        loader = PackedLoader(shards, seq_len=16, batch_size=2, seed=seed)
        it = iter(loader)
        out = []
        for _ in range(epochs):
            out.append([next(it)["input_ids"][:, 0].tolist() for _ in range(loader.batches_in_epoch())])
        return out

    a = firsts(0)
    assert a[0] != a[1] != a[2] and a == firsts(0) and a != firsts(1)


def test_exact_resume_across_an_epoch_boundary(shards):
    def make():
        return PackedLoader(shards, seq_len=32, batch_size=3, seed=7, mask_documents=True)

    per_epoch = make().batches_in_epoch()
    reference = iter(make())
    expected = [next(reference) for _ in range(per_epoch + 6)]
    run = make()
    it = iter(run)
    k = per_epoch - 2
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(run.state_dict()))  # a state survives JSON (checkpoints store it so)
    resumed = make()
    resumed.load_state_dict(state)
    for want, got in zip(expected[k:], iter(resumed)):
        assert all(torch.equal(want[key], got[key]) for key in want)
    assert resumed.epoch == 1
    other = PackedLoader(shards, seq_len=32, batch_size=4, seed=7)
    with pytest.raises(ValueError, match="batch_size: saved 3, here 4"):
        other.load_state_dict(state)


def test_document_ids_and_boundary_labels(shards):
    T, B = 48, 4
    batch = next(iter(PackedLoader(shards, seq_len=T, batch_size=B, shuffle=False, mask_documents=True)))
    boundaries = 0
    for r in range(B):
        start = r * T
        doc_of = shards.document_index(np.arange(start, start + T))
        assert batch["document_ids"][r].tolist() == (doc_of - doc_of[0]).tolist()
        firsts = {int(shards.offsets[d]) - start for d in set(doc_of.tolist())} - {0}
        firsts = {p for p in firsts if 0 < p < T}
        labels, ids = batch["labels"][r], batch["input_ids"][r]
        assert all(labels[p] == -100 for p in firsts)  # no document predicts the next one's first token
        assert all(labels[p] == ids[p] for p in range(T) if p not in firsts)
        boundaries += len(firsts)
    assert boundaries >= 2


def test_too_little_data(shards):
    with pytest.raises(ValueError, match="fewer than batch_size"):
        PackedLoader(shards, seq_len=len(shards) // 2, batch_size=3)


def test_validation_batches_score_every_token_once(shards):
    T, B = 40, 3
    batches = validation_batches(shards, seq_len=T, batch_size=B)
    n = len(shards)
    rows = -(-n // T)
    assert sum(len(b["input_ids"]) for b in batches) == rows and len(batches[-1]["input_ids"]) == (rows % B or B)
    ids = torch.cat([b["input_ids"] for b in batches]).flatten()
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    assert ids[:n].tolist() == shards.tokens(0, n).tolist()
    assert labels[:n].tolist() == ids[:n].tolist() and (labels[n:] == -100).all()
    assert validation_batches(shards, seq_len=T, batch_size=B)[0]["input_ids"].equal(batches[0]["input_ids"])
    masked = validation_batches(shards, seq_len=T, batch_size=B, mask_documents=True)
    last = masked[-1]["document_ids"][-1]
    pad = n - (rows - 1) * T
    assert (last[pad:] == last[pad - 1] + 1).all()  # padding is a document of its own


def test_packed_loss_equals_documents_run_separately(shards):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano", vocab_size=300)).eval()
    batch = next(iter(PackedLoader(shards, seq_len=64, batch_size=4, seed=1, mask_documents=True)))
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"]).loss
        total, count = 0.0, 0
        for ids, docs in zip(batch["input_ids"], batch["document_ids"]):
            for d in docs.unique():
                piece = ids[docs == d][None]  # a document (or the part of it in this row), alone
                if piece.shape[1] > 1:
                    total += model(piece, labels=piece).loss.item() * (piece.shape[1] - 1)
                    count += piece.shape[1] - 1
    assert count > 0 and batch["document_ids"].max() > 0
    assert packed.item() == pytest.approx(total / count, abs=1e-5)
