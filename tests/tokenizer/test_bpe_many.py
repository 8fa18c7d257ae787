"""Merging many pre-tokens at once (bpe_many, behind Tokenizer.encode_batch(fast=False)) against the one-word
merge loop and against `tokenizers`: same ids for any text, merge lists that are not in rank order, runs of a
repeated symbol, long words, and a piece cache that overflows."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.tokenizer import load, train
from llmlab.tokenizer import bpe_many
from llmlab.tokenizer.bpe import BPE
from llmlab.tokenizer.postprocess import RobertaProcessing

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog, again and again, while the other dogs sleep all day long.",
    "Byte pair encoding merges the most frequent pair of symbols until the vocabulary is large enough.",
    "机器学习是人工智能的一个分支。深度学习是机器学习的一个分支，它使用多层神经网络。人工智能正在改变世界。",
    "aaaa aaaaaaa aaaaaaaaaaa bbbbbb abababab ---- ======== ........ 1111 2222 3333",
    "def train(texts, vocab_size):\n    counts = Counter(texts)\n    return counts.most_common(10)\n",
] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = train(CORPUS, vocab_size=500, special_tokens=SPECIALS, min_frequency=2)
    return str(tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def pieces_of(tok, texts):
    from llmlab.tokenizer.pretokenize import byte_symbols

    return list({byte_symbols(p): None for t in texts for p in tok._piece_split(t)})


def brute_force_bpe(bpe: BPE, word: str) -> list[int]:
    """BPE by its definition: merge the lowest-ranked adjacent pair, leftmost first, until none is left."""
    ids = [bpe.vocab[c] for c in word]
    while True:
        found = [(bpe._ranks[p][0], i) for i, p in enumerate(zip(ids, ids[1:])) if p in bpe._ranks]
        if not found:
            return ids
        _, i = min(found)
        ids[i:i + 2] = [bpe._ranks[(ids[i], ids[i + 1])][1]]


def test_many_words_merge_like_one_at_a_time(saved):
    """Held-out-like text in English, Chinese, code and long runs: every pre-token's ids equal the merge loop's;
    the batch is large enough for the numpy rounds, their compaction and the one-by-one tail."""
    tok = load(saved)
    rng = random.Random(0)
    texts = [rng.choice(("", " ")) + "".join(rng.choice(alphabet) for _ in range(n))
             for alphabet in ("人工智能学习机器", "ab", "ab -=.1人工") for n in range(1, 150)]
    words = pieces_of(tok, CORPUS + texts)
    assert len(words) > 300 and max(map(len, words)) > 300
    assert tok.model.tokenize_many(words) == [tok.model._tokenize(w) for w in words]
    assert tok.model._many.rank_ordered


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
                | st.from_regex(r"[a-c 人工=\n]{0,60}", fullmatch=True), max_size=12))
def test_encode_batch_in_python_equals_encode_and_tokenizers(saved, texts):
    tok = load(saved)  # an empty piece cache: every piece is new to the batch
    hf = tokenizers.Tokenizer.from_file(saved)
    got = tok.encode_batch(texts, fast=False)
    assert got == [tok.encode(t) for t in texts] == [e.ids for e in hf.encode_batch(texts)]


def test_encode_batch_with_added_tokens_post_processing_and_a_small_cache(saved, monkeypatch):
    """Texts holding special tokens go through encode; a post-processor is applied; when the batch brings
    more new pieces than the cache holds, the cache starts again and the ids stay right."""
    from llmlab.tokenizer import tokenizer as tokenizer_module

    texts = ["<|im_start|>user hello<|im_end|>", "plain text, no specials", "人工智能 <|endoftext|>", "", "again"]
    tok = load(saved)
    tok.post_processor = RobertaProcessing(("<|im_end|>", 2), ("<|im_start|>", 1))
    expect = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, fast=False) == expect and expect[1][0] == 1 and expect[1][-1] == 2
    plain = [tok.encode(t, parse_special=False) for t in texts]
    assert tok.encode_batch(texts, fast=False, parse_special=False) == plain
    assert tok.encode_batch(texts, fast=False, add_special_tokens=False) == [tok.encode(t, add_special_tokens=False)
                                                                             for t in texts]
    monkeypatch.setattr(tokenizer_module, "CACHE_LIMIT", 3)
    small = load(saved)
    many = CORPUS + texts
    assert small.encode_batch(many, fast=False) == [load(saved).encode(t) for t in many]
    assert len(small._piece_cache) <= 3
    assert [small.encode(t) for t in many] == [load(saved).encode(t) for t in many]
    assert len(small._piece_cache) <= 3 and len(small.model._cache) == 0  # pieces are cached once, by raw text
    with pytest.raises(TypeError, match="encode expects a str"):
        small.encode_batch(["ok", 5], fast=False)


def test_runs_of_one_symbol_and_merges_out_of_rank_order():
    """x x x ... under (x, x): left to right, as the loop does, for every run length; a merge list where a
    merge uses a token made by a later merge is not in rank order and goes word by word."""
    vocab = {t: i for i, t in enumerate(["a", "b", "aa", "aaa", "aaaa", "ab", "aab", "ba"])}
    merges = [("a", "a"), ("aa", "a"), ("aa", "aa"), ("a", "b"), ("aa", "b"), ("b", "a")]
    bpe = BPE(vocab, merges)
    words = ["a" * n for n in range(1, 60)] + ["ab" * n for n in range(1, 30)] + ["aab" * 7, "baaab" * 9, ""]
    assert bpe.tokenize_many(words) == [bpe._tokenize(w) for w in words] == [brute_force_bpe(bpe, w) for w in words]
    assert bpe._many.rank_ordered
    shuffled = BPE(vocab, [("aa", "a"), ("a", "a"), ("aa", "aa"), ("a", "b"), ("aa", "b"), ("b", "a")])
    assert shuffled.tokenize_many(words) == [shuffled._tokenize(w) for w in words] == [brute_force_bpe(shuffled, w)
                                                                                        for w in words]
    assert not shuffled._many.rank_ordered
    # "c" is no token: the batch goes word by word, which drops it (no unk_token), as encode does
    assert bpe.tokenize_many(["abc", "ab"]) == [bpe._tokenize("abc"), bpe._tokenize("ab")] == [[5], [5]]


def test_all_in_rounds_or_all_in_the_loop(saved, monkeypatch):
    """With the tail threshold at 1 every word finishes in numpy rounds, with it huge in the loop: same ids."""
    tok = load(saved)
    words = pieces_of(tok, CORPUS)
    expect = [tok.model._tokenize(w) for w in words]
    for threshold in (1, 10**9):
        monkeypatch.setattr(bpe_many, "MIN_ROUND_MERGES", threshold)
        assert load(saved).model.tokenize_many(words) == expect


def test_a_long_text_merges_its_new_pieces_together(saved, monkeypatch):
    """encode of one text with many new pieces merges them as encode_batch does; so do short texts when the
    threshold is lowered to 2. Ids equal `tokenizers`' either way."""
    from llmlab.tokenizer import tokenizer as tokenizer_module

    hf = tokenizers.Tokenizer.from_file(saved)
    rng = random.Random(1)
    long_text = " ".join(CORPUS) + "".join(rng.choice("人工智能 学习ab,-\n") for _ in range(3000))
    tok = load(saved)
    assert len(tok._piece_split(long_text)) >= tokenizer_module.MANY_NEW_PIECES
    assert tok.encode(long_text) == hf.encode(long_text).ids
    assert tok.model._many is not None  # the numpy path ran
    monkeypatch.setattr(tokenizer_module, "MANY_NEW_PIECES", 2)
    tok = load(saved)
    for text in CORPUS[:5] + ["a b", "人工 智能 <|im_end|> ab ab"]:
        assert tok.encode(text) == hf.encode(text).ids, text


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
CUT_THEN_BYTE_LEVEL = {  # pipelines that only cut the raw text before ByteLevel: they take the raw-piece shortcut
    "smollm2": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL],
    "digit_runs": [{"type": "Digits", "individual_digits": False}, BYTE_LEVEL],
    "llama3": [{"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}| ?\p{L}+|\s+|[^\s\p{L}\p{N}]+"},
                "behavior": "Isolated", "invert": False}, {**BYTE_LEVEL, "use_regex": False}],
}


@pytest.fixture(scope="module", params=sorted(CUT_THEN_BYTE_LEVEL))
def cut_then_byte_level(saved, request, tmp_path_factory):
    import json

    spec = json.loads(open(saved, encoding="utf-8").read())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": CUT_THEN_BYTE_LEVEL[request.param]}
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return str(path)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
                | st.from_regex(r"[a-c 1-9٣½人=\n\t']{0,60}", fullmatch=True), max_size=12))
def test_pipelines_that_cut_before_byte_level_take_the_shortcut_with_the_same_ids(cut_then_byte_level, texts):
    from llmlab.tokenizer.fast import tiktoken_encoder

    tok = load(cut_then_byte_level)
    assert tok._piece_split is not None and tiktoken_encoder(tok) is not None
    hf = tokenizers.Tokenizer.from_file(cut_then_byte_level)
    expected = [e.ids for e in hf.encode_batch(texts)]
    assert tok.encode_batch(texts) == expected  # tiktoken
    assert tok.encode_batch(texts, fast=False) == expected
    assert [tok.encode(t) for t in texts] == expected  # now from the piece cache
    assert [load(cut_then_byte_level).encode(t) for t in texts] == expected  # and each alone, cold


def test_other_pipelines_take_no_shortcut():
    from llmlab.tokenizer.pretokenize import (ByteLevel, Digits, Metaspace, PreTokenizerSequence, Whitespace,
                                              raw_piece_split)

    assert raw_piece_split(ByteLevel()) is not None
    assert raw_piece_split(PreTokenizerSequence([Digits(True), ByteLevel()])) is not None
    for pipeline in (ByteLevel(add_prefix_space=True), Metaspace(), Whitespace(),
                     PreTokenizerSequence([Whitespace(), ByteLevel()]), PreTokenizerSequence([ByteLevel(), Digits()]),
                     PreTokenizerSequence([])):
        assert raw_piece_split(pipeline) is None, pipeline


@pytest.mark.parametrize("individual", [True, False])
def test_one_regex_for_digits_then_gpt2_splits_every_short_string_alike(individual):
    """tiktoken takes one pattern; Digits followed by GPT-2's split must give the same pieces on every string
    of up to 5 characters from letters, digits, spaces, newlines, punctuation and an apostrophe."""
    import itertools

    import regex

    from llmlab.tokenizer.bytelevel import pretokenize
    from llmlab.tokenizer.fast import gpt2_after_digits_pattern
    from llmlab.tokenizer.pretokenize import Digits

    one = regex.compile(gpt2_after_digits_pattern(individual))
    digits = Digits(individual)
    for n in range(1, 6):
        for chars in itertools.product("a1 \n-'", repeat=n):
            text = "".join(chars)
            assert one.findall(text) == [q for p in digits([text]) for q in pretokenize(p)], text


def test_free_merges_and_characters_merged_first_give_the_definition_s_ids(saved):
    """The merge loop makes every free pair at once first, and tokenize_raw starts from each character's free
    merges: both equal BPE by its definition on English, Chinese, code, emoji and long runs."""
    from llmlab.tokenizer.pretokenize import byte_symbols

    tok = load(saved)
    rng = random.Random(2)
    texts = CORPUS + ["😀👍🏽 naïve café 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ½ Ω"] + [
        "".join(rng.choice("人工智能学习机器是的一个 ab,é😀") for _ in range(n)) for n in range(1, 120)]
    raw = list({p: None for t in texts for p in tok._piece_split(t)})
    bpe = tok.model
    expect = [brute_force_bpe(bpe, byte_symbols(p)) for p in raw]
    assert [bpe.tokenize_raw(p) for p in raw] == expect
    assert [bpe._tokenize(byte_symbols(p)) for p in raw] == expect
    free = bpe._free_pairs()
    assert bpe._by_character and len(free) > 20
    merged_inside = [c for c, ids in bpe._char_ids.items() if len(ids) < len(c.encode())]
    assert len(merged_inside) >= 5  # characters whose own bytes took free merges


def test_a_pair_is_free_only_when_no_lower_ranked_merge_can_take_one_of_its_symbols():
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "x", "xa", "bc", "ab", "abc"])}
    # (x, a) ranks below (a, b): in "xab" the a goes to x first; (b, c) ranks below (a, b): in "abc" b goes to c
    bpe = BPE(vocab, [("x", "a"), ("b", "c"), ("a", "b"), ("ab", "c")])
    assert bpe._free_pairs() == {(vocab["x"], vocab["a"]): vocab["xa"], (vocab["b"], vocab["c"]): vocab["bc"],
                                 (vocab["ab"], vocab["c"]): vocab["abc"]}
    for word in ("xab", "abc", "xabc", "abcab"):
        assert bpe._tokenize(word) == brute_force_bpe(bpe, word)
    assert bpe._tokenize("xab") == [vocab["xa"], vocab["b"]] and bpe._tokenize("abc") == [vocab["a"], vocab["bc"]]
    # out of rank order ((ab, c) before the merge that makes ab): no pair is free, the loop does everything
    shuffled = BPE(vocab, [("ab", "c"), ("x", "a"), ("b", "c"), ("a", "b")])
    assert shuffled._free_pairs() == {}
    for word in ("xab", "abc", "xabc", "abcab"):
        assert shuffled._tokenize(word) == brute_force_bpe(shuffled, word)
