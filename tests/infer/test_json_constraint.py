"""JSON constrained decoding: a random model under the constraint always writes JSON valid under the schema
(jsonschema is the oracle) and without it does not; every valid serialization is accepted token by token
(hypothesis), invalid ones are rejected; the table fast path equals the plain trie walk."""

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab.infer.json_constraint import JSONConstraint
from llmlab.model import KVCache, ModelConfig, Transformer
from llmlab.tokenizer import train
from llmlab.tokenizer.bytelevel import BYTE_TO_UNICODE

TEXTS = [
    '{"name": "café", "age": 12, "tags": ["a", "b"], "ok": true, "x": null, "price": -3.5e2}',
    '{"city": "日本", "list": [1, 2, 3], "nested": {"k": "v", "n": 0.25}, "flag": false}',
    "plain words: the quick brown fox jumps over the lazy dog 1234567890 !?;()<>",
] * 30

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "email": {"type": "string", "minLength": 1, "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "café"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "tags"],
}
MIXED = {
    "type": "object",
    "properties": {
        "kind": {"const": "point"},
        "xy": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                                        "maxLength": 5}},
                 "required": ["ok"]},
        "level": {"enum": [1, 12, 2.5, None, True]},
    },
    "required": ["kind", "xy", "level"],
}
FREE_MAP = {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 4}
ARRAY = {"type": "array", "items": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer"},
                                              {"type": "object", "properties": {"v": {"type": "null"}}}]},
         "maxItems": 4}
SCHEMAS = {"person": PERSON, "mixed": MIXED, "free_map": FREE_MAP, "array": ARRAY, "any_object": None}


@pytest.fixture(scope="module")
def tok():
    return train(TEXTS, kind="bpe", vocab_size=400, special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module")
def eos(tok):
    return tok.token_to_id("<|endoftext|>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", vocab_size=len(tok), max_seq_len=1024)).eval()


@torch.no_grad()
def generate(model, eos, seed, constraint=None, max_tokens=800, check_walk=False):
    """Sample at temperature 1 (seeded); with a constraint, disallowed logits are -inf."""
    g = torch.Generator().manual_seed(seed)
    cache, ids, inp = KVCache(), [], torch.tensor([[eos]])
    for _ in range(max_tokens):
        logits = model(inp, cache=cache).logits[0, -1].float()
        if constraint is not None:
            allowed = constraint.allowed()
            if check_walk:
                assert torch.equal(allowed, constraint._allowed_by_walk())
            logits[~allowed] = float("-inf")
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if constraint is not None:
            constraint.advance(t)
        if t == eos:
            return ids, True
        ids.append(t)
        inp = torch.tensor([[t]])
    return ids, False


def validate(value, schema):
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_constrained_generation_is_valid_and_varied(model, tok, eos, name):
    schema, outputs = SCHEMAS[name], []
    for seed in range(20):
        c = JSONConstraint(tok, schema, eos_token_ids=[eos])
        ids, finished = generate(model, eos, seed, c, check_walk=seed < 3)
        assert finished and c.is_complete
        text = tok.decode(ids)
        validate(json.loads(text), schema)
        outputs.append(text)
    assert len(set(outputs)) >= 15, outputs


def test_without_the_constraint_the_model_writes_no_json(model, tok, eos):
    bad = 0
    for seed in range(20):
        ids, _ = generate(model, eos, seed, max_tokens=40)
        try:
            json.loads(tok.decode(ids))
        except ValueError:
            bad += 1
    assert bad == 20


# --- every valid serialization is accepted, token by token ----------------------------------------------------

def feed(tok, eos, schema, text: str) -> JSONConstraint:
    """Advance through text's tokens, checking each is in allowed() first; raises ValueError on a rejection."""
    c = JSONConstraint(tok, schema, eos_token_ids=[eos])
    for t in tok.encode(text):
        if not c.allowed()[t]:
            raise ValueError(f"token {t} not allowed after a prefix of {text!r}")
        c.advance(t)
    return c


def chars(ascii_only: bool):
    # \u escapes (ensure_ascii) of astral characters are surrogate pairs, which the constraint never writes
    return st.characters(max_codepoint=0xFFFF if ascii_only else 0x10FFFF, blacklist_categories=("Cs",))


numbers = st.integers(-10**15, 10**15) | st.floats(-1e9, 1e9, allow_nan=False).filter(
    lambda x: "e" not in repr(x) or len(repr(x).split("e")[1].lstrip("+-")) <= 2)


@st.composite
def person(draw, ascii_only):
    text = st.text(chars(ascii_only), max_size=12)
    value = {"name": draw(text)}
    if draw(st.booleans()):
        value["age"] = draw(st.integers(-10**12, 10**12))
    if draw(st.booleans()):
        value["email"] = draw(st.text(chars(ascii_only), min_size=1, max_size=8))
    # enum values must be written as json.dumps(ensure_ascii=False) spells them (documented)
    value["tags"] = draw(st.lists(st.sampled_from(["a", "b"] if ascii_only else ["a", "b", "café"]), min_size=1,
                                  max_size=3))
    return value


def any_json(ascii_only):
    scalars = st.none() | st.booleans() | numbers | st.text(chars(ascii_only), max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(chars(ascii_only), max_size=8), inner, max_size=3), max_leaves=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ascii_only=st.booleans(), spaced=st.booleans())
def test_every_valid_value_is_accepted(tok, eos, data, ascii_only, spaced):
    which = data.draw(st.sampled_from(["person", "any_object", "free_map", "mixed"]))
    if which == "person":
        value = data.draw(person(ascii_only))
    elif which == "any_object":
        value = data.draw(st.dictionaries(st.text(chars(ascii_only), max_size=8), any_json(ascii_only), max_size=4))
    elif which == "free_map":
        value = data.draw(st.dictionaries(st.text(chars(ascii_only), max_size=5), st.integers(-10**20, 10**20),
                                          max_size=4))
    else:
        value = {"kind": "point", "xy": data.draw(st.lists(numbers, min_size=2, max_size=2))}
        if data.draw(st.booleans()):
            note = data.draw(st.none() | st.text(chars(ascii_only), max_size=5))
            value["meta"] = {"ok": data.draw(st.booleans()), "note": note}
        value["level"] = data.draw(st.sampled_from([1, 12, 2.5, None, True]))
    schema = SCHEMAS[which]
    text = json.dumps(value, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":"))
    c = feed(tok, eos, schema, text)
    assert c.is_complete
    assert torch.equal(c.allowed(), torch.nn.functional.one_hot(torch.tensor(eos), len(tok)).bool())
    c.advance(eos)


@pytest.mark.parametrize("schema,text", [
    (PERSON, '{"tags": ["a"]}'),  # missing required key
    (PERSON, '{"name": "x", "age": "3", "tags": ["a"]}'),  # wrong type
    (PERSON, '{"name": "x", "tags": ["a"], "zz": 1}'),  # extra key
    (PERSON, '{"name": "x", "tags": ["c"]}'),  # not in enum
    (PERSON, '{"name": "x", "tags": []}'),  # minItems
    (PERSON, '{"name": "x", "tags": ["a", "a", "a", "a"]}'),  # maxItems
    (PERSON, '{"name": "0123456789abc", "tags": ["a"]}'),  # maxLength
    (PERSON, '{"name": "x", "email": "", "tags": ["a"]}'),  # minLength
    (PERSON, '{"tags": ["a"], "name": "x"}'),  # keys out of schema order
    (PERSON, '{ "name": "x", "tags": ["a"]}'),  # whitespace beyond one space after ':' / ','
    (PERSON, '{"name":  "x", "tags": ["a"]}'),
    (PERSON, '{"name": "x", "age": 1.5, "tags": ["a"]}'),  # integer
    (None, '["a"]'),  # json_object mode: an object
    (None, '{"a": 01}'),  # leading zero
    (None, '{"a": 1.}'),
    (None, '{"a": 1e999}'),  # exponent digits are bounded
    (None, '{"a": "\\ud800"}'),  # lone surrogate escape
    (None, '{"a": "\\x"}'),  # bad escape
    (None, '{"a": "tab\there"}'),  # raw control character
    (None, '{"a": tru}'),
    (None, '{"a": 1}}'),  # anything after the value
    (None, '{"a": 1,}'),
    (MIXED, '{"kind": "point", "xy": [1], "level": 1}'),
    (MIXED, '{"kind": "point", "xy": [1, 2], "level": 3}'),
    (MIXED, '{"kind": "point", "xy": [1, 2], "meta": {"note": null}, "level": 1}'),
])
def test_invalid_values_are_rejected(tok, eos, schema, text):
    with pytest.raises(ValueError):
        c = feed(tok, eos, schema, text)
        c.advance(eos)  # incomplete values reject eos


def test_top_level_scalars(tok, eos):
    c = JSONConstraint(tok, {"type": "integer"}, eos_token_ids=[eos])
    c.advance(tok.encode("1")[0])
    a = c.allowed()
    assert c.is_complete and a[eos] and a[tok.encode("2")[0]]  # 1 is complete, 12 would be too
    c = feed(tok, eos, {"type": "boolean"}, "true")
    assert c.allowed().nonzero().flatten().tolist() == [eos]
    with pytest.raises(ValueError):
        c.advance(tok.encode("1")[0])


def byte_ids(tok, data: bytes) -> list[int]:
    return [tok.token_to_id(BYTE_TO_UNICODE[b]) for b in data]


def test_utf8_split_across_tokens(tok, eos):
    c = JSONConstraint(tok, {"type": "string", "maxLength": 3}, eos_token_ids=[eos])
    for t in byte_ids(tok, '"日本é"'.encode()):  # one byte per token: every character is split
        assert c.allowed()[t]
        c.advance(t)
    assert c.is_complete
    for bad in (b'"\xe6"', b'"\xe6\x97"', b'"\x97', b'"\xc0\x80', b'"\xed\xa0\x80', b'"\xf4\x90\x80\x80',
                b'"\xff'):
        c = JSONConstraint(tok, {"type": "string"}, eos_token_ids=[eos])
        with pytest.raises(ValueError):  # truncated, stray continuation, overlong, surrogate, > U+10FFFF
            for t in byte_ids(tok, bad):
                c.advance(t)
    c = JSONConstraint(tok, {"type": "string", "maxLength": 1}, eos_token_ids=[eos])
    for t in byte_ids(tok, '"日'.encode()):
        c.advance(t)
    assert not c.allowed()[byte_ids(tok, b"a")[0]] and c.allowed()[byte_ids(tok, b'"')[0]]


def test_copy_is_independent(tok, eos):
    a = JSONConstraint(tok, PERSON, eos_token_ids=[eos])
    for t in tok.encode('{"name": "x", '):
        a.advance(t)
    b = a.copy()
    for t in tok.encode('"tags": ["a"]}'):
        b.advance(t)
    assert b.is_complete and not a.is_complete
    for t in tok.encode('"age": 3, "tags": ["b"]}'):
        a.advance(t)
    assert a.is_complete


@pytest.mark.parametrize("keyword", ["pattern", "format", "$ref", "oneOf", "allOf", "not", "patternProperties",
                                     "minimum", "uniqueItems", "$defs"])
def test_unsupported_keywords_raise(tok, eos, keyword):
    with pytest.raises(ValueError, match=keyword.replace("$", r"\$")):
        JSONConstraint(tok, {"type": "object", "properties": {"a": {"type": "string", keyword: 1}}},
                       eos_token_ids=[eos])


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
    {"type": "object", "properties": {"a": {}}, "required": ["b"]},
    {"anyOf": [{"type": "string"}, {"enum": ["x"]}]},  # both start with '"'
    {"type": "array", "items": [{"type": "string"}]},
    {"enum": [{"a": 1}]},
    {"type": "string", "minLength": 3, "maxLength": 2},
    {"type": "strin"},
])
def test_unsupported_or_contradictory_schemas_raise(tok, eos, schema):
    with pytest.raises(ValueError):
        JSONConstraint(tok, schema, eos_token_ids=[eos])


def test_eos_and_disallowed_tokens(tok, eos):
    c = JSONConstraint(tok, PERSON, eos_token_ids=[eos])
    assert not c.allowed()[eos]
    with pytest.raises(ValueError):
        c.advance(eos)
    with pytest.raises(ValueError):
        c.advance(tok.encode("a")[0])
    wide = JSONConstraint(tok, PERSON, eos_token_ids=[eos], vocab_size=len(tok) + 7).allowed()
    assert wide.shape == (len(tok) + 7,) and not wide[len(tok):].any()
    with pytest.raises(ValueError, match="eos"):
        JSONConstraint(tok, PERSON)  # the trained tokenizer names no eos token


def test_other_tokenizer_kinds(eos):
    uni = train(TEXTS, kind="unigram", vocab_size=400, byte_fallback=True)
    uni_eos = uni.token_to_id("<unk>")  # any id works as the end marker for this check
    for seed in range(3):
        c, g, ids = JSONConstraint(uni, {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}},
                                   eos_token_ids=[uni_eos]), torch.Generator().manual_seed(seed), []
        while True:
            t = int(torch.multinomial(c.allowed().float(), 1, generator=g))
            c.advance(t)
            if t == uni_eos:
                break
            ids.append(t)
        assert isinstance(json.loads(uni.decode(ids)), dict)
    wp = train(TEXTS, kind="wordpiece", vocab_size=200)
    with pytest.raises(ValueError, match="WordPiece"):
        JSONConstraint(wp, None, eos_token_ids=[0])
