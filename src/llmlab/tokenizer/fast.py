"""Bulk encoding handed to a compiled library when one is installed, with the same ids as the Python pipeline.

- tiktoken, for plain byte-level BPE (no normalizer; the GPT-2 regex or one Split regex, then ByteLevel;
  no post-processor): built from our own merges. tiktoken merges the adjacent pair whose concatenation has
  the lowest rank and returns ranks as ids, so this is exact when token ids grow with merge order (checked
  here) -- true of every tokenizer we train.
- `tokenizers`, for every other pipeline: our tokenizer.json loaded by the library that defined the format.
"""

import json

from .bpe import BPE
from .bytelevel import GPT2_PATTERN, symbols_to_bytes
from .pretokenize import ByteLevel, PreTokenizerSequence, Split


def _tiktoken_pattern(tok) -> str | None:
    pre = tok.pre_tokenizer
    if isinstance(pre, ByteLevel) and pre.use_regex and not pre.add_prefix_space:
        return GPT2_PATTERN
    if isinstance(pre, PreTokenizerSequence) and len(pre.pre_tokenizers) == 2:
        split, byte_level = pre.pre_tokenizers
        if isinstance(split, Split) and split.is_regex and split.behavior == "Isolated" and not split.invert \
                and isinstance(byte_level, ByteLevel) and not byte_level.use_regex and not byte_level.add_prefix_space:
            return split.pattern
    return None


def tiktoken_encoder(tok):
    """A tiktoken Encoding equivalent to tok, or None when tok is not plain byte-level BPE or the library is
    missing."""
    model = tok.model
    pattern = _tiktoken_pattern(tok)
    if pattern is None or tok.normalizer is not None or tok.post_processor is not None or not isinstance(model, BPE):
        return None
    if model.prefix or model.suffix or model.byte_fallback or model.unk_token is not None or model.ignore_merges:
        return None
    if any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in tok.added_tokens):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    added = {t.content for t in tok.added_tokens}
    ranks: dict[bytes, int] = {}
    for token, i in model.vocab.items():
        if token in added:
            continue
        try:
            ranks[symbols_to_bytes(token)] = i
        except ValueError:
            return None  # a token outside the byte alphabet: not a byte-level vocab
    if len(ranks) != len(model.vocab) - len(added & set(model.vocab)):
        return None  # two tokens spell the same bytes
    last = -1
    for a, b in model.merges:  # merged tokens must be ranked in merge order
        i = model.vocab[a + b]
        if i <= last:
            return None
        last = i
    return tiktoken.Encoding("llmlab", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={t.content: t.id for t in tok.added_tokens})


def fast_encoder(tok):
    """A function (texts, add_special_tokens, parse_special) -> ids lists, or None when no library applies."""
    enc = tiktoken_encoder(tok)
    if enc is not None:
        specials = {t.content for t in tok.added_tokens if t.special}
        plain_added = {t.content for t in tok.added_tokens if not t.special}

        def encode_tiktoken(texts, add_special_tokens=True, parse_special=True):
            allowed = specials | plain_added if parse_special else plain_added
            return enc.encode_batch(texts, allowed_special=allowed, disallowed_special=())

        return encode_tiktoken
    try:
        import tokenizers
    except ImportError:
        return None
    try:
        lib = tokenizers.Tokenizer.from_str(json.dumps(tok.to_hf_dict()))
    except Exception:  # a pipeline the library cannot express: stay in Python
        return None

    def encode_tokenizers(texts, add_special_tokens=True, parse_special=True):
        lib.encode_special_tokens = not parse_special  # "split special tokens" in the library's terms
        return [e.ids for e in lib.encode_batch(texts, add_special_tokens=add_special_tokens)]

    return encode_tokenizers
