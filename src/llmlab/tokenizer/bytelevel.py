"""GPT-2's byte-level alphabet and pre-tokenizer (Radford et al. 2019, openai/gpt-2 `encoder.py`).

BPE works on the 256 byte values, so any string can be encoded without an unknown token. GPT-2 shows each
byte as one printable Unicode character (so vocab and merges are readable JSON strings); Hugging Face
`tokenizers` uses the same map in its ByteLevel pre-tokenizer and decoder, which is what makes our
tokenizer.json files interchangeable with theirs.
"""

import re

import regex  # the `re` module has no \p{L} / \p{N} classes, which the GPT-2 pattern needs


def _bytes_to_unicode() -> dict[int, str]:
    # Printable Latin-1 bytes keep their own character; the other 68 (control, space, ...) are shifted to
    # code points 256+ so that no token string contains whitespace or control characters.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}

# GPT-2's split: English contractions, letters, digits, other symbols (each with an optional leading space),
# and whitespace runs (the last whitespace char before a word stays with that word). Same as `tokenizers`'
# ByteLevel(use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_RE = regex.compile(GPT2_PATTERN)
# The same pattern with its classes spelled out for ASCII text, where \p{L} is [A-Za-z], \p{N} is [0-9] and \s
# is [\t\n\v\f\r ] (regex's \s is Unicode White_Space, which leaves out \x1c-\x1f): identical pieces for any
# ASCII text, and the standard library's re splits English about twice as fast as regex does the original.
_WS = r"\t\n\x0b\x0c\r "
_GPT2_ASCII_RE = re.compile(
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+""")


def pretokenize(text: str) -> list[str]:
    """Split text into GPT-2 pre-tokens; BPE merges never cross their boundaries."""
    return (_GPT2_ASCII_RE if text.isascii() else _GPT2_RE).findall(text)


def bytes_to_symbols(data: bytes) -> str:
    """Bytes -> the printable string used in vocab / merges."""
    return "".join(BYTE_TO_UNICODE[b] for b in data)


def symbols_to_bytes(symbols: str) -> bytes:
    """Inverse of bytes_to_symbols; ValueError for a character outside the 256-symbol alphabet."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in symbols)
    except KeyError as e:
        raise ValueError(f"{symbols!r} is not a byte-level token: {e.args[0]!r} is not in the byte alphabet") from None
