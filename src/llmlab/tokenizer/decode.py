"""Decoders: token strings -> text, the last stage of a tokenizer pipeline. One class per Hugging Face
tokenizer.json decoder "type"; each maps a list of token strings to a list of strings that are then joined,
as `tokenizers` does, so a Sequence of decoders composes the same way."""

import regex

from .bytelevel import UNICODE_TO_BYTE
from .normalize import compile_pattern, pattern_from_hf

_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")
# `tokenizers`' WordPiece cleanup, applied to each token after its joining space is added.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def cleanup(s: str) -> str:
    for a, b in _CLEANUPS:
        s = s.replace(a, b)
    return s


class ByteLevelDecoder:
    """Byte-alphabet symbols back to bytes, then UTF-8 (invalid sequences become U+FFFD). A token with a
    character outside the alphabet (an added token such as "<|im_end|>") contributes its own UTF-8 bytes."""

    def __call__(self, tokens: list[str]) -> list[str]:
        out = bytearray()
        for t in tokens:
            try:
                out += bytes(UNICODE_TO_BYTE[c] for c in t)
            except KeyError:
                out += t.encode("utf-8")
        return [out.decode("utf-8", errors="replace")]

    def to_hf(self) -> dict:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


class WordPieceDecoder:
    """"##" pieces glue to the previous token, other tokens get a space; cleanup removes spaces before
    punctuation and in a few English contractions."""

    def __init__(self, prefix: str = "##", cleanup: bool = True):
        self.prefix, self.cleanup = prefix, cleanup

    def __call__(self, tokens: list[str]) -> list[str]:
        out = []
        for i, t in enumerate(tokens):
            if i:
                t = t[len(self.prefix):] if t.startswith(self.prefix) else " " + t
            out.append(cleanup(t) if self.cleanup else t)
        return out

    def to_hf(self) -> dict:
        return {"type": "WordPiece", "prefix": self.prefix, "cleanup": self.cleanup}


class MetaspaceDecoder:
    """"▁" back to spaces; the space that the pre-tokenizer prepended to the first word is dropped."""

    def __init__(self, replacement: str = "▁", prepend_scheme: str = "always", split: bool = True):
        self.replacement, self.prepend_scheme, self.split = replacement, prepend_scheme, split

    def __call__(self, tokens: list[str]) -> list[str]:
        out = []
        for i, t in enumerate(tokens):
            t = t.replace(self.replacement, " ")
            if i == 0 and self.prepend_scheme != "never" and t.startswith(" "):
                t = t[1:]
            out.append(t)
        return out

    def to_hf(self) -> dict:
        return {"type": "Metaspace", "replacement": self.replacement, "prepend_scheme": self.prepend_scheme,
                "split": self.split}


class ByteFallbackDecoder:
    """Runs of "<0xXX>" tokens become the UTF-8 text they spell; if a run is not valid UTF-8, each of its
    byte tokens becomes one U+FFFD."""

    def __call__(self, tokens: list[str]) -> list[str]:
        out: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                try:
                    out.append(bytes(run).decode("utf-8"))
                except UnicodeDecodeError:
                    out.extend("\ufffd" * len(run))
                run.clear()

        for t in tokens:
            m = _BYTE_TOKEN.fullmatch(t) if len(t) == 6 else None
            if m:
                run.append(int(m.group(1), 16))
            else:
                flush()
                out.append(t)
        flush()
        return out

    def to_hf(self) -> dict:
        return {"type": "ByteFallback"}


class FuseDecoder:
    def __call__(self, tokens: list[str]) -> list[str]:
        return ["".join(tokens)]

    def to_hf(self) -> dict:
        return {"type": "Fuse"}


class ReplaceDecoder:
    def __init__(self, pattern: str, content: str, is_regex: bool = False):
        self.pattern, self.content, self.is_regex = pattern, content, is_regex
        self._re = compile_pattern(pattern, is_regex)

    def __call__(self, tokens: list[str]) -> list[str]:
        return [self._re.sub(lambda m: self.content, t) for t in tokens]

    def to_hf(self) -> dict:
        return {"type": "Replace", "pattern": {"Regex" if self.is_regex else "String": self.pattern},
                "content": self.content}


class StripDecoder:
    """Remove up to `start` leading and `stop` trailing copies of a character from each token."""

    def __init__(self, content: str = " ", start: int = 0, stop: int = 0):
        self.content, self.start, self.stop = content, start, stop

    def __call__(self, tokens: list[str]) -> list[str]:
        out = []
        for t in tokens:
            a, b = 0, len(t)
            while a < min(self.start, b) and t[a] == self.content:
                a += 1
            while b > a and len(t) - b < self.stop and t[b - 1] == self.content:
                b -= 1
            out.append(t[a:b])
        return out

    def to_hf(self) -> dict:
        return {"type": "Strip", "content": self.content, "start": self.start, "stop": self.stop}


class BPEDecoder:
    """Original-BPE style: an end-of-word suffix (e.g. "</w>") becomes a space (none after the last token)."""

    def __init__(self, suffix: str = "</w>"):
        self.suffix = suffix

    def __call__(self, tokens: list[str]) -> list[str]:
        n = len(tokens)
        return [t.replace(self.suffix, "" if i == n - 1 else " ") for i, t in enumerate(tokens)]

    def to_hf(self) -> dict:
        return {"type": "BPEDecoder", "suffix": self.suffix}


class DecoderSequence:
    def __init__(self, decoders: list):
        self.decoders = list(decoders)

    def __call__(self, tokens: list[str]) -> list[str]:
        for d in self.decoders:
            tokens = d(tokens)
        return tokens

    def to_hf(self) -> dict:
        return {"type": "Sequence", "decoders": [d.to_hf() for d in self.decoders]}


def _replace_from_hf(d: dict) -> ReplaceDecoder:
    pattern, is_regex = pattern_from_hf(d.get("pattern"), "Replace decoder")
    return ReplaceDecoder(pattern, d.get("content", ""), is_regex)


def _metaspace_from_hf(d: dict) -> MetaspaceDecoder:
    scheme = d.get("prepend_scheme")
    if scheme is None:
        scheme = "always" if d.get("add_prefix_space", True) else "never"
    return MetaspaceDecoder(d.get("replacement", "▁"), scheme, bool(d.get("split", True)))


def _sequence_from_hf(d: dict) -> DecoderSequence:
    items = d.get("decoders")
    if not isinstance(items, list):
        raise ValueError(f"Sequence decoder needs a 'decoders' list, got {items!r}")
    return DecoderSequence([decoder_from_hf(x) for x in items])


_DECODERS = {
    "ByteLevel": lambda d: ByteLevelDecoder(),
    "WordPiece": lambda d: WordPieceDecoder(d.get("prefix", "##"), bool(d.get("cleanup", True))),
    "Metaspace": _metaspace_from_hf,
    "ByteFallback": lambda d: ByteFallbackDecoder(),
    "Fuse": lambda d: FuseDecoder(),
    "Replace": _replace_from_hf,
    "Strip": lambda d: StripDecoder(d.get("content", " "), int(d.get("start", 0)), int(d.get("stop", 0))),
    "BPEDecoder": lambda d: BPEDecoder(d.get("suffix", "</w>")),
    "Sequence": _sequence_from_hf,
}


def decoder_from_hf(d: dict | None):
    """A tokenizer.json "decoder" object -> a decoder (None stays None: tokens are then joined by spaces)."""
    if d is None:
        return None
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _DECODERS:
        raise ValueError(f"unsupported decoder {kind!r}; supported: {', '.join(_DECODERS)}")
    return _DECODERS[kind](d)
