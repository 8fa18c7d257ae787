"""Tokenizers. So far: byte-level BPE (GPT-2 style), compatible with Hugging Face tokenizer.json."""

from collections.abc import Iterable, Sequence

from .bpe import ByteLevelBPE, load, train_bpe

__all__ = ["ByteLevelBPE", "load", "train"]

_KINDS = ("bpe",)


def train(
    texts: Iterable[str],
    kind: str = "bpe",
    *,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
) -> ByteLevelBPE:
    """Train a tokenizer on texts. Special tokens get the first ids."""
    if kind != "bpe":
        raise NotImplementedError(
            f"tokenizer kind {kind!r} is not implemented; available: {', '.join(_KINDS)} (byte-level BPE)"
        )
    return train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens)
