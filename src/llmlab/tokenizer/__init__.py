"""Tokenizers, compatible with Hugging Face tokenizer.json: byte-level BPE (GPT-2 style) and WordPiece (BERT)."""

import os
from collections.abc import Iterable, Sequence

from .bpe import ByteLevelBPE, train_bpe
from .bpe import load as _load_bpe
from .wordpiece import DEFAULT_SPECIAL_TOKENS, WordPiece, is_wordpiece_file, load_wordpiece, train_wordpiece

__all__ = ["ByteLevelBPE", "WordPiece", "load", "train"]

_KINDS = ("bpe", "wordpiece")


def train(
    texts: Iterable[str],
    kind: str = "bpe",
    *,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
) -> ByteLevelBPE | WordPiece:
    """Train a tokenizer on texts. Special tokens get the first ids (WordPiece defaults to BERT's five)."""
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=special_tokens or DEFAULT_SPECIAL_TOKENS)
    if kind != "bpe":
        raise NotImplementedError(f"tokenizer kind {kind!r} is not implemented; available: {', '.join(_KINDS)}")
    return train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens)


def load(path: str | os.PathLike) -> ByteLevelBPE | WordPiece:
    """Read a tokenizer.json (byte-level BPE or WordPiece), a BERT vocab.txt, or a directory holding one."""
    return load_wordpiece(path) if is_wordpiece_file(path) else _load_bpe(path)
