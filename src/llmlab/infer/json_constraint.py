"""JSON constrained decoding (the OpenAI API's response_format json_object / json_schema).

A byte-level pushdown automaton recognizes prefixes of JSON values valid under a schema; at every step the
allowed tokens are found by walking a trie of all token byte strings with the automaton (a subtree is pruned
at its first rejected byte), so the cost follows the viable prefixes, not vocab_size x token length.

The JSON we let the model write is deliberately narrow so that generation is finite and fast:
- no optional whitespace except at most one space after ':' and ',' (none at the start, end, or before ':');
- strings: UTF-8 text (checked, including splits of a character across tokens) without raw control bytes,
  escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX (no surrogate \\u escapes); at most maxLength characters
  (default 256; 64 for free-form keys);
- numbers: JSON grammar, at most 24 bytes, exponent at most 2 digits; "integer" means no fraction/exponent;
- objects with "properties": keys in the schema's order, optional ones may be skipped, and no other keys
  (additionalProperties: false is implied); objects without "properties": any keys (duplicates are not
  tracked), values under additionalProperties (a schema) or any JSON value;
- enum / const (strings, numbers, booleans, null) must be written exactly as json.dumps(v, ensure_ascii=False);
- "any value" (schema None's values, {} schemas) nests at most 5 containers deep.
Supported keywords: type (a name or a list), properties, required, additionalProperties, items, minItems,
maxItems, minLength, maxLength, minProperties/maxProperties (objects without properties), enum,
const, anyOf (branches must start with different characters), and the
annotations title/description/default/examples/$schema/$id/$comment. Anything else raises ValueError.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence

import regex
import torch

from ..tokenizer.bytelevel import UNICODE_TO_BYTE
from ..tokenizer.decode import ByteLevelDecoder, WordPieceDecoder
from ..tokenizer.pretokenize import ByteLevel

MAX_STRING = 256
MAX_KEY = 64
MAX_NUMBER = 24
MAX_DEPTH = 5
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment"}
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
             "minLength", "maxLength", "enum", "const", "anyOf", "minProperties",
             "maxProperties"} | _ANNOTATIONS


# --- schema -> nodes ----------------------------------------------------------------------------------------
# Nodes are plain classes (hashed by identity) so automaton states built from them can key the mask cache.

class _Obj:
    def __init__(self, props: list[tuple[bytes, object, bool]] | None, free_value: object = None, lo: int = 0,
                 hi: int | None = None):
        self.props = props or []  # (quoted key bytes, value node, required), schema order
        self.free_value = free_value  # value node for free-form objects (no "properties")
        self.lo, self.hi = lo, hi  # minProperties / maxProperties of free-form objects


class _Arr:
    def __init__(self, item: object, lo: int, hi: int | None):
        self.item, self.lo, self.hi = item, lo, hi


class _Str:
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi


class _Num:
    def __init__(self, integer: bool):
        self.integer = integer


class _Lit:
    def __init__(self, options: tuple[bytes, ...]):
        self.options = options


class _Union:
    def __init__(self, by_first: dict[int, object]):
        self.by_first = by_first  # first byte -> branch; disjoint, so the automaton stays deterministic


_NUM_FIRST = set(b"-0123456789")


def _first_bytes(node: object) -> set[int]:
    if isinstance(node, _Union):
        return set(node.by_first)
    if isinstance(node, _Lit):
        return {o[0] for o in node.options}
    return {_Obj: {0x7B}, _Arr: {0x5B}, _Str: {0x22}, _Num: _NUM_FIRST}[type(node)]


def _union(branches: list[object], where: str) -> object:
    if len(branches) == 1:
        return branches[0]
    by_first: dict[int, object] = {}
    for b in branches:
        for c in _first_bytes(b):
            if c in by_first:
                raise ValueError(f"{where}: branches overlap (two can start with {chr(c)!r}); only unions of "
                                 "different JSON types are supported")
            by_first[c] = b.by_first[c] if isinstance(b, _Union) else b
    return _Union(by_first)


_any_cache: dict[int, object] = {}


def _any(depth: int = MAX_DEPTH) -> object:
    """Any JSON value, containers nested at most depth deep."""
    if depth not in _any_cache:
        scalars = [_Str(0, MAX_STRING), _Num(False), _Lit((b"true", b"false", b"null"))]
        inner = [_Obj(None, _any(depth - 1)), _Arr(_any(depth - 1), 0, None)] if depth > 0 else []
        _any_cache[depth] = _union(scalars + inner, "any")
    return _any_cache[depth]


def _literal(value: object, where: str) -> bytes:
    if value is None or isinstance(value, (bool, str, int, float)):
        if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{where}: {value!r} is not a JSON number")
        return json.dumps(value, ensure_ascii=False).encode()
    raise ValueError(f"{where}: only string/number/boolean/null values are supported, got {value!r}")


def _count(schema: dict, key: str, default: int | None) -> int | None:
    v = schema.get(key, default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
    return v


def _compile(schema: object, where: str = "schema") -> object:
    if schema is True or schema == {}:
        return _any()
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a schema must be an object, got {schema!r}")
    for k in schema:
        if k not in _KEYWORDS:
            raise ValueError(f"{where}: unsupported schema keyword {k!r}")
    if "anyOf" in schema:
        if set(schema) - _ANNOTATIONS - {"anyOf"} or not schema["anyOf"]:
            raise ValueError(f"{where}: anyOf must be non-empty and the only constraint at its level")
        return _union([_compile(s, f"{where}.anyOf[{i}]") for i, s in enumerate(schema["anyOf"])], where)
    types = schema.get("type")
    if isinstance(types, list):  # ["string", "null"]: one branch per type, each with the same keywords
        return _union([_compile({**schema, "type": t}, where) for t in types], where)
    if "enum" in schema or "const" in schema:
        if set(schema) - _ANNOTATIONS - {"enum", "const", "type"}:
            raise ValueError(f"{where}: enum/const can only be combined with type")
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        kinds = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,), "null": (type(None),)}
        if types is not None:
            values = [v for v in values if isinstance(v, kinds.get(types, ())) and
                      (types in ("boolean",) or not isinstance(v, bool))]
        if not values:
            raise ValueError(f"{where}: enum/const leaves no value to generate")
        return _Lit(tuple(dict.fromkeys(_literal(v, where) for v in values)))
    if types is None:
        if {"properties", "required", "additionalProperties"} & set(schema):
            types = "object"
        elif "items" in schema:
            types = "array"
        elif set(schema) - _ANNOTATIONS:
            raise ValueError(f"{where}: give a type for keywords {sorted(set(schema) - _ANNOTATIONS)}")
        else:
            return _any()
    if types == "object":
        props, required = schema.get("properties"), schema.get("required", [])
        extra = schema.get("additionalProperties", True if props is None else False)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"{where}: required must be a list of strings")
        if props:
            if {"minProperties", "maxProperties"} & set(schema):
                raise ValueError(f"{where}: minProperties/maxProperties are supported only without properties")
            if extra is not False:
                raise ValueError(f"{where}: additionalProperties other than false beside properties is not supported")
            missing = set(required) - set(props)
            if missing:
                raise ValueError(f"{where}: required {sorted(missing)} not in properties")
            return _Obj([(_literal(k, where), _compile(s, f"{where}.properties.{k}"), k in required)
                         for k, s in props.items()])
        if required:
            raise ValueError(f"{where}: required {required} needs properties")
        lo, hi = _count(schema, "minProperties", 0), _count(schema, "maxProperties", None)
        if extra is False or hi == 0:
            if lo:
                raise ValueError(f"{where}: minProperties > 0 but no property may be written")
            return _Lit((b"{}",))
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: maxProperties < minProperties")
        value = _any(MAX_DEPTH - 1) if extra is True else _compile(extra, f"{where}.additionalProperties")
        return _Obj(None, value, lo, hi)
    if types == "array":
        lo, hi = _count(schema, "minItems", 0), _count(schema, "maxItems", None)
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: maxItems < minItems")
        if isinstance(schema.get("items"), list):
            raise ValueError(f"{where}: unsupported schema keyword 'items' as a list (tuple validation)")
        return _Arr(_compile(schema.get("items", {}), f"{where}.items"), lo, hi)
    if types == "string":
        lo = _count(schema, "minLength", 0)
        hi = _count(schema, "maxLength", max(MAX_STRING, lo))
        if hi < lo:
            raise ValueError(f"{where}: maxLength < minLength")
        return _Str(lo, hi)
    if types in ("number", "integer"):
        return _Num(types == "integer")
    if types == "boolean":
        return _Lit((b"true", b"false"))
    if types == "null":
        return _Lit((b"null",))
    raise ValueError(f"{where}: unknown type {types!r}")


# --- the automaton --------------------------------------------------------------------------------------------
# A state is an immutable linked stack (frame, rest) of tuples: stepping never mutates, so forking (copy(),
# the trie walk's backtracking) is free and states are hashable. Frame kinds:
#   (_V, node, space_ok)                  expecting the start of a value of node
#   (_O, node, i, phase, cands, pos)      inside an object; i = next property index (free-form: keys so far);
#                                         cands/pos while in a key
#   (_A, node, count, phase)              inside an array
#   (_S, lo, hi, count, esc, utf8)        inside a string (esc: escape progress; utf8: pending-continuation state)
#   (_N, integer, phase, length, exp)     inside a number (exp: exponent digits so far)
#   (_L, options, pos)                    inside a literal (enum/const/true/false/null)
#   (_END,)                               the bottom: nothing may follow the value
# A container pushes its child's frame after moving itself to the "after value" phase, so a finished child
# just pops. Numbers and literals like 1 vs 12 cannot know they ended until the next byte: they pop and
# hand that byte to their parent.
_V, _O, _A, _S, _N, _L, _END = range(7)
_BOTTOM = ((_END,), None)  # the empty stack: the value is finished, no byte may follow
O_START, O_KEY_SPACE, O_KEY, O_IN_KEY, O_COLON, O_AFTER = range(6)
A_START, A_AFTER = range(2)
N_START, N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(9)
_N_ACCEPT = {N_ZERO, N_INT, N_FRAC, N_EXP}
# UTF-8 continuation states: (lowest, highest next byte, state after it). The lead byte picks the first one;
# the narrowed ranges after E0/ED/F0/F4 rule out overlong forms, surrogates and code points past U+10FFFF.
_UTF8 = [None, (0x80, 0xBF, 0), (0x80, 0xBF, 1), (0xA0, 0xBF, 1), (0x80, 0x9F, 1),
         (0x80, 0xBF, 2), (0x90, 0xBF, 2), (0x80, 0x8F, 2)]
_LEAD = {**{b: 1 for b in range(0xC2, 0xE0)}, 0xE0: 3, **{b: 2 for b in range(0xE1, 0xF0)}, 0xED: 4,
         0xF0: 6, 0xF1: 5, 0xF2: 5, 0xF3: 5, 0xF4: 7}
_HEX = set(b"0123456789abcdefABCDEF")
_SIMPLE_ESC = set(b'"\\/bfnrt')


def _start(node: object, b: int, rest: tuple | None) -> tuple | None:
    """Begin a value of node with byte b."""
    if isinstance(node, _Union):
        node = node.by_first.get(b)
        if node is None:
            return None
    if isinstance(node, _Obj):
        return ((_O, node, 0, O_START, None, 0), rest) if b == 0x7B else None
    if isinstance(node, _Arr):
        return ((_A, node, 0, A_START), rest) if b == 0x5B else None
    if isinstance(node, _Str):
        return ((_S, node.lo, node.hi, 0, 0, 0), rest) if b == 0x22 else None
    if isinstance(node, _Num):
        return _step(((_N, node.integer, N_START, 0, 0), rest), b)
    return _step(((_L, node.options, 0), rest), b)


def _number(integer: bool, phase: int, b: int) -> int | None:
    digit = 0x30 <= b <= 0x39
    if phase == N_START:
        return N_SIGN if b == 0x2D else N_ZERO if b == 0x30 else N_INT if digit else None
    if phase == N_SIGN:
        return N_ZERO if b == 0x30 else N_INT if digit else None
    if phase in (N_INT, N_DOT, N_FRAC, N_EXP, N_ESIGN, N_E) and digit:
        return {N_INT: N_INT, N_DOT: N_FRAC, N_FRAC: N_FRAC}.get(phase, N_EXP)
    if integer:
        return None
    if b == 0x2E and phase in (N_ZERO, N_INT):
        return N_DOT
    if b in (0x65, 0x45) and phase in (N_ZERO, N_INT, N_FRAC):
        return N_E
    if b in (0x2B, 0x2D) and phase == N_E:
        return N_ESIGN
    return None


def _key_candidates(node: _Obj, i: int) -> tuple:
    """Properties that may come next: from i up to and including the first required one."""
    out = []
    for j in range(i, len(node.props)):
        out.append((j, node.props[j][0]))
        if node.props[j][2]:
            break
    return tuple(out)


def _can_close(node: _Obj, i: int) -> bool:
    if node.free_value is not None:
        return i >= node.lo
    return not any(p[2] for p in node.props[i:])


def _step(stack: tuple | None, b: int) -> tuple | None:
    """The state after byte b, or None if b cannot continue a valid value."""
    while True:
        f, rest = stack
        k = f[0]
        if k == _S:
            _, lo, hi, n, esc, u = f
            if u:
                a, z, nu = _UTF8[u]
                return ((_S, lo, hi, n, 0, nu), rest) if a <= b <= z else None
            if esc == 0:
                if b == 0x22:
                    return rest if n >= lo else None
                if b < 0x20 or n >= hi:
                    return None
                if b == 0x5C:
                    return (_S, lo, hi, n + 1, 1, 0), rest
                if b < 0x80:
                    return (_S, lo, hi, n + 1, 0, 0), rest
                nu = _LEAD.get(b)
                return None if nu is None else ((_S, lo, hi, n + 1, 0, nu), rest)
            if esc == 1:  # after the backslash
                if b in _SIMPLE_ESC:
                    return (_S, lo, hi, n, 0, 0), rest
                return ((_S, lo, hi, n, 2, 0), rest) if b == 0x75 else None
            # \uXXXX: esc 2..5 = hex digits still needed 4..1; 6 = 3 needed after a leading "d", whose next digit
            # must be 0-7 (no D800-DFFF surrogates: a lone one is not valid Unicode text)
            if b not in _HEX or (esc == 6 and b not in b"01234567"):
                return None
            nxt = (6 if b in (0x64, 0x44) else 3) if esc == 2 else 4 if esc == 6 else 0 if esc == 5 else esc + 1
            return (_S, lo, hi, n, nxt, 0), rest
        if k == _V:
            if f[2] and b == 0x20:
                return (_V, f[1], False), rest
            return _start(f[1], b, rest)
        if k == _N:
            _, integer, phase, length, exp = f
            nxt = _number(integer, phase, b)
            # Accept a byte only if the number can still be finished within MAX_NUMBER (one more digit
            # finishes any unfinished number) and the exponent stays at 2 digits (no 1e999 = inf).
            if nxt is not None and length + 1 + (nxt not in _N_ACCEPT) <= MAX_NUMBER and \
                    not (nxt == N_EXP and exp >= 2):
                return (_N, integer, nxt, length + 1, exp + 1 if nxt == N_EXP else 0), rest
            if phase in _N_ACCEPT:
                stack = rest  # the number ended; the byte belongs to the parent
                continue
            return None
        if k == _L:
            _, options, pos = f
            nxt = tuple(o for o in options if len(o) > pos and o[pos] == b)
            if nxt:
                return rest if all(len(o) == pos + 1 for o in nxt) else ((_L, nxt, pos + 1), rest)
            if any(len(o) == pos for o in options):
                stack = rest
                continue
            return None
        if k == _O:
            _, node, i, phase, cands, pos = f
            if phase == O_IN_KEY:
                nxt = tuple(c for c in cands if c[1][pos] == b)
                if not nxt:
                    return None
                if len(nxt[0][1]) == pos + 1:  # quoted keys are prefix-free: a full match is the only one
                    return (_O, node, nxt[0][0] + 1, O_COLON, None, 0), rest
                return (_O, node, i, O_IN_KEY, nxt, pos + 1), rest
            if phase == O_COLON:
                if b != 0x3A:
                    return None
                value = node.free_value if node.free_value is not None else node.props[i - 1][1]
                return (_V, value, True), ((_O, node, i, O_AFTER, None, 0), rest)
            if phase == O_AFTER:
                more = i < len(node.props) if node.free_value is None else node.hi is None or i < node.hi
                if b == 0x2C and more:
                    return (_O, node, i, O_KEY_SPACE, None, 0), rest
                return rest if b == 0x7D and _can_close(node, i) else None
            if b == 0x20 and phase == O_KEY_SPACE:
                return (_O, node, i, O_KEY, None, 0), rest
            if b == 0x7D and phase == O_START and _can_close(node, i):
                return rest
            if b != 0x22:
                return None
            if node.free_value is not None:  # a free-form key is a string, then the colon; i counts keys
                return (_S, 0, MAX_KEY, 0, 0, 0), ((_O, node, i + 1, O_COLON, None, 0), rest)
            return (_O, node, i, O_IN_KEY, _key_candidates(node, i), 1), rest
        if k == _A:
            _, node, n, phase = f
            if phase == A_START:
                if b == 0x5D:
                    return rest if node.lo == 0 else None
                if node.hi == 0:
                    return None
                return _start(node.item, b, ((_A, node, 1, A_AFTER), rest))
            if b == 0x2C and (node.hi is None or n < node.hi):
                return (_V, node.item, True), ((_A, node, n + 1, A_AFTER), rest)
            return rest if b == 0x5D and n >= node.lo else None
        return None  # _END


def _can_end(stack: tuple | None) -> bool:
    """The text so far is a complete value: nothing is open, or only a top-level number / literal that could
    also go on (12 -> 123)."""
    f, rest = stack
    if f[0] == _END:
        return True
    if rest is not _BOTTOM:
        return False
    return (f[0] == _N and f[2] in _N_ACCEPT) or (f[0] == _L and any(len(o) == f[2] for o in f[1]))


# --- tokens -> bytes, the trie ------------------------------------------------------------------------------

_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token adds to the decoded text; None for special tokens (never allowed)."""
    special = {t.id for t in tokenizer.added_tokens if t.special}
    tokens = [tokenizer.id_to_token(i) for i in range(len(tokenizer))]
    if isinstance(tokenizer.decoder, ByteLevelDecoder) or isinstance(tokenizer.pre_tokenizer, ByteLevel):
        # Invert the GPT-2 byte alphabet; characters outside it are added tokens' own text (as the decoder does).
        out: list[bytes | None] = []
        for t in tokens:
            try:
                out.append(bytes(UNICODE_TO_BYTE[c] for c in t))
            except KeyError:
                out.append(t.encode())
    else:
        if isinstance(tokenizer.decoder, WordPieceDecoder) or type(tokenizer.model).__name__ == "WordPiece":
            raise ValueError("JSON constraints need a tokenizer whose tokens decode to fixed bytes (byte-level or "
                             "byte-fallback BPE, Unigram); WordPiece decoding inserts context-dependent spaces")
        # Decode each token after a reference token, so decoders that treat the first token specially
        # (Metaspace dropping the leading space of "▁word", Strip) do not change what the token adds.
        ref = next(i for i in range(len(tokens)) if i not in special and tokens[i].isalpha())
        head = tokenizer.decode([ref])
        fallback = getattr(tokenizer.model, "byte_fallback", False)
        out = []
        for i, t in enumerate(tokens):
            m = _BYTE_TOKEN.fullmatch(t) if fallback else None
            if m:
                out.append(bytes([int(m.group(1), 16)]))
                continue
            text = tokenizer.decode([ref, i])
            out.append(text[len(head):].encode() if text.startswith(head) else tokenizer.decode([i]).encode())
    return [None if i in special or not b else b for i, b in enumerate(out)]


def _trie(items: list[tuple[bytes, int]]) -> dict:
    """Nested {byte: (ids ending here, children)}."""
    root: dict = {}
    for b, i in items:
        node = root
        for j, c in enumerate(b):
            ids, children = node.setdefault(c, ([], {}))
            if j == len(b) - 1:
                ids.append(i)
            node = children
    return root


class _Vocab:
    """Per-tokenizer data, built once and shared by every constraint on that tokenizer: token bytes, the trie,
    and, for the hot case of string contents, per-token tables that replace the walk by a vectorized test."""

    def __init__(self, tokenizer):
        self.bytes = token_bytes(tokenizer)
        usable = [(b, i) for i, b in enumerate(self.bytes) if b]
        self.trie = _trie(usable)
        # Inside a string, a token without '"' or '\\' stays in the string: it is allowed iff it is valid
        # UTF-8 text (continuing the pending character, state u) without control bytes and fits maxLength.
        # So only tokens with '"' or '\\' need the walk there (a small trie); the rest is table lookups.
        self.quote_trie = _trie([(b, i) for b, i in usable if 0x22 in b or 0x5C in b])
        n = len(self.bytes)
        self.plain_ok = torch.zeros(len(_UTF8), n, dtype=torch.bool)
        self.plain_chars = torch.zeros(len(_UTF8), n, dtype=torch.long)
        for b, i in usable:
            if 0x22 in b or 0x5C in b or min(b) < 0x20:
                continue
            for u in range(len(_UTF8)) if max(b) >= 0x80 else (0,):
                stack = (_S, 0, 1 << 30, 0, 0, u), _BOTTOM
                for c in b:
                    stack = _step(stack, c)
                    if stack is None:
                        break
                else:
                    self.plain_ok[u, i], self.plain_chars[u, i] = True, stack[0][3]


_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class JSONConstraint:
    """Token-level constraint: at every step, the set of tokens that keep the generated text a prefix of some
    JSON value valid under the schema (schema=None: any JSON object, as OpenAI's json_object mode).

    allowed() includes the eos ids once the text is a complete value; when nothing can follow (every value
    but a top-level number or number enum), it is exactly the eos ids."""

    _CACHE_SIZE = 256

    def __init__(self, tokenizer, schema: dict | None = None, *, eos_token_ids: Sequence[int] = (),
                 vocab_size: int | None = None):
        self.root = _Obj(None, _any(MAX_DEPTH - 1)) if schema is None else _compile(schema)
        eos = list(eos_token_ids)
        if not eos and getattr(tokenizer, "eos_token", None) is not None:
            eos = [tokenizer.token_to_id(tokenizer.eos_token)]
        if not eos:
            raise ValueError("eos_token_ids is empty and the tokenizer has no eos_token: a finished value needs an "
                             "end-of-sequence token")
        self.vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
        if self.vocab_size < len(tokenizer) or not all(0 <= e < self.vocab_size for e in eos):
            raise ValueError(f"vocab_size {self.vocab_size} must cover the tokenizer ({len(tokenizer)}) and "
                             f"eos ids {eos}")
        if tokenizer not in _VOCABS:
            _VOCABS[tokenizer] = _Vocab(tokenizer)
        self._vocab: _Vocab = _VOCABS[tokenizer]
        self.eos_token_ids = tuple(eos)
        self._eos = torch.tensor(eos, dtype=torch.long)
        self._cache: dict = {}  # state -> allowed ids (shared with copies: states are values)
        self._state: tuple = ((_V, self.root, False), _BOTTOM)
        self._finished = False

    @property
    def is_complete(self) -> bool:
        return self._finished or _can_end(self._state)

    def copy(self) -> "JSONConstraint":
        new = object.__new__(JSONConstraint)
        new.__dict__.update(self.__dict__)  # states are immutable, so sharing them is copying them
        return new

    def advance(self, token_id: int) -> None:
        if token_id in self.eos_token_ids:
            if not self.is_complete:
                raise ValueError(f"eos token {token_id} before the JSON value is complete")
            self._finished = True
            return
        b = self._vocab.bytes[token_id] if 0 <= token_id < len(self._vocab.bytes) and not self._finished else None
        if b is None:
            raise ValueError(f"token {token_id} is not allowed here")
        state = self._state
        for c in b:
            state = _step(state, c)
            if state is None:
                raise ValueError(f"token {token_id} ({b!r}) is not allowed here")
        self._state = state

    def allowed(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if self._finished or self._state[0][0] == _END:
            mask[self._eos] = True
            return mask
        state, v = self._state, self._vocab
        top = state[0]
        if top[0] == _S and top[4] == 0:  # inside a string's text: tables + the walk over quote/backslash tokens
            n = v.plain_ok.shape[1]
            mask[:n] = v.plain_ok[top[5]] & (v.plain_chars[top[5]] <= top[2] - top[3])
            ids = self._walk(v.quote_trie, state)
        else:
            ids = self._cache.get(state)
            if ids is None:
                ids = self._cache[state] = torch.tensor(self._walk(v.trie, state), dtype=torch.long)
                if len(self._cache) > self._CACHE_SIZE:
                    self._cache.pop(next(iter(self._cache)))
        mask[ids] = True
        mask[self._eos] = _can_end(state)  # eos ids are never text, even if they have bytes
        if not mask.any():  # only possible when the vocab lacks a needed character (no byte fallback)
            raise RuntimeError("no token of this vocabulary can continue the JSON value here")
        return mask

    def _allowed_by_walk(self) -> torch.Tensor:
        """allowed() without the string tables or the cache: the reference the tests compare it with."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if not self._finished:
            mask[self._walk(self._vocab.trie, self._state)] = True
        mask[self._eos] = self.is_complete
        return mask

    @staticmethod
    def _walk(trie: dict, state: tuple) -> list[int]:
        """Depth-first over the trie, carrying the automaton state; a rejected byte prunes its subtree."""
        out: list[int] = []
        todo = [(trie, state)]
        step = _step
        while todo:
            children, st = todo.pop()
            for c, (ids, sub) in children.items():
                s2 = step(st, c)
                if s2 is None:
                    continue
                if ids:
                    out += ids
                if sub:
                    todo.append((sub, s2))
        return out
