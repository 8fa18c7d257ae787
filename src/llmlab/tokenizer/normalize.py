"""Normalizers (the first stage of a tokenizer pipeline), BERT's included (Devlin et al. 2019).

Each normalizer maps str -> str and reads/writes its Hugging Face tokenizer.json object (to_hf / from_hf).
BERT's (google-research/bert `tokenization.py`) is

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

import regex

from .vocab import CACHE_LIMIT

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


class CharTable(dict):
    """A `str.translate` table built on demand: the first time a character is seen, `rule(char)` gives its
    replacement (a string, "" to delete) and the answer is kept. A text then costs one C-level pass instead of
    Python code per character, and stays exactly what the per-character rule says."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def __missing__(self, cp: int) -> str:
        if len(self) >= CACHE_LIMIT:  # a text of every code point should not keep them all
            self.clear()
        out = self[cp] = self.rule(chr(cp))
        return out


def _clean_char(c: str) -> str:
    return "" if c == "\x00" or c == "\ufffd" or is_control(c) else " " if c in _WHITE_SPACE else c


_CLEAN = CharTable(_clean_char)
_CHINESE = CharTable(lambda c: f" {c} " if is_chinese_char(c) else c)
_LOWER = CharTable(str.lower)  # per character: no final-sigma rule
_DROP_MARKS = CharTable(lambda c: "" if unicodedata.category(c).startswith("M") else c)


def clean_text(text: str) -> str:
    return text.translate(_CLEAN)


def handle_chinese_chars(text: str) -> str:
    return text.translate(_CHINESE)


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def lowercase(text: str) -> str:
    return text.translate(_LOWER)


def _reorderable(c: str) -> bool:
    """Whether c's decomposition keeps a combining mark (class > 0) that is not Mn, i.e. one that survives
    strip_accents and that NFD's canonical ordering could move past another such mark."""
    return any(unicodedata.combining(d) and unicodedata.category(d) != "Mn" for d in unicodedata.normalize("NFD", c))


_BERT_TABLES: dict[tuple, CharTable] = {}


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
        self._strip = self.strip_accents or (self.strip_accents is None and self.lowercase)
        # Every step is a per-character map except NFD's canonical reordering of combining marks, so the whole
        # normalizer is one translate table (shared by instances with the same options); texts holding marks
        # that reordering could move take the step-by-step path.
        key = (self.clean_text, self.handle_chinese_chars, self._strip, self.lowercase)
        if key not in _BERT_TABLES:
            _BERT_TABLES[key] = CharTable(self._normalize_char)
            _BERT_TABLES[key].reorderable = set()
        self._table = _BERT_TABLES[key]

    def __call__(self, text: str) -> str:
        return self.normalize(text)

    def _normalize_char(self, c: str) -> str:
        if self._strip and _reorderable(c):
            self._table.reorderable.add(c)
        return self._normalize_steps(c)

    def _normalize_steps(self, text: str) -> str:
        if self.clean_text:
            text = clean_text(text)
        if self.handle_chinese_chars:
            text = handle_chinese_chars(text)
        if self._strip:
            text = strip_accents(text)
        if self.lowercase:
            text = lowercase(text)
        return text

    def normalize(self, text: str) -> str:
        out = text.translate(self._table)
        if self._table.reorderable and not self._table.reorderable.isdisjoint(text):
            return self._normalize_steps(text)
        return out

    def to_hf(self) -> dict:
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


# Whitespace becomes one space and each punctuation character gets a space on both sides; splitting on " "
# then gives exactly BertPreTokenizer's pieces.
_BERT_SPLIT = CharTable(lambda c: " " if c in _WHITE_SPACE else f" {c} " if is_punctuation(c) else c)


def bert_pretokenize(text: str) -> list[str]:
    """Split on whitespace (removed) and isolate each punctuation character, like BertPreTokenizer."""
    return [p for p in text.translate(_BERT_SPLIT).split(" ") if p]


# --- the pipeline's normalizers, one class per tokenizer.json "type" --------------------------------------


class UnicodeNormalizer:
    """NFC, NFD, NFKC or NFKD (Unicode Standard Annex #15)."""

    def __init__(self, form: str):
        if form not in ("NFC", "NFD", "NFKC", "NFKD"):
            raise ValueError(f"unknown Unicode normalization form {form!r}; use NFC, NFD, NFKC or NFKD")
        self.form = form

    def __call__(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)

    def to_hf(self) -> dict:
        return {"type": self.form}


class Lowercase:
    def __call__(self, text: str) -> str:
        return lowercase(text)

    def to_hf(self) -> dict:
        return {"type": "Lowercase"}


class StripAccents:
    """Drop combining marks (M* categories); put NFD in front to strip accents from precomposed letters."""

    def __call__(self, text: str) -> str:
        return text.translate(_DROP_MARKS)

    def to_hf(self) -> dict:
        return {"type": "StripAccents"}


class Strip:
    """Remove leading and/or trailing whitespace."""

    def __init__(self, left: bool = True, right: bool = True):
        self.left, self.right = bool(left), bool(right)

    def __call__(self, text: str) -> str:
        ws = "".join(_WHITE_SPACE)
        if self.left:
            text = text.lstrip(ws)
        if self.right:
            text = text.rstrip(ws)
        return text

    def to_hf(self) -> dict:
        return {"type": "Strip", "strip_left": self.left, "strip_right": self.right}


def pattern_from_hf(pattern, where: str) -> tuple[str, bool]:
    """A tokenizer.json pattern {"String": s} or {"Regex": r} -> (text, is_regex)."""
    if isinstance(pattern, dict) and len(pattern) == 1:
        (kind, value), = pattern.items()
        if kind in ("String", "Regex") and isinstance(value, str):
            return value, kind == "Regex"
    raise ValueError(f"{where}: pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}, got {pattern!r}")


def compile_pattern(text: str, is_regex: bool) -> "regex.Pattern":
    try:
        return regex.compile(text if is_regex else regex.escape(text))
    except regex.error as e:
        raise ValueError(f"invalid regex {text!r}: {e}") from None


class Replace:
    """Replace every match of a literal string or a regex with content (e.g. " " -> "▁" for sentencepiece)."""

    def __init__(self, pattern: str, content: str, is_regex: bool = False):
        self.pattern, self.content, self.is_regex = pattern, content, is_regex
        self._re = compile_pattern(pattern, is_regex)

    def __call__(self, text: str) -> str:
        return self._re.sub(lambda m: self.content, text)

    def to_hf(self) -> dict:
        return {"type": "Replace", "pattern": {"Regex" if self.is_regex else "String": self.pattern},
                "content": self.content}


class Prepend:
    """Put a prefix in front of non-empty text (sentencepiece's dummy prefix "▁")."""

    def __init__(self, prepend: str):
        self.prepend = prepend

    def __call__(self, text: str) -> str:
        return self.prepend + text if text else text

    def to_hf(self) -> dict:
        return {"type": "Prepend", "prepend": self.prepend}


class NormalizerSequence:
    def __init__(self, normalizers: list):
        self.normalizers = list(normalizers)

    def __call__(self, text: str) -> str:
        for n in self.normalizers:
            text = n(text)
        return text

    def to_hf(self) -> dict:
        return {"type": "Sequence", "normalizers": [n.to_hf() for n in self.normalizers]}


def _replace_from_hf(d: dict) -> Replace:
    pattern, is_regex = pattern_from_hf(d.get("pattern"), "Replace normalizer")
    return Replace(pattern, _str(d, "content"), is_regex)

_NORMALIZERS = {
    "NFC": lambda d: UnicodeNormalizer("NFC"),
    "NFD": lambda d: UnicodeNormalizer("NFD"),
    "NFKC": lambda d: UnicodeNormalizer("NFKC"),
    "NFKD": lambda d: UnicodeNormalizer("NFKD"),
    "Lowercase": lambda d: Lowercase(),
    "StripAccents": lambda d: StripAccents(),
    "Strip": lambda d: Strip(d.get("strip_left", True), d.get("strip_right", True)),
    "Replace": _replace_from_hf,
    "Prepend": lambda d: Prepend(_str(d, "prepend")),
    "BertNormalizer": lambda d: BertNormalizer.from_hf_dict(d),
    "Sequence": lambda d: NormalizerSequence([normalizer_from_hf(n) for n in _list(d, "normalizers")]),
}


def _str(d: dict, key: str) -> str:
    if not isinstance(d.get(key), str):
        raise ValueError(f"{d.get('type')}.{key} must be a string, got {d.get(key)!r}")
    return d[key]


def _list(d: dict, key: str) -> list:
    if not isinstance(d.get(key), list):
        raise ValueError(f"{d.get('type')}.{key} must be a list, got {d.get(key)!r}")
    return d[key]


def normalizer_from_hf(d: dict | None):
    """A tokenizer.json "normalizer" object -> a callable normalizer (None stays None)."""
    if d is None:
        return None
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _NORMALIZERS:
        raise ValueError(f"unsupported normalizer {kind!r}; supported: {', '.join(_NORMALIZERS)}")
    return _NORMALIZERS[kind](d)
