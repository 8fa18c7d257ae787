"""Tokenizer quality: how much text a token carries and how much of the vocabulary gets used.

bytes per token (UTF-8 bytes / tokens) is the compression a language model sees: at a fixed context length
and compute, more bytes per token means more text per step. Vocabulary use (distinct ids seen / vocab size)
shows tokens that a corpus never needs -- embedding rows that are trained rarely or never.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..progress import Bar

BATCH = 2048  # texts per encode_batch call: big enough for the batched encoders, small enough for a moving bar


def evaluate(tok, texts: Sequence[str], *, progress: bool = False) -> dict:
    """Bytes and characters per token, vocabulary use and the unknown-token rate of tok on texts.
    progress=True shows a progress bar on a terminal."""
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("cannot evaluate a tokenizer on empty text")
    counts: Counter = Counter()
    with Bar(len(texts), "encoding", progress) as bar:
        for lo in range(0, len(texts), BATCH):
            batch = texts[lo:lo + BATCH]
            for ids in tok.encode_batch(batch, add_special_tokens=False, parse_special=False):
                counts.update(ids)
            bar.update(len(batch))
    n_tokens = sum(counts.values())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_chars = sum(len(t) for t in texts)
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    return {
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "chars_per_token": n_chars / max(n_tokens, 1),
        "vocab_size": len(tok),
        "vocab_used": len(counts) / len(tok),
        "unk_rate": (counts[unk_id] / max(n_tokens, 1)) if unk_id is not None else 0.0,
    }
