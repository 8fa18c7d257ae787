"""The tokenizer pipeline against Hugging Face `tokenizers` (an oracle only): each normalizer, pre-tokenizer,
decoder and post-processor, added-token options, character-level BPE with byte fallback, GPT-4-regex BPE,
vocab.json + merges.txt, and the compiled fast path."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.tokenizer import AddedToken, Tokenizer, count_words, load, train
from llmlab.tokenizer.bpe import BYTE_TOKENS, train_bpe
from llmlab.tokenizer.decode import decoder_from_hf
from llmlab.tokenizer.normalize import normalizer_from_hf
from llmlab.tokenizer.pretokenize import GPT4_PATTERN, Metaspace, pre_tokenizer_from_hf

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog did not mind; it was a very lazy dog.",
    "Tokenizers split text into pieces. Byte pair encoding merges the most frequent pair of symbols, "
    "again and again, until the vocabulary is large enough. It's simple, and it's what GPT-2 uses.",
    "In 2024 the model knows 12345 numbers, 3.14 and 2024-01-01. We're testing that they'll round-trip.",
    "def train(texts, vocab_size):\n    counts = Counter(texts)\n    return counts.most_common(10)\n",
    "机器学习是人工智能的一个分支。深度学习是机器学习的一个分支。",
    " ".join(["token", "tokens", "tokenizer", "tokenize", "the", "model", "lower", "newest", "widest"] * 20),
]
HELD_OUT = [
    "Hello, world! This sentence was not in the training text.",
    "I'd say THEY'RE   spaced\tout\n\nwith  tabs and newlines.  ",
    "机器学习是人工智能的一个分支。自然语言处理很有趣！",
    "for i in range(10):\n    print(f\"{i:>3}\")  # comment\n",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇯🇵",
    "Ünïcödé café naïve façade — “quotes” … ½ ² ﬁ Å",
    "",
    " ",
    "   leading and trailing   ",
    "numbers 1234567 and ٣٤٥ and ²³",
]


def _pre(hf, text):
    return [p for p, _ in hf.pre_tokenize_str(text)]


# --- components -----------------------------------------------------------------------------------------

NORMALIZERS = [
    normalizers.NFC(), normalizers.NFD(), normalizers.NFKC(), normalizers.NFKD(), normalizers.Lowercase(),
    normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]), normalizers.Strip(),
    normalizers.Strip(left=False, right=True), normalizers.Replace(" ", "▁"), normalizers.Replace(Regex(r"\s+"), " "),
    normalizers.Prepend("▁"), normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
    normalizers.BertNormalizer(),
]


@pytest.mark.parametrize("hf", NORMALIZERS, ids=lambda n: type(n).__name__)
def test_normalizers_match_hf(hf):
    d = json.loads(tokenizers.Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).to_str())
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    tok.normalizer = hf
    spec = json.loads(tok.to_str())["normalizer"]
    ours = normalizer_from_hf(spec)
    assert ours.to_hf() == spec or ours.to_hf()["type"] == spec["type"]
    for text in HELD_OUT:
        assert ours(text) == hf.normalize_str(text), (spec, text)
    assert d["normalizer"] is None


PRE_TOKENIZERS = [
    pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.ByteLevel(add_prefix_space=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Digits(individual_digits=False),
    pre_tokenizers.Metaspace(), pre_tokenizers.Metaspace(prepend_scheme="first"),
    pre_tokenizers.Metaspace(prepend_scheme="never", split=False),
    pre_tokenizers.Whitespace(), pre_tokenizers.WhitespaceSplit(), pre_tokenizers.BertPreTokenizer(),
    pre_tokenizers.Punctuation(), pre_tokenizers.Punctuation("merged_with_previous"),
    *[pre_tokenizers.Split(Regex(r"\s+|\d"), behavior) for behavior in
      ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous")],
    # [a-z] rather than \w: Oniguruma's \w and Python's differ on joiners such as U+200D.
    pre_tokenizers.Split(Regex(r"[a-z]+"), "isolated", invert=True), pre_tokenizers.Split(" ", "merged_with_next"),
    pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                             pre_tokenizers.ByteLevel(add_prefix_space=False)]),
]


@pytest.mark.parametrize("hf", PRE_TOKENIZERS, ids=lambda p: type(p).__name__)
def test_pre_tokenizers_match_hf(hf):
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    tok.pre_tokenizer = hf
    spec = json.loads(tok.to_str())["pre_tokenizer"]
    ours = pre_tokenizer_from_hf(spec)
    assert pre_tokenizer_from_hf(ours.to_hf()).to_hf() == ours.to_hf()
    for text in HELD_OUT + ["a  b\n\n c", "'S 'LL x's DON'T", "a1b22c333d4444"]:
        if text:  # the pipeline never pre-tokenizes empty text
            assert ours([text]) == _pre(hf, text), (spec, text)


DECODERS = [
    (decoders.ByteLevel(), ["Ġhello", "<|im_end|>", "Ġw", "Ã©", "\u00e2\u0082"]),
    (decoders.WordPiece(), ["hello", "##s", ",", "don", "'", "t", "go", "."]),
    (decoders.Metaspace(), ["▁Hello", "▁wor", "ld", "▁"]),
    (decoders.Metaspace(prepend_scheme="never"), ["▁Hello", "▁wor", "ld"]),
    (decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                        decoders.Strip(" ", 1, 0)]), ["▁Hello", "<0xE2>", "<0x82>", "<0xAC>", "▁x", "<0xE2>"]),
    (decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]), ["▁a", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]),
    (decoders.BPEDecoder(), ["hel", "lo</w>", "world</w>"]),
    (decoders.Strip("x", 2, 1), ["xxxaxx", "xbx", "bxx"]),
]


@pytest.mark.parametrize("hf,tokens", DECODERS, ids=lambda x: type(x).__name__ if not isinstance(x, list) else "")
def test_decoders_match_hf(hf, tokens):
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    tok.decoder = hf
    ours = decoder_from_hf(json.loads(tok.to_str())["decoder"])
    assert "".join(ours(tokens)) == hf.decode(tokens)


# --- whole tokenizers --------------------------------------------------------------------------------------


def _hf_file(hf: "tokenizers.Tokenizer", tmp_path, name="tokenizer.json"):
    path = tmp_path / name
    hf.save(str(path))
    return path


def _same_ids(ours: Tokenizer, hf, texts, pair=None):
    for text in texts:
        enc = hf.encode(text) if pair is None else hf.encode(text, pair)
        assert ours.encode(text, pair) == enc.ids, text
        assert ours.decode(enc.ids) == hf.decode(enc.ids, skip_special_tokens=False), text


def test_llama3_style_bpe_from_hf(tmp_path):
    """GPT-4 regex split, ByteLevel without regex, ignore_merges, BOS template: as Llama 3 ships."""
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|begin_of_text|>", "<|eot_id|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    ours = load(_hf_file(hf, tmp_path))
    _same_ids(ours, hf, HELD_OUT + ["<|eot_id|>x<|begin_of_text|>"])
    _same_ids(ours, hf, HELD_OUT[:3], pair="second part")
    assert ours.encode_with_type_ids("a", "b")[1] == hf.encode("a", "b").type_ids


def test_char_level_bpe_with_byte_fallback_matches_hf(tmp_path):
    ours = train(CORPUS * 2, vocab_size=400, byte_level=False, special_tokens=["<s>", "</s>"], min_frequency=2)
    assert [ours.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    hf = tokenizers.Tokenizer.from_file(ours.save(tmp_path / "tokenizer.json"))
    texts = HELD_OUT + ["unseen 字 and 🎉 fall back to bytes", "<s>hi</s>"]
    _same_ids(ours, hf, texts)
    for text in texts:
        if not text.startswith(" "):  # the decoder drops the first word's "▁", as sentencepiece does
            assert ours.decode(ours.encode(text)) == text  # unknown characters are spelled in byte tokens
    assert "<0xE5>" in ours.tokenize("字")  # 字 (E5 AD 97) is not in the training alphabet


# limit_alphabet=16 drops x, ½ and ß, each at the end of its word. Only there do `tokenizers`' trainer (which skips
# a dropped character and pairs its neighbours) and ours (which cuts the word at it, as no merge can span it when
# encoding) learn the same merges.
LIMITED = ["the lower newest widest tokens " * 6, "token tokenizer tokenize lowest slower " * 4, "naï naï naï x½ x½ zß"]


@pytest.mark.parametrize("byte_fallback", [True, False], ids=["byte_fallback", "unk"])
def test_limit_alphabet_matches_hf_trainer(tmp_path, byte_fallback):
    specials = ["<unk>", "<s>"]
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=byte_fallback))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=2, limit_alphabet=16, show_progress=False,
                                  special_tokens=specials + (BYTE_TOKENS if byte_fallback else []))
    hf.train_from_iterator(LIMITED, trainer)
    if byte_fallback:
        ours = train(LIMITED, vocab_size=320, byte_level=False, special_tokens=["<s>"], limit_alphabet=16)
    else:  # train() always falls back to bytes; the trainer itself can leave unknown characters to <unk>
        pre = Metaspace(prepend_scheme="first")
        model = train_bpe(count_words(LIMITED, pre_tokenizer=pre), 320, special_tokens=specials, unk_token="<unk>",
                          limit_alphabet=16)
        ours = Tokenizer(model, pre_tokenizer=pre, decoder=decoder_from_hf(json.loads(hf.to_str())["decoder"]),
                         added_tokens=[AddedToken(t, model.vocab[t]) for t in specials])
    # A strict cut (ï: 3 > x, ½: 2), since `tokenizers` orders equally frequent characters arbitrarily.
    assert {t for t in ours.vocab if len(t) == 1} == set("▁etonwsklrizhdaï")
    hf_model = json.loads(hf.to_str())["model"]
    assert ours.model.vocab == hf_model["vocab"]
    assert ours.merges == [tuple(m) for m in hf_model["merges"]]
    texts = ["naïve x½ straße", "the lowest token ½ß", "½", "zß naï"]
    _same_ids(ours, hf, texts)
    _same_ids(ours, tokenizers.Tokenizer.from_file(ours.save(tmp_path / "tokenizer.json")), texts)
    # dropped characters: their UTF-8 bytes, or one <unk> for the run
    assert ours.tokenize("x½") == (["▁", "<0x78>", "<0xC2>", "<0xBD>"] if byte_fallback else ["▁", "<unk>"])


def test_limit_alphabet_counts_the_initial_alphabet_once():
    """`tokenizers` keeps the initial alphabet and then the most frequent other characters, limit_alphabet in all."""
    text = "aaaa bbb cc d"
    for initial, limit in ((["q"], 3), (["a"], 2), (["a", "q"], 3)):
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=50, initial_alphabet=initial,
                                                           limit_alphabet=limit, show_progress=False))
        ours = train_bpe(count_words(text.split()), 50, initial_alphabet=initial, limit_alphabet=limit)
        alphabet = {t for t in hf.get_vocab() if len(t) == 1}
        assert len(alphabet) == limit
        assert {t for t in ours.vocab if len(t) == 1} == alphabet, (initial, limit)


def test_hf_trained_metaspace_bpe_with_unk(tmp_path):
    hf = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]", fuse_unk=True, continuing_subword_prefix="##"))
    hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False,
                                                       continuing_subword_prefix="##", limit_alphabet=40))
    ours = load(_hf_file(hf, tmp_path))
    for text in HELD_OUT:
        assert ours.encode(text) == hf.encode(text).ids, text


@pytest.mark.parametrize("options", [{"continuing_subword_prefix": "##"}, {"end_of_word_suffix": "</w>"}, {}],
                         ids=["prefix", "suffix", "plain"])
def test_char_level_bpe_on_latin1_symbols_matches_hf(tmp_path, options):
    """U+0080-U+00BF (½ ° ± µ « » ...) are plain characters to a character-level BPE, though GPT-2's byte
    alphabet spells UTF-8 continuation bytes with the same code points: subword prefixes, end-of-word suffixes
    and fused <unk> runs apply across them as `tokenizers` applies them."""
    texts = ["a½b a½b c½ab 25°C ±3 «x» µm"] * 3
    hf = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]", fuse_unk=True, **options))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"], show_progress=False,
                                                      **options))
    _same_ids(load(_hf_file(hf, tmp_path)), hf, ["a½b c½ab", "x½y yz½ ½ß", "25°C ±3 «µ»"])


def test_added_token_options_match_hf(tmp_path):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens([tokenizers.AddedToken("<mask>", lstrip=True), tokenizers.AddedToken("<eos>", rstrip=True)])
    hf.add_tokens([tokenizers.AddedToken("word", single_word=True), tokenizers.AddedToken("Hello", normalized=True),
                   "plain added"])
    ours = load(_hf_file(hf, tmp_path))
    texts = ["a <mask> b", "x<eos>   y", "word words sword word.", "Hello hello", "my plain added text",
             "<mask><eos>  <mask>", *HELD_OUT[:3]]
    _same_ids(ours, hf, texts)
    hf.encode_special_tokens = True
    for text in texts:
        assert ours.encode(text, parse_special=False) == hf.encode(text).ids, text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", "a", " ", "<|", "im_end", "|>", "é", "\n"]),
                max_size=12).map("".join))
def test_special_tokens_never_split(text):
    ours = _byte_level()
    ids = ours.encode(text)
    assert ids.count(ours.token_to_id("<|im_end|>")) == text.count("<|im_end|>")
    assert ours.decode(ids) == text
    plain = ours.encode(text, parse_special=False)
    assert not set(plain) & {ours.token_to_id("<|im_start|>"), ours.token_to_id("<|im_end|>")}
    assert ours.decode(plain) == text


_CACHE = {}


def _byte_level():
    if "bpe" not in _CACHE:
        _CACHE["bpe"] = train(CORPUS, vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"])
    return _CACHE["bpe"]


def _tiny_wordpiece(post_processor):
    """A five-token WordPiece with <s> = 0 and </s> = 1, to test post-processors on."""
    hf = tokenizers.Tokenizer(models.WordPiece({"<s>": 0, "</s>": 1, "[UNK]": 2, "a": 3, "b": 4}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = post_processor
    return hf


def test_roberta_processing_matches_hf(tmp_path):
    hf = _tiny_wordpiece(processors.RobertaProcessing(("</s>", 1), ("<s>", 0)))
    ours = load(_hf_file(hf, tmp_path))
    for a, b in [("a b", None), ("a", "b a"), ("c", "")]:
        enc = hf.encode(a) if b is None else hf.encode(a, b)
        assert ours.encode_with_type_ids(a, b) == (enc.ids, enc.type_ids)


TRAILING_EOS = [
    processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]),
    processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                  special_tokens=[("<s>", 0), ("</s>", 1)]),
    processors.TemplateProcessing(single="<s> $A </s>", pair="<s>:0 $A:0 </s>:0 $B:1 </s>:1",
                                  special_tokens=[("<s>", 0), ("</s>", 1)]),
]
PAIRS = [("a b", None), ("", None), ("a", "b a"), ("c", ""), ("", "a b")]


@pytest.mark.parametrize("post", TRAILING_EOS, ids=["eos", "bos-eos", "bos-eos-typed"])
def test_trailing_eos_template_matches_hf(tmp_path, post):
    hf = _tiny_wordpiece(post)
    ours = load(_hf_file(hf, tmp_path))
    written = tokenizers.Tokenizer.from_file(ours.save(tmp_path / "ours.json"))  # our template, read by the library
    for a, b in PAIRS:
        for lib in (hf, written):
            enc = lib.encode(a, b)
            assert ours.encode_with_type_ids(a, b) == (enc.ids, enc.type_ids), (a, b)
        # Without special tokens the template still types the sequences.
        plain = hf.encode(a, b, add_special_tokens=False)
        b_ids = None if b is None else ours.encode(b, add_special_tokens=False)
        assert ours.post_processor(ours.encode(a, add_special_tokens=False), b_ids, add_special_tokens=False) == \
            (plain.ids, plain.type_ids)
    assert ours.encode("a")[-1] == 1  # the EOS really is last


@pytest.mark.parametrize("post", [TRAILING_EOS[0], processors.RobertaProcessing(("</s>", 1), ("<s>", 0))],
                         ids=["eos", "roberta"])
def test_pair_type_ids_without_special_tokens_match_hf(tmp_path, post):
    hf = _tiny_wordpiece(post)
    ours = load(_hf_file(hf, tmp_path))
    for a, b in PAIRS:
        plain = hf.encode(a, b, add_special_tokens=False)
        assert ours.encode_with_type_ids(a, b, add_special_tokens=False) == (plain.ids, plain.type_ids), (a, b)


# --- other file formats -------------------------------------------------------------------------------------


def test_vocab_json_and_merges_txt(tmp_path):
    ours = _byte_level()
    vocab_path, merges_path = ours.save_vocab_merges(tmp_path)
    hf = tokenizers.Tokenizer(models.BPE.from_file(vocab_path, merges_path))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    again = load(vocab_path)
    assert load(tmp_path).vocab == again.vocab == ours.vocab  # a directory holding vocab.json + merges.txt
    assert again.special_tokens == ["<|im_start|>", "<|im_end|>"]
    for text in HELD_OUT + ["<|im_start|>user\nhi<|im_end|>"]:
        assert again.encode(text) == ours.encode(text) == hf.encode(text).ids
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt:2: expected two tokens"):
        load(vocab_path)


def test_vocab_json_and_merges_txt_written_by_tokenizers(tmp_path):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    vocab_path, merges_path = hf.model.save(str(tmp_path))  # GPT-2's two files, as the library writes them
    assert open(merges_path, encoding="utf-8").readline().startswith("#version")
    ours = load(vocab_path)
    assert ours.special_tokens == ["<|endoftext|>"] and len(ours.merges) == len(hf.get_vocab()) - 257
    _same_ids(ours, hf, HELD_OUT + ["<|endoftext|>def f(x):\n    return x ** 2  # 🎉\n<|endoftext|>"])


def test_save_directory_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = train(CORPUS, vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"])
    ours.eos_token = "<|im_end|>"
    ours.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|im_end|>"
    for text in HELD_OUT:
        assert hf.encode(text) == ours.encode(text)


# --- the compiled fast path ---------------------------------------------------------------------------------


def test_fast_path_tiktoken_gives_identical_ids():
    pytest.importorskip("tiktoken")
    from llmlab.tokenizer.fast import tiktoken_encoder

    ours = _byte_level()
    assert tiktoken_encoder(ours) is not None
    texts = HELD_OUT + CORPUS + ["<|im_start|>user\nhi<|im_end|>", "x" * 300]
    for parse_special in (True, False):
        expected = [ours.encode(t, parse_special=parse_special) for t in texts]
        assert ours.encode_batch(texts, parse_special=parse_special) == expected


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_tiktoken_only_where_every_token_merges_from_its_own_bytes(ignore_merges):
    """tiktoken has no merge list: it joins any two adjacent tokens that spell a token. With merges b c, a b,
    ab c, the bytes of "abc" merge into a + bc and never into abc, which tiktoken would reach: such a vocab stays
    off tiktoken. With a b, ab c, b c it is exact, ignore_merges or not."""
    pytest.importorskip("tiktoken")
    from llmlab.tokenizer.bpe import BPE
    from llmlab.tokenizer.bytelevel import BYTE_TO_UNICODE
    from llmlab.tokenizer.fast import tiktoken_encoder
    from llmlab.tokenizer.tokenizer import byte_level_bpe

    vocab = {c: i for i, c in enumerate(BYTE_TO_UNICODE.values())}
    texts = ["abc abc", "abcd", "xabc", "bcabc", "ab"]
    for merges, exact in (([("b", "c"), ("a", "b"), ("ab", "c")], False), ([("a", "b"), ("ab", "c"), ("b", "c")], True)):
        full = {**vocab, **{a + b: 256 + i for i, (a, b) in enumerate(merges)}}
        tok = byte_level_bpe(BPE(full, merges, ignore_merges=ignore_merges))
        assert (tiktoken_encoder(tok) is not None) == exact
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
        assert tok.encode("abcd") == ([full["abc"], full["d"]] if exact else [full["a"], full["bc"], full["d"]])


def test_fast_path_tokenizers_for_other_pipelines():
    wp = train(CORPUS, kind="wordpiece", vocab_size=300, min_frequency=1)
    char = train(CORPUS, vocab_size=400, byte_level=False)
    uni = train(CORPUS * 3, kind="unigram", vocab_size=300)
    texts = HELD_OUT + ["[CLS] x [SEP]", "<unk> and <s>"]
    for ours in (wp, char, uni):
        assert ours._fast is None  # nothing chosen before the first batch
        for parse_special in (True, False):
            for add in (True, False):
                expected = [ours.encode(t, add_special_tokens=add, parse_special=parse_special) for t in texts]
                assert ours.encode_batch(texts, add_special_tokens=add, parse_special=parse_special) == expected
                assert ours.encode_batch(texts, add_special_tokens=add, parse_special=parse_special,
                                         fast=False) == expected
        # the batches above went to the library: `tokenizers` was chosen (tiktoken takes byte-level BPE only)
        assert getattr(ours._fast, "__name__", None) == "encode_tokenizers"


# --- Unigram through the whole pipeline -----------------------------------------------------------------------


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_trained_unigram_matches_hf(tmp_path, byte_fallback):
    ours = train(CORPUS * 3, kind="unigram", vocab_size=300 if not byte_fallback else 560,
                 byte_fallback=byte_fallback)
    hf = tokenizers.Tokenizer.from_file(ours.save(tmp_path / "tokenizer.json"))
    texts = HELD_OUT + ["unseen 字 and 🎉 <unk> text"]
    _same_ids(ours, hf, texts)
    if byte_fallback:
        assert ours.model.unk_id not in ours.encode("unseen 字 🎉")
        assert ours.decode(ours.encode("unseen 字 🎉")) == "unseen 字 🎉"


def test_hf_trained_unigram_loads(tmp_path):
    hf = tokenizers.Tokenizer(models.Unigram())
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(CORPUS * 3, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"],
                                                               unk_token="<unk>", show_progress=False))
    ours = load(_hf_file(hf, tmp_path))
    _same_ids(ours, hf, HELD_OUT + ["<s>x y", "Ⅻ ﬁ ①"])


def test_unigram_sampled_encoding():
    ours = train(CORPUS * 3, kind="unigram", vocab_size=300)
    text = "tokenizers split the newest model"
    best = ours.encode(text)
    samples = {tuple(ours.encode_sampled(text, alpha=0.1, seed=s)) for s in range(30)}
    assert len(samples) > 1 and all(ours.decode(list(s)) == text for s in samples)
    assert ours.encode_sampled(text, alpha=50.0, seed=0) == best  # a sharp distribution picks the Viterbi path
    assert ours.encode_sampled(text, seed=3) == ours.encode_sampled(text, seed=3)
    with pytest.raises(ValueError, match="needs a Unigram model"):
        _byte_level().encode_sampled(text)
