"""Byte-level BPE: parity with Hugging Face `tokenizers` (used here only as an oracle), round trips,
special tokens, the incremental trainer (byte-level and character-level) against a brute-force one, and error
messages."""

import json
from collections import Counter
from itertools import groupby
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.tokenizer import Tokenizer, load, train
from llmlab.tokenizer.bpe import BYTE_TOKENS, merge_pair
from llmlab.tokenizer.bytelevel import pretokenize

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog did not mind; it was a very lazy dog.",
    "Tokenizers split text into pieces. Byte pair encoding merges the most frequent pair of symbols, "
    "again and again, until the vocabulary is large enough. It's simple, and it's what GPT-2 uses.",
    "In the beginning the model knows only bytes. After training it knows words like the, and, token, "
    "model, training and encoding. We're testing that they'll round-trip: 12345, 3.14, 2024-01-01.",
    "def train(texts, vocab_size):\n    counts = Counter(texts)\n    return counts.most_common(10)\n",
    " ".join(["token", "tokens", "tokenizer", "tokenize", "the", "model", "lower", "newest", "widest"] * 20),
]
HELD_OUT = [
    "Hello, world! This sentence was not in the training text.",
    "I'd say they're   spaced\tout\n\nwith  tabs and newlines.  ",
    "机器学习是人工智能的一个分支。",
    "for i in range(10):\n    print(f\"{i:>3}\")  # comment\n",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇯🇵",
    "Ünïcödé café naïve façade — “quotes” … ½ ²",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRICKY = [
    "",
    " ",
    "   leading and trailing   ",
    "\x00\x01\x7f control \u0085 \u200b zero-width",
    "e\u0301 combining, ﬁ ligature, Å vs Å",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 😀 \U0010fffd",
    "right-to-left שלום مرحبا",
    "mixed 123abc456 'quotes' \"double\" 's 't 're",
    "\r\n windows\r\nlines",
    "<|endoftext|> looks special <|im_end|>",
]


@pytest.fixture(scope="module")
def tok():
    return train(CORPUS, vocab_size=400, special_tokens=SPECIALS, min_frequency=2)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return Path(tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_trained_vocab_layout(tok):
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    assert 256 + len(SPECIALS) + 80 < len(tok) <= 400  # min_frequency=2 stops it early on this small corpus
    assert len(tok.merges) == len(tok) - 256 - len(SPECIALS)


@pytest.mark.parametrize("text", HELD_OUT + TRICKY + [s + " <|im_end|>" for s in HELD_OUT[:2]])
def test_matches_hf_tokenizers(tok, saved, text):
    hf = tokenizers.Tokenizer.from_file(str(saved))
    ids = tok.encode(text)
    assert ids == hf.encode(text).ids
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text
    assert load(saved).encode(text) == ids
    assert load(saved.parent).encode(text) == ids  # a directory holding tokenizer.json


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.from_regex(r"[a-z .,'\n]{0,40}", fullmatch=True))
def test_matches_hf_tokenizers_on_arbitrary_text(tok, saved, text):
    hf = tokenizers.Tokenizer.from_file(str(saved))
    assert tok.encode(text) == hf.encode(text).ids


def test_ascii_split_equals_the_unicode_pattern_on_every_pair_of_ascii_characters():
    """ASCII text is split by a twin of GPT-2's pattern for the standard library's re (faster); over every
    two-character ASCII string, in every context that changes a piece, its pieces must be the regex module's."""
    import regex

    from llmlab.tokenizer.bytelevel import GPT2_PATTERN

    unicode_split = regex.compile(GPT2_PATTERN).findall
    chars = [chr(c) for c in range(128)]
    for a in chars:
        for b in chars:
            for text in (a + b, " " + a + b + "x", a + b + " ", "'" + a + b + "  y", "1" + a + b + "\n\n"):
                assert pretokenize(text) == unicode_split(text), repr(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60)
       | st.from_regex(r"[A-Za-z0-9 \t\n\r\x0b\x0c\x1c-\x1f'.,]{0,60}", fullmatch=True))
def test_matches_hf_tokenizers_on_ascii_text(tok, saved, text):
    hf = tokenizers.Tokenizer.from_file(str(saved))
    assert tok.encode(text) == hf.encode(text).ids


def test_saved_json_layout(saved):
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    assert data["pre_tokenizer"] == {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True
    }
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["normalizer"] is None and data["post_processor"] is None
    assert [t["content"] for t in data["added_tokens"]] == SPECIALS and all(t["special"] for t in data["added_tokens"])
    assert all(isinstance(m, list) and len(m) == 2 for m in data["model"]["merges"])


def test_loads_hf_trained_file(tmp_path):
    # The reverse direction: a file written by `tokenizers` itself (old "a b" merges are accepted too).
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    ours = load(path)
    for text in HELD_OUT:
        assert ours.encode(text) == hf.encode(text).ids
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    old = Tokenizer.from_hf_dict(data)
    assert old.encode(HELD_OUT[0]) == hf.encode(HELD_OUT[0]).ids


@pytest.mark.parametrize("text", TRICKY + HELD_OUT)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, parse_special=False)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_and_no_injection_property(tok, text):
    assert tok.decode(tok.encode(text)) == text
    plain = tok.encode(text + "<|im_end|>", parse_special=False)
    assert tok.decode(plain) == text + "<|im_end|>"
    assert not any(i < len(SPECIALS) for i in plain)  # user text never yields a special id


def test_special_tokens(tok):
    text = "a<|im_start|>user\nhi<|im_end|><|endoftext|>"
    ids = tok.encode(text)
    assert [i for i in ids if i < len(SPECIALS)] == [1, 2, 0]  # each special is one id, never split
    assert tok.decode(ids, skip_special_tokens=True) == "auser\nhi"
    plain = tok.encode(text, parse_special=False)
    assert not any(i < len(SPECIALS) for i in plain)  # user text cannot inject a special token
    assert tok.decode(plain) == text
    # Specials are not learned as merges: no token contains "<|".
    assert not any("<|" in t and t not in SPECIALS for t in tok.vocab)


# --- the incremental trainer against a brute-force one -------------------------------------------------


def brute_force_merges(words, tokens, k, vocab_size, min_frequency):
    """Recount every pair at every step; same id rules and tie-breaking as the real trainer. words: symbol-id
    tuples -> count; tokens: the initial vocab, whose first k (special tokens) no merge ever produces.
    Returns the merges as token pairs and the final vocab in id order."""
    tokens = list(tokens)
    merges = []
    while len(tokens) < vocab_size:
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        pair, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < min_frequency:
            break
        new_token = tokens[pair[0]] + tokens[pair[1]]
        if new_token in tokens[k:]:
            new = tokens.index(new_token, k)
        else:
            new = len(tokens)
            tokens.append(new_token)
        if pair not in merges:
            merges.append(pair)
        merged = Counter()
        for w, f in words.items():
            merged[tuple(merge_pair(list(w), *pair, new))] += f
        words = merged
    return [(tokens[a], tokens[b]) for a, b in merges], tokens


def reference_merges(texts, vocab_size, min_frequency, k):
    """Byte-level: GPT-2's pre-tokens as bytes, byte b having id k + b after k special tokens."""
    counts = Counter(w for t in texts for w in pretokenize(t))
    words = Counter({tuple(k + b for b in w.encode("utf-8")): f for w, f in counts.items()})
    tokens = [b""] * k + [bytes([b]) for b in range(256)]
    return brute_force_merges(words, tokens, k, vocab_size, min_frequency)[0]


def char_level_reference(texts, vocab_size, min_frequency, specials, limit_alphabet=None):
    """Character-level, as train_bpe documents it: `tokenizers`' Metaspace pre-tokens; special tokens, the 256
    byte tokens, then the alphabet in code point order -- the limit_alphabet most frequent characters, ties to
    the smaller code point; a dropped character cuts its word, so no pair spans it."""
    pre = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    counts = Counter(p for t in texts for p, _ in pre.pre_tokenize_str(t))
    chars = Counter()
    for w, f in counts.items():
        for c in w:
            chars[c] += f
    alphabet = sorted(sorted(chars, key=lambda c: (-chars[c], c))[:limit_alphabet])
    tokens = [*specials, *BYTE_TOKENS, *alphabet]
    ids = {t: i for i, t in enumerate(tokens) if i >= len(specials)}
    words = Counter()
    for w, f in counts.items():
        for kept, run in groupby(w, lambda c: c in ids):
            if kept:
                words[tuple(ids[c] for c in run)] += f
    return brute_force_merges(words, tokens, len(specials), vocab_size, min_frequency)


@pytest.mark.parametrize(
    "texts, vocab_size, min_frequency",
    [
        (CORPUS, 420, 2),
        (CORPUS, 330, 1),
        (["aaaaaaa aaaa aa a bababab abab " * 3, "abcabcabc bcabca cab"], 300, 1),  # overlapping pairs
    ],
)
def test_trainer_matches_brute_force(texts, vocab_size, min_frequency):
    tok = train(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["<s>"])
    from llmlab.tokenizer.bytelevel import symbols_to_bytes

    got = [(symbols_to_bytes(a), symbols_to_bytes(b)) for a, b in tok.merges]
    assert got == reference_merges(texts, vocab_size, min_frequency, k=1)


@pytest.mark.parametrize(
    "texts, vocab_size, min_frequency, limit_alphabet",
    [
        (CORPUS, 420, 2, None),
        (CORPUS, 400, 1, 21),  # "c" and "y" tie at the cut: "c" stays
        (CORPUS, 360, 1, 30),  # "'", "-", "0", "2" stay; "T", "v", "x" (as frequent) are dropped
        (["aaaaaaa aaaa aa a bababab abab " * 3, "abcabcabc bcabca cab", "机器学习是人工智能的一个分支。" * 2],
         300, 1, None),  # overlapping pairs; long pre-tokens without spaces
    ],
)
def test_char_level_trainer_matches_brute_force(texts, vocab_size, min_frequency, limit_alphabet):
    """The character-level trainer (Metaspace, byte fallback) against a full recount per merge."""
    tok = train(texts, vocab_size=vocab_size, min_frequency=min_frequency, byte_level=False, special_tokens=["<s>"],
                limit_alphabet=limit_alphabet)
    merges, vocab = char_level_reference(texts, vocab_size, min_frequency, ["<unk>", "<s>"], limit_alphabet)
    assert len(merges) > 20
    assert tok.merges == merges
    assert sorted(tok.vocab, key=tok.vocab.get) == vocab


# --- errors ---------------------------------------------------------------------------------------------


def test_bad_training_input():
    with pytest.raises(ValueError, match="empty corpus"):
        train([], vocab_size=300)
    with pytest.raises(ValueError, match="empty corpus"):
        train(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="too small"):
        train(CORPUS, vocab_size=257, special_tokens=["<a>", "<b>"])
    with pytest.raises(ValueError, match="distinct"):
        train(CORPUS, vocab_size=300, special_tokens=["<a>", "<a>"])
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        train(CORPUS, kind="sentencepiece", vocab_size=300)


def test_ids_out_of_range(tok):
    for bad in ([len(tok)], [-1], [1.5]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)


def test_malformed_files(tmp_path, saved):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(bad)
    bad.write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(ValueError, match="'model' object"):
        load(bad)

    data = json.loads(saved.read_text(encoding="utf-8"))
    data["model"]["merges"].append(["nope", "missing"])
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="missing from the vocab"):
        load(bad)

    from tokenizers import models

    wp = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.save(str(bad))
    wp.pre_tokenizer = tokenizers.pre_tokenizers.UnicodeScripts()
    wp.save(str(bad))
    with pytest.raises(ValueError, match="unsupported pre_tokenizer 'UnicodeScripts'"):
        load(bad)
