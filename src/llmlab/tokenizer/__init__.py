"""Tokenizers compatible with Hugging Face tokenizer.json: BPE (byte-level like GPT-2, or character-level with
byte fallback like Llama), WordPiece (BERT) and Unigram (sentencepiece); chat templates."""

from collections import Counter
from collections.abc import Iterable, Sequence

import regex

from ..progress import Bar
from .bpe import BPE, train_bpe
from .bytelevel import BYTE_TO_UNICODE
from .decode import ByteFallbackDecoder, DecoderSequence, MetaspaceDecoder
from .normalize import BertNormalizer, UnicodeNormalizer
from .pretokenize import BertPreTokenizer, ByteLevel, Metaspace
from .tokenizer import AddedToken, Tokenizer, bert_wordpiece, byte_level_bpe, load
from .wordpiece import DEFAULT_SPECIAL_TOKENS, WordPiece, train_wordpiece

__all__ = ["AddedToken", "Tokenizer", "count_words", "load", "train"]

KINDS = ("bpe", "wordpiece", "unigram")


def count_words(texts: Iterable[str], *, normalizer=None, pre_tokenizer=None, special_tokens: Sequence[str] = (),
                progress: bool = False) -> Counter:
    """Pre-token counts of texts under a normalizer and pre-tokenizer. Special-token strings are cut out
    first (as encoding does), so their text never leaks into learned tokens."""
    if isinstance(texts, str):
        texts = [texts]
    specials = sorted(special_tokens, key=len, reverse=True)
    pattern = regex.compile("|".join(map(regex.escape, specials))) if specials else None
    counts: Counter = Counter()
    bar = Bar(len(texts) if hasattr(texts, "__len__") else None, "counting words", progress)
    for text in texts:
        bar.update()
        for k, chunk in enumerate(pattern.split(text) if pattern else [text]):
            at_start = k == 0  # Metaspace's prepend_scheme "first" marks only the input's start
            if chunk:
                if normalizer is not None:
                    chunk = normalizer(chunk)
                counts.update(pre_tokenizer([chunk], at_start) if pre_tokenizer is not None else [chunk])
    bar.close()
    return counts


def _check_specials(special_tokens: Sequence[str]) -> list[str]:
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or any(not isinstance(s, str) or not s for s in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    return special_tokens


def train(
    texts: Iterable[str],
    kind: str = "bpe",
    *,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
    byte_level: bool = True,
    progress: bool = False,
    **options,
) -> Tokenizer:
    """Train a tokenizer on texts; special tokens get the first ids.

    kind="bpe": byte-level (GPT-2: no unknown token, anything round-trips), or with byte_level=False
    character-level with byte fallback (Llama/sentencepiece style: Metaspace "▁" word marks, "<unk>").
    kind="wordpiece": BERT (normalizer, pre-tokenizer, [CLS]/[SEP] template; specials default to BERT's five).
    kind="unigram": sentencepiece's algorithm with NFKC, Metaspace and "<unk>" (options go to train_unigram).
    progress=True shows progress bars on a terminal.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(KINDS)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(texts, str):
        texts = [texts]
    if kind == "wordpiece":
        specials = _check_specials(special_tokens or DEFAULT_SPECIAL_TOKENS)
        normalizer = BertNormalizer(lowercase=options.pop("lowercase", True))
        counts = count_words(texts, normalizer=normalizer, pre_tokenizer=BertPreTokenizer(), special_tokens=specials,
                             progress=progress)
        model = train_wordpiece(counts, vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                progress=progress, **options)
        return bert_wordpiece(model, specials, normalizer=normalizer)
    if kind == "unigram":
        from .unigram import train_unigram

        specials = _check_specials(special_tokens or ["<unk>"])
        unk = options.pop("unk_token", "<unk>")
        pipeline = dict(normalizer=UnicodeNormalizer("NFKC"), pre_tokenizer=Metaspace(),
                        decoder=DecoderSequence([ByteFallbackDecoder(), MetaspaceDecoder()])
                        if options.get("byte_fallback") else MetaspaceDecoder())
        counts = count_words(texts, normalizer=pipeline["normalizer"], pre_tokenizer=pipeline["pre_tokenizer"],
                             special_tokens=specials,
                             progress=progress)
        model = train_unigram(counts, vocab_size, special_tokens=specials, unk_token=unk, progress=progress, **options)
        return Tokenizer(model, added_tokens=[AddedToken(s, model.token_to_id(s)) for s in specials], **pipeline)
    specials = _check_specials(special_tokens)
    if byte_level:
        counts = count_words(texts, pre_tokenizer=ByteLevel(), special_tokens=specials,
                             progress=progress)
        model = train_bpe(counts, vocab_size, min_frequency=min_frequency, special_tokens=specials,
                          initial_alphabet=[BYTE_TO_UNICODE[b] for b in range(256)], progress=progress, **options)
        return byte_level_bpe(model, specials)
    unk = options.pop("unk_token", "<unk>")
    specials = _check_specials([unk, *[s for s in specials if s != unk]])
    pipeline = dict(pre_tokenizer=Metaspace(prepend_scheme="first"),
                    decoder=DecoderSequence([ByteFallbackDecoder(), MetaspaceDecoder(prepend_scheme="first")]))
    counts = count_words(texts, pre_tokenizer=pipeline["pre_tokenizer"], special_tokens=specials,
                             progress=progress)
    model = train_bpe(counts, vocab_size, min_frequency=min_frequency, special_tokens=specials, byte_fallback=True,
                      unk_token=unk, progress=progress, **options)
    return Tokenizer(model, added_tokens=[AddedToken(s, model.vocab[s]) for s in specials], **pipeline)
