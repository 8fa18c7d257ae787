"""tokenize_to_shards: ids equal tokenizer.encode plus EOS, the smallest dtype, parallel output equal to serial,
reuse of finished shards, and atomic writes."""

import json
import os
import warnings

import numpy as np
import pytest

from llmlab.data import TokenShards, shards as shards_module, tokenize_to_shards
from llmlab.tokenizer import train

DOCS = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs. " * (1 + i % 4) for i in range(40)]
DOCS += ["机器学习是人工智能的一个分支。", "x", "literal <|endoftext|> in user text"]


@pytest.fixture(scope="module")
def tok():
    return train(DOCS, vocab_size=300, special_tokens=["<|endoftext|>"])


def test_round_trip_with_eos_across_shards(tok, tmp_path):
    shards = tokenize_to_shards(DOCS, tok, tmp_path / "s", shard_tokens=97, progress=False)
    eos = tok.token_to_id("<|endoftext|>")
    expected = [tok.encode(d, parse_special=False) + [eos] for d in DOCS]
    assert shards.n_documents == len(DOCS) and len(shards) == sum(map(len, expected))
    for i, ids in enumerate(expected):
        assert shards.document(i).tolist() == ids
    stream = [t for ids in expected for t in ids]
    assert shards.tokens(0, len(shards)).tolist() == stream
    assert shards.tokens(90, 20).tolist() == stream[90:110]  # crosses the first shard boundary
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert len(index["shards"]) == -(-len(stream) // 97) and all(s["tokens"] == 97 for s in index["shards"][:-1])
    assert index["doc_offsets"][-1] == len(stream) and index["eos_id"] == eos
    # the special-token text inside a document stays text: only the appended EOS is the special id
    assert shards.document(-1).tolist().count(eos) == 1
    with pytest.raises(IndexError):
        shards.tokens(len(shards) - 1, 2)
    assert TokenShards(tmp_path / "s").tokens(0, 50).tolist() == stream[:50]


def test_eos_choice_and_missing_eos_warns(tok, tmp_path):
    no_specials = train(DOCS, vocab_size=280)
    with pytest.warns(UserWarning, match="no EOS token"):
        shards = tokenize_to_shards(DOCS[:3], no_specials, tmp_path / "a", progress=False)
    assert shards.eos_id is None and shards.document(0).tolist() == no_specials.encode(DOCS[0])
    assert tokenize_to_shards(DOCS[:3], tok, tmp_path / "b", append_eos=False, progress=False).eos_id is None


class WideTokenizer:
    """A stand-in with a vocabulary beyond uint16: one token per character, ids from 66000."""
    vocab_size, eos_token = 70_000, "<eos>"

    def token_to_id(self, token):
        return 69_999 if token == "<eos>" else None

    def encode_batch(self, texts, **_):
        return [[66_000 + ord(c) % 3000 for c in t] for t in texts]

    def to_hf_dict(self):
        return {"wide": True}


def test_dtype_is_the_smallest_that_fits(tok, tmp_path):
    assert tokenize_to_shards(DOCS, tok, tmp_path / "small", progress=False).dtype == np.uint16
    wide = tokenize_to_shards(["abc", "de"], WideTokenizer(), tmp_path / "wide", progress=False)
    assert wide.dtype == np.uint32
    assert wide.tokens(0, len(wide)).tolist() == [66097, 66098, 66099, 69999, 66100, 66101, 69999]
    assert os.path.getsize(tmp_path / "wide" / "shard_00000.bin") == 7 * 4


def test_parallel_equals_serial(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "CHUNK_CHARS", 200)  # many chunks, so both workers get several
    serial = tokenize_to_shards(DOCS, tok, tmp_path / "serial", workers=1, progress=False)
    parallel = tokenize_to_shards(DOCS, tok, tmp_path / "parallel", workers=2, progress=False)
    assert np.array_equal(serial.tokens(0, len(serial)), parallel.tokens(0, len(parallel)))
    assert np.array_equal(serial.offsets, parallel.offsets)
    assert serial.fingerprint == parallel.fingerprint  # workers are not part of what the shards hold


def test_reuse_instead_of_retokenizing(tok, tmp_path, monkeypatch):
    first = tokenize_to_shards(DOCS, tok, tmp_path / "s", progress=False)
    assert not first.reused
    index = tmp_path / "s" / "index.json"
    stamp = index.stat().st_mtime_ns
    calls = []
    real = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tokenize_to_shards(list(DOCS), tok, tmp_path / "s", progress=False)
    assert again.reused and calls == [] and index.stat().st_mtime_ns == stamp
    changed = tokenize_to_shards(DOCS[:-1], tok, tmp_path / "s", progress=False)  # other documents: rebuilt
    assert not changed.reused and calls and changed.n_documents == len(DOCS) - 1
    assert changed.fingerprint != first.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the old shards and temp dirs are gone


def test_write_is_atomic(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "CHUNK_CHARS", 200)
    calls = []

    def failing(texts, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-write")
        return type(tok).encode_batch(tok, texts, **kwargs)

    monkeypatch.setattr(tok, "encode_batch", failing)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        tokenize_to_shards(DOCS, tok, tmp_path / "s", workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # no index, no half-written shard, no temp directory
    monkeypatch.undo()
    old = tokenize_to_shards(DOCS[:5], tok, tmp_path / "s", progress=False)
    monkeypatch.setattr(shards_module, "CHUNK_CHARS", 200)
    calls.clear()
    monkeypatch.setattr(tok, "encode_batch", failing)
    with pytest.raises(RuntimeError):
        tokenize_to_shards(DOCS, tok, tmp_path / "s", workers=1, progress=False)
    kept = TokenShards(tmp_path / "s")  # a failed rebuild leaves the previous shards whole
    assert kept.fingerprint == old.fingerprint and [p.name for p in tmp_path.iterdir()] == ["s"]


def test_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json.*tokenize_to_shards"):
        TokenShards(tmp_path)
    with pytest.raises(TypeError, match="list of document strings"):
        tokenize_to_shards("one string", tok, tmp_path / "x")
    with pytest.raises(ValueError, match="no documents"):
        tokenize_to_shards([], tok, tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a token-shard directory"):
        tokenize_to_shards(DOCS, tok, tmp_path / "busy", progress=False)
    shards = tokenize_to_shards(DOCS, tok, tmp_path / "s", progress=False)
    with open(tmp_path / "s" / "shard_00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="wrong size.*re-create"):
        TokenShards(tmp_path / "s")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = tokenize_to_shards(DOCS, tok, tmp_path / "s", progress=False)  # damaged: rebuilt, not reused
    assert not rebuilt.reused and len(rebuilt) == len(shards)
