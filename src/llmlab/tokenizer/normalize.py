"""BERT text normalization and pre-tokenization (Devlin et al. 2019, google-research/bert `tokenization.py`).

Written to match Hugging Face `tokenizers`' BertNormalizer and BertPreTokenizer character for character,
since those (not the original Python code) define what tokenizer.json files mean:

- clean_text: drop U+0000, U+FFFD and "other" characters (categories Cc, Cf, Co, Cs -- not unassigned Cn),
  except that tab, newline and carriage return count as whitespace; every whitespace char becomes " ".
  Whitespace is the Unicode White_Space property (Rust's char::is_whitespace), not Python's str.isspace(),
  which also accepts U+001C..U+001F (those are control characters here and are dropped).
- handle_chinese_chars: put spaces around CJK ideographs (the code-point blocks below, as in BERT).
- strip_accents: NFD, then drop nonspacing marks (category Mn only; Mc / Me stay). None means "follow lowercase".
- lowercase: per character (no final-sigma context rule, unlike str.lower(): "ΣΑΣ" -> "σασ").

The pre-tokenizer splits on whitespace (dropped) and isolates every punctuation character: Unicode P*
categories plus all ASCII punctuation/symbols (so "$", "^", "`", "~", "+" ... split too, but "€" does not).
"""

import unicodedata

# Unicode White_Space property (what Rust's char::is_whitespace tests).
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_OTHER_CATEGORIES = frozenset(("Cc", "Cf", "Co", "Cs"))
_ASCII_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

# CJK Unified Ideographs blocks, as in BERT / `tokenizers` (not Hangul, Hiragana or Katakana).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def is_whitespace(c: str) -> bool:
    return c in _WHITE_SPACE


def is_control(c: str) -> bool:
    """Characters clean_text drops (tab, newline and carriage return are whitespace instead)."""
    if c in "\t\n\r":
        return False
    return unicodedata.category(c) in _OTHER_CATEGORIES


def is_chinese_char(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def is_punctuation(c: str) -> bool:
    """BERT's punctuation: ASCII punctuation/symbols or any Unicode P* category."""
    return c in _ASCII_PUNCT or unicodedata.category(c).startswith("P")


def clean_text(text: str) -> str:
    return "".join(
        " " if c in _WHITE_SPACE else c
        for c in text
        if c != "\x00" and c != "\ufffd" and not is_control(c)
    )


def handle_chinese_chars(text: str) -> str:
    return "".join(f" {c} " if is_chinese_char(c) else c for c in text)


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def lowercase(text: str) -> str:
    return "".join(c.lower() for c in text)


class BertNormalizer:
    """Same options and defaults as `tokenizers.normalizers.BertNormalizer`."""

    def __init__(
        self,
        clean_text: bool = True,
        handle_chinese_chars: bool = True,
        strip_accents: bool | None = None,
        lowercase: bool = True,
    ):
        self.clean_text = bool(clean_text)
        self.handle_chinese_chars = bool(handle_chinese_chars)
        self.strip_accents = None if strip_accents is None else bool(strip_accents)
        self.lowercase = bool(lowercase)

    def __call__(self, text: str) -> str:
        return self.normalize(text)

    def normalize(self, text: str) -> str:
        if self.clean_text:
            text = clean_text(text)
        if self.handle_chinese_chars:
            text = handle_chinese_chars(text)
        if self.strip_accents or (self.strip_accents is None and self.lowercase):
            text = strip_accents(text)
        if self.lowercase:
            text = lowercase(text)
        return text

    def to_hf_dict(self) -> dict:
        return {
            "type": "BertNormalizer",
            "clean_text": self.clean_text,
            "handle_chinese_chars": self.handle_chinese_chars,
            "strip_accents": self.strip_accents,
            "lowercase": self.lowercase,
        }

    @classmethod
    def from_hf_dict(cls, data: dict) -> "BertNormalizer":
        if not isinstance(data, dict) or data.get("type") != "BertNormalizer":
            raise ValueError(f"unsupported normalizer {data!r}: only BertNormalizer is supported")
        opts = {}
        for key in ("clean_text", "handle_chinese_chars", "lowercase"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise ValueError(f"BertNormalizer.{key} must be true or false, got {data[key]!r}")
                opts[key] = data[key]
        sa = data.get("strip_accents")
        if sa is not None and not isinstance(sa, bool):
            raise ValueError(f"BertNormalizer.strip_accents must be true, false or null, got {sa!r}")
        return cls(strip_accents=sa, **opts)


def bert_pretokenize(text: str) -> list[str]:
    """Split on whitespace (removed) and isolate each punctuation character, like BertPreTokenizer."""
    pieces: list[str] = []
    cur: list[str] = []
    for c in text:
        if c in _WHITE_SPACE:
            if cur:
                pieces.append("".join(cur))
                cur = []
        elif is_punctuation(c):
            if cur:
                pieces.append("".join(cur))
                cur = []
            pieces.append(c)
        else:
            cur.append(c)
    if cur:
        pieces.append("".join(cur))
    return pieces
