"""Bulk encoding handed to a compiled library when one is installed, with the same ids as the Python pipeline.

- tiktoken, for plain byte-level BPE (no normalizer; the GPT-2 regex, Digits then the GPT-2 regex as SmolLM2
  has it, or one Split regex, then ByteLevel; no post-processor that adds ids): built from our own merges.
  tiktoken merges the adjacent pair whose concatenation has the lowest rank and returns ranks as ids, so this
  is exact when token ids grow with merge order and every token's own bytes merge back into that token (both
  checked here) -- true of every tokenizer we train and of SmolLM2's. (tiktoken knows no merge list: it joins
  any two adjacent tokens that spell a token, and takes a pre-token that is a token whole, as
  `ignore_merges` does.)
- `tokenizers`, for every other pipeline: our tokenizer.json loaded by the library that defined the format.
"""

import json

from .bpe import BPE
from .bytelevel import GPT2_PATTERN, symbols_to_bytes
from .postprocess import ByteLevelProcessing, TemplateProcessing
from .pretokenize import ByteLevel, Digits, PreTokenizerSequence, Split


def gpt2_after_digits_pattern(individual_digits: bool) -> str:
    """One regex for Digits (each digit alone, or digit runs) followed by GPT-2's split. Digits cuts the text at
    every number first, so a number never takes GPT-2's optional leading space, and a whitespace run just
    before a number ends its piece and stays whole: it is matched before GPT-2's `\s+(?!\S)`, which would
    leave its last space for the next piece."""
    number = r"\p{N}" if individual_digits else r"\p{N}+"
    return rf"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+|{number}| ?[^\s\p{{L}}\p{{N}}]+|\s+(?=\p{{N}})|\s+(?!\S)|\s+"""


def _tiktoken_pattern(tok) -> str | None:
    pre = tok.pre_tokenizer
    if isinstance(pre, ByteLevel) and pre.use_regex and not pre.add_prefix_space:
        return GPT2_PATTERN
    if isinstance(pre, PreTokenizerSequence) and len(pre.pre_tokenizers) == 2:
        first, byte_level = pre.pre_tokenizers
        if not isinstance(byte_level, ByteLevel) or byte_level.add_prefix_space:
            return None
        if isinstance(first, Split) and first.is_regex and first.behavior == "Isolated" and not first.invert \
                and not byte_level.use_regex:
            return first.pattern
        if type(first) is Digits and byte_level.use_regex:
            return gpt2_after_digits_pattern(first.individual_digits)
    return None


def _adds_no_ids(post_processor) -> bool:
    """True when post-processing a single sequence leaves its ids as they are (SmolLM2's template is just "A")."""
    if post_processor is None or isinstance(post_processor, ByteLevelProcessing):
        return True
    return isinstance(post_processor, TemplateProcessing) and [k for k, *_ in post_processor.single] == ["seq"]


def _every_token_merges_from_its_bytes(model: BPE) -> bool:
    """Merging a token's bytes (the merge loop, never ignore_merges' whole-word look-up) gives that token: else
    tiktoken, which joins any two adjacent tokens that spell a token, would reach a token the merges never do."""
    vocab, words = model.vocab, [a + b for a, b in model.merges]
    if model.ignore_merges:  # tokenize would take each word whole
        try:
            got = [model._merge([vocab[c] for c in w]) for w in words]
        except KeyError:  # a byte without a token of its own
            return False
    else:
        got = model.tokenize_many(words)  # all at once, in numpy
    return all(ids == [vocab[w]] for ids, w in zip(got, words))


def tiktoken_encoder(tok):
    """A tiktoken Encoding equivalent to tok, or None when tok is not plain byte-level BPE or the library is
    missing."""
    model = tok.model
    pattern = _tiktoken_pattern(tok)
    if pattern is None or tok.normalizer is not None or not _adds_no_ids(tok.post_processor) or not isinstance(model, BPE):
        return None
    if model.prefix or model.suffix or model.byte_fallback or model.unk_token is not None:
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
    if not _every_token_merges_from_its_bytes(model):
        return None
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
