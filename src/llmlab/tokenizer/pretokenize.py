"""Pre-tokenizers: split normalized text into pieces that the model encodes separately (merges never cross
a piece boundary). One class per Hugging Face tokenizer.json "type", each matching `tokenizers` exactly.

A pre-tokenizer maps a list of pieces to a finer list. `at_start` says whether the first piece begins the
whole input: Metaspace's prepend_scheme "first" adds its "▁" only there (not after an added token).
"""

import re
import unicodedata
from collections.abc import Callable

import regex

from .bytelevel import BYTE_TO_UNICODE, pretokenize
from .normalize import _WHITE_SPACE, bert_pretokenize, compile_pattern, is_punctuation, pattern_from_hf

# GPT-4's cl100k_base split (also Llama 3's): contractions in any case, letters with one optional leading
# non-letter, numbers in groups of at most 3 digits, punctuation runs with trailing newlines, newline runs.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")
# Latin-1 code point b -> GPT-2's printable symbol for byte b, for str.translate (C speed).
_BYTE_SYMBOLS = dict(BYTE_TO_UNICODE)


def byte_symbols(piece: str) -> str:
    """UTF-8 bytes of piece as GPT-2's byte alphabet."""
    return piece.encode("utf-8").decode("latin-1").translate(_BYTE_SYMBOLS)


def split_spans(text: str, spans: list[tuple[int, int]], behavior: str) -> list[str]:
    """Split text around the delimiter spans (sorted, disjoint) the way `tokenizers`' SplitDelimiterBehavior
    does; empty pieces are dropped."""
    parts: list[tuple[str, bool]] = []  # (text, is_delimiter)
    pos = 0
    for s, e in spans:
        if s > pos:
            parts.append((text[pos:s], False))
        if e > s:
            parts.append((text[s:e], True))
        pos = e
    if pos < len(text):
        parts.append((text[pos:], False))
    if behavior == "Removed":
        return [p for p, d in parts if not d]
    if behavior == "Isolated":
        return [p for p, _ in parts]
    out: list[str] = []
    if behavior == "MergedWithPrevious":
        prev_delim = True  # a leading delimiter has nothing before it and stands alone
        for p, d in parts:
            if d and out and not prev_delim:
                out[-1] += p
            else:
                out.append(p)
            prev_delim = d
    elif behavior == "MergedWithNext":
        pending = ""
        for p, d in parts:
            if d:
                if pending:
                    out.append(pending)
                pending = p
            else:
                out.append(pending + p)
                pending = ""
        if pending:
            out.append(pending)
    elif behavior == "Contiguous":
        prev_delim = False
        for p, d in parts:
            if d and prev_delim:
                out[-1] += p
            else:
                out.append(p)
            prev_delim = d
    else:
        raise ValueError(f"unknown split behavior {behavior!r}; use one of {', '.join(_BEHAVIORS)}")
    return out


class ByteLevel:
    """GPT-2's pre-tokenizer: optionally add a leading space, split with the GPT-2 regex, then spell each
    piece's UTF-8 bytes in the byte alphabet (so the model never meets an unknown symbol)."""

    def __init__(self, add_prefix_space: bool = False, use_regex: bool = True, trim_offsets: bool = True):
        self.add_prefix_space, self.use_regex, self.trim_offsets = add_prefix_space, use_regex, trim_offsets

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        out = []
        for p in pieces:
            if self.add_prefix_space and p and not p.startswith(" "):
                p = " " + p
            out.extend(map(byte_symbols, pretokenize(p) if self.use_regex else [p]))
        return out

    def to_hf(self) -> dict:
        return {"type": "ByteLevel", "add_prefix_space": self.add_prefix_space, "trim_offsets": self.trim_offsets,
                "use_regex": self.use_regex}


class Split:
    """Split on a literal string or a regex (e.g. GPT4_PATTERN with behavior "Isolated"); invert=True makes
    the matches the pieces and the text between them the delimiters."""

    def __init__(self, pattern: str, behavior: str = "Isolated", invert: bool = False, is_regex: bool = True):
        if behavior not in _BEHAVIORS:
            raise ValueError(f"unknown split behavior {behavior!r}; use one of {', '.join(_BEHAVIORS)}")
        self.pattern, self.behavior, self.invert, self.is_regex = pattern, behavior, invert, is_regex
        self._re = compile_pattern(pattern, is_regex)

    def _split(self, text: str) -> list[str]:
        spans = [m.span() for m in self._re.finditer(text) if m.end() > m.start()]
        if self.invert:  # the gaps between matches become the delimiters
            gaps, pos = [], 0
            for s, e in spans:
                gaps.append((pos, s))
                pos = e
            gaps.append((pos, len(text)))
            spans = [(s, e) for s, e in gaps if e > s]
        return split_spans(text, spans, self.behavior)

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        return [q for p in pieces for q in self._split(p)]

    def to_hf(self) -> dict:
        return {"type": "Split", "pattern": {"Regex" if self.is_regex else "String": self.pattern},
                "behavior": self.behavior, "invert": self.invert}


def _char_runs(text: str, test) -> list[tuple[int, int]]:
    return [(i, i + 1) for i, c in enumerate(text) if test(c)]


_ASCII_DIGIT = re.compile(r"[0-9]")  # the only numeric characters in ASCII


def _is_numeric(c: str) -> bool:
    return unicodedata.category(c) in ("Nd", "Nl", "No")  # Rust's char::is_numeric, not str.isnumeric


def _digit_spans(text: str) -> list[tuple[int, int]]:
    if text.isascii():
        return [m.span() for m in _ASCII_DIGIT.finditer(text)]
    return _char_runs(text, _is_numeric)


class Digits:
    """Isolate numbers: each digit alone (individual_digits, as Llama and SmolLM do) or whole digit runs."""

    def __init__(self, individual_digits: bool = False):
        self.individual_digits = individual_digits

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        behavior = "Isolated" if self.individual_digits else "Contiguous"
        return [q for p in pieces for q in split_spans(p, _digit_spans(p), behavior)]

    def to_hf(self) -> dict:
        return {"type": "Digits", "individual_digits": self.individual_digits}


class Punctuation:
    def __init__(self, behavior: str = "Isolated"):
        if behavior not in _BEHAVIORS:
            raise ValueError(f"unknown split behavior {behavior!r}; use one of {', '.join(_BEHAVIORS)}")
        self.behavior = behavior

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        return [q for p in pieces for q in split_spans(p, _char_runs(p, is_punctuation), self.behavior)]

    def to_hf(self) -> dict:
        return {"type": "Punctuation", "behavior": self.behavior}


class Metaspace:
    """sentencepiece's convention: spaces become "▁" and a "▁" is prepended, so word starts are marked and
    decoding is lossless; with split=True each "▁" starts a new piece."""

    def __init__(self, replacement: str = "▁", prepend_scheme: str = "always", split: bool = True):
        if len(replacement) != 1:
            raise ValueError(f"Metaspace replacement must be one character, got {replacement!r}")
        if prepend_scheme not in ("always", "first", "never"):
            raise ValueError(f"Metaspace prepend_scheme must be 'always', 'first' or 'never', got {prepend_scheme!r}")
        self.replacement, self.prepend_scheme, self.split = replacement, prepend_scheme, split

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        out = []
        for j, p in enumerate(pieces):
            p = p.replace(" ", self.replacement)
            first = at_start and j == 0
            if (self.prepend_scheme == "always" or (self.prepend_scheme == "first" and first)) \
                    and not p.startswith(self.replacement):
                p = self.replacement + p
            if self.split:  # split_spans(p, <each replacement>, "MergedWithNext"), without a per-character loop
                head, *rest = p.split(self.replacement)
                if head:
                    out.append(head)
                out.extend([self.replacement + q for q in rest])
            else:
                out.append(p)
        return out

    def to_hf(self) -> dict:
        return {"type": "Metaspace", "replacement": self.replacement, "prepend_scheme": self.prepend_scheme,
                "split": self.split}


class Whitespace:
    """Pieces are runs of word characters or runs of other non-space characters (\\w+|[^\\w\\s]+)."""

    _re = regex.compile(r"\w+|[^\w\s]+")

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        return [q for p in pieces for q in self._re.findall(p)]

    def to_hf(self) -> dict:
        return {"type": "Whitespace"}


class WhitespaceSplit:
    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        return [q for p in pieces for q in split_spans(p, _char_runs(p, _WHITE_SPACE.__contains__), "Removed")]

    def to_hf(self) -> dict:
        return {"type": "WhitespaceSplit"}


class BertPreTokenizer:
    """Split on whitespace (dropped) and isolate every punctuation character (see normalize.py)."""

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        return [q for p in pieces for q in bert_pretokenize(p)]

    def to_hf(self) -> dict:
        return {"type": "BertPreTokenizer"}


class PreTokenizerSequence:
    def __init__(self, pre_tokenizers: list):
        self.pre_tokenizers = list(pre_tokenizers)

    def __call__(self, pieces: list[str], at_start: bool = True) -> list[str]:
        for p in self.pre_tokenizers:
            pieces = p(pieces, at_start)
        return pieces

    def to_hf(self) -> dict:
        return {"type": "Sequence", "pretokenizers": [p.to_hf() for p in self.pre_tokenizers]}


def _split_from_hf(d: dict) -> Split:
    pattern, is_regex = pattern_from_hf(d.get("pattern"), "Split pre-tokenizer")
    return Split(pattern, d.get("behavior", "Isolated"), bool(d.get("invert", False)), is_regex)


def _metaspace_from_hf(d: dict) -> Metaspace:
    scheme = d.get("prepend_scheme")
    if scheme is None:  # files from before prepend_scheme existed say add_prefix_space
        scheme = "always" if d.get("add_prefix_space", True) else "never"
    return Metaspace(d.get("replacement", "▁"), scheme, bool(d.get("split", True)))


def _sequence_from_hf(d: dict) -> PreTokenizerSequence:
    items = d.get("pretokenizers")
    if not isinstance(items, list):
        raise ValueError(f"Sequence pre-tokenizer needs a 'pretokenizers' list, got {items!r}")
    return PreTokenizerSequence([pre_tokenizer_from_hf(p) for p in items])


_PRE_TOKENIZERS = {
    "ByteLevel": lambda d: ByteLevel(bool(d.get("add_prefix_space", False)), bool(d.get("use_regex", True)),
                                     bool(d.get("trim_offsets", True))),
    "Split": _split_from_hf,
    "Digits": lambda d: Digits(bool(d.get("individual_digits", False))),
    "Punctuation": lambda d: Punctuation(d.get("behavior", "Isolated")),
    "Metaspace": _metaspace_from_hf,
    "Whitespace": lambda d: Whitespace(),
    "WhitespaceSplit": lambda d: WhitespaceSplit(),
    "BertPreTokenizer": lambda d: BertPreTokenizer(),
    "Sequence": _sequence_from_hf,
}


def pre_tokenizer_from_hf(d: dict | None):
    """A tokenizer.json "pre_tokenizer" object -> a pre-tokenizer (None stays None)."""
    if d is None:
        return None
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _PRE_TOKENIZERS:
        raise ValueError(f"unsupported pre_tokenizer {kind!r}; supported: {', '.join(_PRE_TOKENIZERS)}")
    return _PRE_TOKENIZERS[kind](d)


def ends_in_byte_level(pre_tokenizer) -> bool:
    """Whether the pipeline's last pre-tokenizer is ByteLevel (then the model sees byte-alphabet pieces)."""
    while isinstance(pre_tokenizer, PreTokenizerSequence) and pre_tokenizer.pre_tokenizers:
        pre_tokenizer = pre_tokenizer.pre_tokenizers[-1]
    return isinstance(pre_tokenizer, ByteLevel)


def raw_piece_split(pre_tokenizer) -> Callable[[str], list[str]] | None:
    """text -> the pieces the pre-tokenizer makes, before ByteLevel spells them in the byte alphabet, for
    pipelines that only cut the raw text and end in ByteLevel without a prefix space: GPT-2's ByteLevel alone,
    SmolLM2's Digits then ByteLevel, Llama 3's Split then ByteLevel without its regex. Such a tokenizer can
    cache its ids by the raw piece and merge new pieces in batches. None for any other pipeline."""
    steps = pre_tokenizer.pre_tokenizers if isinstance(pre_tokenizer, PreTokenizerSequence) else [pre_tokenizer]
    if not steps:
        return None
    *cuts, last = steps
    if not isinstance(last, ByteLevel) or last.add_prefix_space or not all(type(c) in (Digits, Split) for c in cuts):
        return None
    if not cuts:
        return pretokenize if last.use_regex else lambda text: [text] if text else []

    def split(text: str) -> list[str]:
        pieces = [text]
        for cut in cuts:
            pieces = cut(pieces)
        return [q for p in pieces for q in pretokenize(p)] if last.use_regex else [p for p in pieces if p]

    return split
