"""Load: 32 concurrent streaming clients, 200 chat requests, against a real uvicorn server on a loopback port
(a nano model with random weights and a small BPE tokenizer with ChatML, as in test_openai_api.py).

Every request has its own prompt, its own seed, temperature 1 and a random max_tokens in [8, 48]; some ask for
n=2. Checked for every request: the stream is well formed (the first chunk of each choice carries the role,
all chunks share one id, exactly one finish chunk per choice, the usage chunk when include_usage asked for it
and only then; a raw-SSE subset read with httpx also ends with `data: [DONE]`), and its text is exactly what a
separate engine on the same weights produces for the same prompt ids and sampling parameters (seeded
sampling is reproducible and does not depend on what else is in the batch), so no request saw another's
text. After a warm-up round the process's resident memory must come back near where it was, and the engine
must hold no KV blocks at the end. Throughput and time-to-first-token are printed (pytest -s), not asserted.
"""

import gc
import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from openai import OpenAI

from llmlab.infer import LLM, SamplingParams
from llmlab.model import ModelConfig, Transformer
from llmlab.serve import create_app
from serve_helpers import chatml_tokenizer, running

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "stop here, then go there; the end is near, the end is here. ") * 20
WORDS = sorted(set(TEXT.replace(".", " ").replace(",", " ").replace(";", " ").split()))
CONCURRENCY, REQUESTS, WARMUP = 32, 200, 64
RSS_TOLERANCE_MIB = 64


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", vocab_size=len(tok), max_seq_len=512)).eval()


@pytest.fixture(scope="module")
def server(model, tok):
    llm = LLM(model, tok)
    app = create_app(llm, model_name="nano", api_key=None, max_concurrency=64)
    with running(app, log_level="critical") as url:
        yield url, llm


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def make_requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
        reqs.append({"messages": [{"role": "user", "content": f"request {seed}-{i}: {words}"}],
                     "seed": rng.randrange(2**31), "temperature": 1.0, "max_tokens": rng.randint(8, 48),
                     "n": 2 if i % 16 == 0 else 1,
                     "raw": i % 8 == 0,  # read with httpx as raw SSE (checks [DONE]); else the openai client
                     "include_usage": i % 2 == 0})
    return reqs


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", line
    return events


def run_one(req: dict, client: OpenAI, http: httpx.Client) -> dict:
    """Send one streaming chat request; return its chunks (as dicts), texts per choice and timings."""
    body = {"model": "nano", "messages": req["messages"], "seed": req["seed"], "temperature": req["temperature"],
            "max_tokens": req["max_tokens"], "n": req["n"], "stream": True}
    if req["include_usage"]:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    first = None
    chunks = []
    done = None
    if req["raw"]:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = []
            for event in sse_events(r):
                events.append(event)
                if first is None and isinstance(event, dict) and any(
                        c["delta"].get("content") for c in event["choices"]):
                    first = time.perf_counter()
        done = events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = events[:-1]
    else:
        params = {k: v for k, v in body.items() if k not in ("stream", "model", "messages")}
        for c in client.chat.completions.create(model="nano", messages=req["messages"], stream=True, **params):
            d = c.model_dump()
            if first is None and any(ch["delta"].get("content") for ch in d["choices"]):
                first = time.perf_counter()
            chunks.append(d)
    end = time.perf_counter()
    return {"chunks": chunks, "done": done, "ttft": (first or end) - t0, "latency": end - t0}


def check_stream(req: dict, got: dict) -> tuple[list[str], list[str], int]:
    """The stream's structure; returns the text and finish reason of each choice and the completion tokens."""
    chunks, n = got["chunks"], req["n"]
    assert chunks, "an empty stream"
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    if req["raw"]:
        assert got["done"], "the raw stream did not end with exactly one data: [DONE]"
    texts, finishes = [""] * n, [[] for _ in range(n)]
    choice_chunks = [c for c in chunks if c["choices"]]
    for i in range(n):
        mine = [ch for c in choice_chunks for ch in c["choices"] if ch["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        texts[i] = "".join(ch["delta"].get("content") or "" for ch in mine)
        finishes[i] = [ch["finish_reason"] for ch in mine if ch["finish_reason"]]
        assert len(finishes[i]) == 1 and mine[-1]["finish_reason"], finishes[i]
    assert {ch["index"] for c in choice_chunks for ch in c["choices"]} == set(range(n))
    tokens = -1
    if req["include_usage"]:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        assert all(c.get("usage") is None for c in chunks[:-1])
        tokens = chunks[-1]["usage"]["completion_tokens"]
    else:
        assert all(c.get("usage") is None for c in chunks) and choice_chunks == chunks
    return texts, [f[0] for f in finishes], tokens


def run_round(base_url: str, reqs: list[dict]) -> tuple[list[dict], float]:
    client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with httpx.Client(base_url=base_url, timeout=60, limits=limits) as http, ThreadPoolExecutor(CONCURRENCY) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda r: run_one(r, client, http), reqs))
        wall = time.perf_counter() - t0
    client.close()
    return results, wall


def expected(model, tok, reqs: list[dict]) -> list[list]:
    """What a separate engine on the same weights produces for each request's prompt ids and parameters."""
    ref = LLM(model, tok)
    im_end = tok.token_to_id("<|im_end|>")
    prompts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True) for r in reqs]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], seed=r["seed"], n=r["n"],
                             stop_token_ids=[im_end]) for r in reqs]
    return [out.outputs for out in ref.generate(prompts, params)]


def test_load_32_concurrent_streaming_clients(server, model, tok):
    base_url, llm = server
    engine = llm.engine
    warm, _ = run_round(base_url, make_requests(WARMUP, seed=1))
    for req, got in zip(make_requests(WARMUP, seed=1), warm):
        check_stream(req, got)
    del warm
    gc.collect()
    rss_before = rss_mib()

    reqs = make_requests(REQUESTS, seed=2)
    assert len({r["messages"][0]["content"] for r in reqs}) == REQUESTS and len({r["seed"] for r in reqs}) == REQUESTS
    results, wall = run_round(base_url, reqs)
    want = expected(model, tok, reqs)

    tokens = 0
    for k, (req, got, ref) in enumerate(zip(reqs, results, want)):
        texts, finishes, usage_tokens = check_stream(req, got)
        assert texts == [c.text for c in ref], f"request {k}: its text differs from the same request run alone"
        assert finishes == [c.finish_reason for c in ref], k
        generated = sum(len(c.token_ids) for c in ref)
        assert usage_tokens in (-1, generated), k
        tokens += generated

    deadline = time.time() + 10
    while (engine.cache.blocks.in_use() or engine.has_unfinished()) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.cache.blocks.in_use() == 0 and not engine.has_unfinished()

    ttft = [1e3 * r["ttft"] for r in results]
    latency = [1e3 * r["latency"] for r in results]
    del results, want
    gc.collect()
    rss_after = rss_mib()
    print(f"\nload: {REQUESTS} requests from {CONCURRENCY} clients in {wall:.2f} s: {REQUESTS / wall:.1f} requests/s, "
          f"{tokens / wall:.0f} generated tokens/s; TTFT p50 {percentile(ttft, 50):.0f} ms, p99 "
          f"{percentile(ttft, 99):.0f} ms; latency p50 {percentile(latency, 50):.0f} ms, p99 "
          f"{percentile(latency, 99):.0f} ms; RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert rss_after - rss_before < RSS_TOLERANCE_MIB, (rss_before, rss_after)
