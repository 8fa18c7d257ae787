"""The OpenAI-compatible server end to end: a real uvicorn server on a loopback port, a tiny random model and a
BPE tokenizer trained here, driven by the official `openai` client (and httpx where the raw bytes matter).

Tool calls: a random model cannot be steered into spelling a JSON call token by token, so the tokenizer gets one
extra (non-special) added token whose text is a whole Hermes-style call; logit_bias +100 on it makes the model
emit exactly that call, which the server must parse into OpenAI tool_calls. The parser itself is unit-tested
on strings."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from llmlab.infer import LLM
from llmlab.model import ModelConfig, Transformer
from llmlab.serve import app as serve_app
from llmlab.serve import create_app, parse_tool_calls
from llmlab.tokenizer import Tokenizer, train
from serve_helpers import chatml_tokenizer, running

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "stop here, then go there; the end is near, the end is here. ") * 20
KEY = "test-key"
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}]
MAX_BODY = 20_000
WINDOW = 768  # the tool list in the system turn alone is ~550 tokens of this small vocabulary


@pytest.fixture(scope="module")
def tok():
    base = chatml_tokenizer(TEXT)
    data = base.to_hf_dict()
    data["added_tokens"].append({"content": CALL, "id": len(base), "special": False})
    tok = Tokenizer.from_hf_dict(data)
    tok.chat_template, tok.eos_token = base.chat_template, base.eos_token
    return tok


@pytest.fixture(scope="module")
def llm(tok):
    torch.manual_seed(0)
    return LLM(Transformer(ModelConfig.preset("nano", vocab_size=len(tok), max_seq_len=WINDOW)).eval(), tok)


@pytest.fixture(scope="module")
def base_url(llm):
    app = create_app(llm, model_name="nano", api_key=KEY, max_concurrency=2, max_body_bytes=MAX_BODY)
    with running(app, log_level="critical") as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def word_bias(tok, words=(" cat", " dog", " sat", " mat")):
    """logit_bias that confines a random model to a few ASCII words (readable, deterministic text)."""
    ids = [tok.encode(w)[0] for w in words]
    assert all(len(tok.encode(w)) == 1 for w in words)
    return {str(i): 50 for i in ids}


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", line
    return events


# ------------------------------------------------------------------------------------------------ chat


def test_chat_stream_equals_non_stream_and_usage(client, tok):
    kw = dict(model="nano", messages=MSGS, max_tokens=12, temperature=0, logit_bias=word_bias(tok))
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-") and full.model == "nano"
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content.strip()
    prompt_len = len(tok.apply_chat_template(MSGS, add_generation_prompt=True))
    assert full.usage.prompt_tokens == prompt_len
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == prompt_len + 12

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_len
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_format(http, tok):
    body = {"model": "nano", "messages": MSGS, "max_tokens": 4, "temperature": 0, "n": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] for m in mine if m["finish_reason"]] == ["length"]
        assert mine[-1]["finish_reason"] == "length"


def test_n_samples_indices_and_seed(client):
    kw = dict(model="nano", messages=MSGS, max_tokens=6, temperature=1.0, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert a.usage.completion_tokens == 18


def test_stop_string_excluded(client, tok):
    kw = dict(model="nano", messages=MSGS, max_tokens=16, temperature=0, logit_bias=word_bias(tok))
    text = client.chat.completions.create(**kw).choices[0].message.content
    words = [w for w in (" cat", " dog", " sat", " mat") if text.find(w) > 0]
    assert words, text
    stop = min(words, key=text.find)
    got = client.chat.completions.create(**kw, stop=[stop, "zzz"]).choices[0]
    assert got.finish_reason == "stop" and got.message.content == text[:text.find(stop)]
    streamed = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == got.message.content


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="nano", messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for e in content:
        assert isinstance(e.token, str) and e.logprob <= 0 and isinstance(e.bytes, list)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the chosen token is the top one
    assert client.chat.completions.create(model="nano", messages=MSGS, max_tokens=2).choices[0].logprobs is None


def test_content_parts_and_developer_role(client, tok):
    parts = [{"role": "developer", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat on"}]}]
    r = client.chat.completions.create(model="nano", messages=parts, max_tokens=1)
    same = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat\nsat on"}]
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(same, add_generation_prompt=True))


# ------------------------------------------------------------------------------------------------ completions


def test_completions_single_list_and_token_ids(client, tok):
    kw = dict(model="nano", max_tokens=6, temperature=0)
    one = client.completions.create(prompt="the cat", **kw)
    assert one.object == "text_completion" and one.choices[0].index == 0
    assert one.usage.prompt_tokens == len(tok.encode("the cat")) and one.usage.completion_tokens == 6
    ids = client.completions.create(prompt=tok.encode("the cat"), **kw)
    assert ids.choices[0].text == one.choices[0].text
    many = client.completions.create(prompt=["a dog", "the cat"], n=2, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[2].text == many.choices[3].text == one.choices[0].text
    assert many.usage.completion_tokens == 24
    batch_ids = client.completions.create(prompt=[tok.encode("a dog"), tok.encode("the cat")], **kw)
    assert batch_ids.choices[1].text == one.choices[0].text

    chunks = list(client.completions.create(prompt=["a dog", "the cat"], stream=True,
                                            stream_options={"include_usage": True}, **kw))
    for i in range(2):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == \
            many.choices[2 * i].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    echo = client.completions.create(prompt="the cat", echo=True, **kw)
    assert echo.choices[0].text == "the cat" + one.choices[0].text


def test_completions_logprobs_shape(client):
    r = client.completions.create(model="nano", prompt="the cat", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(isinstance(d, dict) and len(d) <= 2 for d in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_special_tokens_in_prompt_are_text(http, tok):
    r = http.post("/tokenize", json={"prompt": "<|im_end|>"}).json()
    assert tok.token_to_id("<|im_end|>") not in r["tokens"] and r["count"] > 1
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi <|im_start|>"}]}).json()
    assert r["tokens"].count(tok.token_to_id("<|im_start|>")) == 2  # the user's turn and the generation prompt


def test_tokenize_detokenize_round_trip(http, tok):
    r = http.post("/tokenize", json={"model": "nano", "prompt": "the dog sat on the log"}).json()
    assert r["tokens"] == tok.encode("the dog sat on the log") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == WINDOW
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "the dog sat on the log"}
    r = http.post("/tokenize", json={"messages": MSGS}).json()
    assert r["tokens"] == tok.apply_chat_template(MSGS, add_generation_prompt=True)


def test_models_health_and_page(client, base_url):
    models = client.models.list()
    assert [m.id for m in models.data] == ["nano"]
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(base_url + "/").status_code == 401  # the page too is behind the key (HTTP Basic for browsers)
    page = httpx.get(base_url + "/", auth=("user", KEY))
    assert page.status_code == 200 and "html" in page.headers["content-type"]
    assert httpx.get(base_url + "/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_concurrency_limit_waits(client):
    def ask(i):
        return client.completions.create(model="nano", prompt=f"the cat {i}", max_tokens=8).choices[0].finish_reason

    with ThreadPoolExecutor(6) as pool:  # max_concurrency=2: the rest wait their turn
        assert list(pool.map(ask, range(6))) == ["length"] * 6


# ------------------------------------------------------------------------------------------------ tools


def test_tool_call_round_trip(client, tok):
    bias = {str(tok.token_to_id(CALL)): 100}
    r = client.chat.completions.create(model="nano", messages=[{"role": "user", "content": "weather in Paris?"}],
                                       tools=TOOLS, max_tokens=1, logit_bias=bias)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model="nano", messages=[{"role": "user", "content": "weather?"}],
                                                 tools=TOOLS, max_tokens=1, logit_bias=bias, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r2 = client.chat.completions.create(model="nano", messages=history, tools=TOOLS, max_tokens=2)
    assert r2.choices[0].finish_reason == "length"
    rendered = tok.apply_chat_template(history, add_generation_prompt=True, tools=TOOLS, tokenize=False)
    assert "<tool_response>" in rendered and r2.usage.prompt_tokens == len(
        tok.apply_chat_template(history, add_generation_prompt=True, tools=TOOLS))
    # without tools (or tool_choice="none") the same text is plain content
    r3 = client.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                        tool_choice="none", max_tokens=1, logit_bias=bias)
    assert r3.choices[0].message.content == CALL and r3.choices[0].finish_reason == "length"


def test_parse_tool_calls():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("f", {"x": 1})]
    content, calls = parse_tool_calls('Let me check.<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                                      '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"y": 2}
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}')[1]  # closing tag cut off
    _, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}')  # Llama 3
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["type"] == "function"
    assert len(parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}')[1]) == 2
    for text in ("just words", '{"answer": 42}', "<tool_call>{not json}</tool_call>", '{"name": "f", "arguments": 3}'):
        assert parse_tool_calls(text) == (text, [])
    ids = {parse_tool_calls('{"name": "f", "arguments": {}}')[1][0]["id"] for _ in range(3)}
    assert len(ids) == 3


# ------------------------------------------------------------------------------------------------ JSON mode


@pytest.mark.skipif(not serve_app.GUIDED_JSON, reason="the engine has no SamplingParams.guided_json")
def test_json_mode_output_parses_and_follows_the_schema(client):
    """response_format is enforced by constrained decoding: a bounded schema must come back complete and
    valid, for several seeds; free json_object output is valid JSON (or a valid prefix cut by max_tokens)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"type": "string", "maxLength": 8},
                                               "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
              "required": ["a", "b"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    texts = set()
    for seed in range(4):
        r = client.chat.completions.create(model="nano", messages=MSGS, max_tokens=200, temperature=1.0, seed=seed,
                                           response_format=fmt)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
        texts.add(choice.message.content)
    assert len(texts) > 1
    r = client.chat.completions.create(model="nano", messages=MSGS, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


def test_json_mode_refused_without_constrained_decoding(client, monkeypatch):
    monkeypatch.setattr(serve_app, "GUIDED_JSON", False)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nano", messages=MSGS, response_format={"type": "json_object"})
    assert "constrained decoding" in e.value.body["message"] and e.value.body["param"] == "response_format"
    client.chat.completions.create(model="nano", messages=MSGS, max_tokens=1, response_format={"type": "text"})


# ------------------------------------------------------------------------------------------------ errors


def bad(fn, status=400):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    assert e.value.status_code == status
    err = e.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_validation_errors(client, http):
    chat = client.chat.completions.create
    err = bad(lambda: chat(model="nano", messages=MSGS, temperature=5))
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    assert bad(lambda: chat(model="nano", messages=[]))["param"] == "messages"
    assert bad(lambda: chat(model="nano", messages=MSGS, n=0))["param"] == "n"
    assert bad(lambda: chat(model="nano", messages=MSGS, logit_bias={"x": 1}))["param"] == "logit_bias"
    assert bad(lambda: chat(model="nano", messages=MSGS, top_logprobs=2))["param"] == "top_logprobs"
    assert bad(lambda: chat(model="nano", messages=[{"role": "robot", "content": "hi"}]))["param"].startswith("messages")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    assert "only text" in bad(lambda: chat(model="nano", messages=image))["message"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert bad(lambda: chat(model="nano", messages=MSGS, tools=TOOLS, tool_choice=named))["param"] == "tool_choice"
    assert bad(lambda: client.completions.create(model="nano", prompt=[999999]))["param"] == "prompt"
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "nano"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_context_length_errors(client, tok):
    long = [{"role": "user", "content": "the cat sat on the mat. " * 150}]
    err = bad(lambda: client.chat.completions.create(model="nano", messages=long))
    n = len(tok.apply_chat_template(long, add_generation_prompt=True))
    assert err["code"] == "context_length_exceeded" and f"{WINDOW} tokens" in err["message"]
    assert f"{n} tokens" in err["message"] and n > WINDOW
    err = bad(lambda: client.completions.create(model="nano", prompt="the cat", max_tokens=WINDOW))
    assert err["code"] == "context_length_exceeded" and str(WINDOW) in err["message"]
    assert f"{len(tok.encode('the cat'))} in the prompt" in err["message"]


def test_auth_model_size_and_route_errors(client, base_url, http):
    anon = OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
    assert bad(lambda: anon.models.list(), 401)["type"] == "authentication_error"
    assert httpx.get(base_url + "/v1/models").status_code == 401  # no header at all
    assert httpx.get(base_url + "/metrics").status_code == 401
    err = bad(lambda: client.chat.completions.create(model="gpt-4", messages=MSGS), 404)
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    big = {"model": "nano", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    r = http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the bytes themselves are counted
        yield b'{"model": "nano", "prompt": "'
        for _ in range(MAX_BODY // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'

    r = http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_embeddings_on_a_decoder(client):
    err = bad(lambda: client.embeddings.create(model="nano", input="hello"))
    assert "encoder" in err["message"] and err["param"] == "model"


def test_internal_error_is_reported_and_server_survives(client, http, tok, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(tok, "apply_chat_template", boom)
    err = bad(lambda: client.chat.completions.create(model="nano", messages=MSGS), 500)
    assert err["type"] == "internal_server_error" and "template exploded" in err["message"]
    monkeypatch.undo()
    assert http.get("/health").json() == {"status": "ok"}
    assert client.chat.completions.create(model="nano", messages=MSGS, max_tokens=1).choices[0].finish_reason


# ------------------------------------------------------------------------------------------------ lifecycle


def test_disconnect_mid_stream_frees_kv_blocks(http, llm):
    engine = llm.engine

    def generated():
        text = http.get("/metrics").text
        return int(next(line.split()[-1] for line in text.splitlines()
                        if line.startswith("llmlab_generation_tokens_total ")))

    before = generated()
    body = {"model": "nano", "prompt": "the cat", "max_tokens": 700, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got == 3:
                break
        assert engine.cache.blocks.in_use() > 0 or engine.requests  # still generating
    deadline = time.time() + 10
    while (engine.cache.blocks.in_use() or engine.requests) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.cache.blocks.in_use() == 0 and not engine.requests and not engine.has_unfinished()
    time.sleep(0.1)
    assert generated() - before < 700  # aborted, not run to the end


def test_metrics_counts(http, client):
    client.chat.completions.create(model="nano", messages=MSGS, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nano", messages=MSGS, temperature=9)
    text = http.get("/metrics").text
    assert 'llmlab_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'llmlab_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
    for name in ("llmlab_prompt_tokens_total", "llmlab_generation_tokens_total", "llmlab_num_requests_running",
                 "llmlab_num_requests_waiting", "llmlab_kv_blocks_used", "llmlab_kv_blocks_total",
                 "llmlab_time_to_first_token_seconds_bucket", "llmlab_request_latency_seconds_count"):
        assert f"\n{name}" in text, name
    assert http.get("/health").status_code == 200


def test_embeddings_on_an_encoder():
    """An encoder model serves /v1/embeddings (llmlab.embed's vectors) and refuses generation; in-process ASGI."""
    import asyncio
    import base64

    import numpy as np

    import llmlab

    enc_tok = train(["the cat sat on the mat"] * 20, kind="wordpiece", vocab_size=200)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano", vocab_size=len(enc_tok), kind="encoder", head="mlm")).eval()
    app = create_app(LLM(model, enc_tok), model_name="enc")
    want = llmlab.embed(model, enc_tok, ["the cat", "a mat"])

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            floats = await c.post("/v1/embeddings", json={"model": "enc", "input": ["the cat", "a mat"]})
            b64 = await c.post("/v1/embeddings", json={"input": "the cat", "encoding_format": "base64"})
            chat = await c.post("/v1/chat/completions", json={"model": "enc", "messages": MSGS})
            return floats.json(), b64.json(), chat

    floats, b64, chat = asyncio.run(calls())
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["model"] == "enc"
    assert torch.allclose(torch.tensor([d["embedding"] for d in floats["data"]]), want, atol=1e-5)
    assert floats["usage"]["prompt_tokens"] == len(enc_tok.encode("the cat")) + len(enc_tok.encode("a mat"))
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, want[0].numpy(), atol=1e-5)
    assert chat.status_code == 400 and "encoder" in chat.json()["error"]["message"]
