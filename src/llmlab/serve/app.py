"""The OpenAI-compatible HTTP server: a FastAPI app on one continuously batching engine.

    app = create_app(llm, model_name="smollm2", api_key=None, max_concurrency=64, max_body_bytes=1_000_000)

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /v1/embeddings (encoder
models), POST /tokenize and /detokenize (vLLM's bodies), GET /metrics (Prometheus), GET /health, and the web
chat page at GET / with its files under /static. Every endpoint but /health, / and /static needs
``Authorization: Bearer KEY`` when api_key is set. Errors use OpenAI's shape {"error": {"message", "type",
"param", "code"}}: 400 validation and context length, 401 key, 404 model, 413 body size, 500 anything else
(the server keeps running).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from ..infer import SamplingParams
from ..tokenizer.bytelevel import UNICODE_TO_BYTE
from .bridge import Submission, bridge_for
from .metrics import Metrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                       Message, ResponseFormat, TokenizeRequest, bad_request)
from .tools import parse_tool_calls

log = logging.getLogger("llmlab.serve")

# Constrained decoding is another part of the engine; response_format json_* needs it and is refused without it.
GUIDED_JSON = hasattr(SamplingParams(), "guided_json")
STATIC_DIR = Path(__file__).parent / "static"
# End-of-turn tokens of common chat templates: a chat reply stops at them even when the tokenizer's eos differs.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
DISCONNECT_POLL_S = 0.25
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/tokenize",
               "/detokenize", "/metrics", "/health", "/"}


class ClientGone(Exception):
    """The client disconnected; its requests were aborted."""


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------ the gate


class _Gate:
    """Pure ASGI middleware: API key, body size (Content-Length and the bytes actually sent), request counts."""

    def __init__(self, app, server: _Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]  # what an exception escaping the app becomes

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            err = self._auth(scope)
            if err is None:
                err, receive = await self._body(scope, receive)
            if err is not None:
                await _error_response(err)(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.server.metrics.count_request(_endpoint(scope["path"]), status[0])

    def _auth(self, scope) -> APIError | None:
        key, path = self.server.api_key, scope["path"]
        if key is None or path in ("/health", "/") or path.startswith("/static/"):
            return None
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not header:
            return APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                            type="authentication_error", code="invalid_api_key")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            return APIError(401, "incorrect API key provided", type="authentication_error", code="invalid_api_key")
        return None

    async def _body(self, scope, receive):
        limit = self.server.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return bad_request(f"invalid Content-Length header {length.decode('latin-1')!r}"), receive
            if n > limit:
                return self._too_large(n), receive
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return None, receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                first = message
                break
            size += len(message.get("body", b""))
            if size > limit:
                return self._too_large(size, at_least=True), receive
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return None, replay

    def _too_large(self, size: int, at_least: bool = False) -> APIError:
        return APIError(413, f"the request body has {'more than ' if at_least else ''}"
                             f"{self.server.max_body_bytes if at_least else size} bytes; the limit is "
                             f"{self.server.max_body_bytes}", code="request_too_large")


def _endpoint(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


# ------------------------------------------------------------------------------------------------ one run


class _Run:
    """The engine requests of one HTTP call: a concurrency slot, the submission, timing and token counts."""

    def __init__(self, server: _Server, request: Request, prompts: list[list[int]], params: SamplingParams,
                 rid: str) -> None:
        self.server, self.request, self.prompts, self.params, self.rid = server, request, prompts, params, rid
        self.t0 = time.perf_counter()
        self.first_token: float | None = None
        self.generated: dict[tuple[int, int], int] = {}
        self.sub: Submission | None = None
        self._slot = False
        self._closed = False

    async def start(self) -> None:
        s = self.server
        await s.semaphore.acquire()
        self._slot = True
        try:
            self.sub = s.bridge.submit([(f"{self.rid}-{i}", ids, self.params) for i, ids in enumerate(self.prompts)])
            await self.sub.accepted()
        except ValueError as e:
            self.close(count=False)
            raise bad_request(str(e)) from None
        except BaseException:
            self.close(count=False)
            raise

    async def results(self) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, RequestOutput) as the engine advances, until all have finished."""
        sub = self.sub
        while sub.pending:
            try:
                rid, out = await sub.next(timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                if await self.request.is_disconnected():
                    sub.abort()
                    raise ClientGone from None
                continue
            i = int(rid.rsplit("-", 1)[1])
            for comp in out.outputs:
                self.generated[(i, comp.index)] = len(comp.token_ids)
            if self.first_token is None and any(self.generated.values()):
                self.first_token = time.perf_counter()
                self.server.metrics.observe_ttft(self.first_token - self.t0)
            yield i, out

    def close(self, count: bool = True) -> None:
        """Idempotent: abort what is unfinished, free the slot, record the numbers."""
        if self._closed:
            return
        self._closed = True
        if self.sub is not None:
            self.sub.abort()
        if self._slot:
            self.server.semaphore.release()
        if count:
            m = self.server.metrics
            m.add_tokens(sum(map(len, self.prompts)), sum(self.generated.values()))
            m.observe_latency(time.perf_counter() - self.t0)


# ------------------------------------------------------------------------------------------------ the server


class _Server:
    def __init__(self, llm, model_name: str, api_key: str | None, max_concurrency: int, max_body_bytes: int) -> None:
        if llm.tokenizer is None:
            raise ValueError("the server needs a tokenizer: LLM(model, tokenizer)")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.llm, self.tok, self.engine, self.model = llm, llm.tokenizer, llm.engine, llm.model
        self.model_name, self.api_key = model_name, api_key or None
        self.max_body_bytes = max_body_bytes
        self.semaphore = asyncio.Semaphore(max_concurrency)
        self.metrics = Metrics()
        self.bridge = bridge_for(self.engine)
        self.window = self.engine.max_seq_len
        self.vocab = min(len(self.tok), self.model.cfg.vocab_size)
        self.is_encoder = getattr(self.model.cfg, "kind", "decoder") == "encoder"
        self.created = int(time.time())
        ids = [self.tok.token_to_id(t) for t in END_OF_TURN_TOKENS]
        self.end_of_turn = [i for i in ids if i is not None and i not in self.engine.eos_token_ids]
        decoders = [self.tok.decoder, *getattr(self.tok.decoder, "decoders", ())]
        self.byte_level = any(type(d).__name__ == "ByteLevelDecoder" for d in decoders)
        self.added_ids = {t.id for t in self.tok.added_tokens}

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_generator(self) -> None:
        if self.is_encoder:
            raise bad_request(f"{self.model_name} is an encoder model: it serves /v1/embeddings, not text generation",
                              param="model")

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range: ids must lie in [0, {self.vocab})", param=param)

    def sampling(self, req, *, prompt_len: int, max_tokens: int | None, logprobs: int | None, param: str,
                 stop_ids: list[int] = (), guided=None) -> SamplingParams:
        window = self.window
        if prompt_len >= window:
            raise bad_request(f"this model's maximum context length is {window} tokens, but the prompt has "
                              f"{prompt_len} tokens (at least one token must be left to generate); shorten it",
                              param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = window - prompt_len
        elif prompt_len + max_tokens > window:
            raise bad_request(f"this model's maximum context length is {window} tokens, but {prompt_len + max_tokens}"
                              f" were requested ({prompt_len} in the prompt, {max_tokens} in the completion); "
                              "shorten the prompt or lower max_tokens", param=param, code="context_length_exceeded")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            try:
                tid = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids written as strings, got {key!r}",
                                  param="logit_bias") from None
            self.check_ids([tid], "logit_bias")
            if not -100 <= value <= 100:
                raise bad_request(f"logit_bias values must lie in [-100, 100], got {value} for token {tid}",
                                  param="logit_bias")
            bias[tid] = value
        extra_stop = list(req.stop_token_ids or [])
        self.check_ids(extra_stop, "stop_token_ids")
        fields = dict(max_tokens=max_tokens, min_tokens=req.min_tokens,
                      temperature=1.0 if req.temperature is None else req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0),
                      min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
                      frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                      logit_bias=bias, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                      stop_token_ids=extra_stop + [i for i in stop_ids if i not in extra_stop],
                      ignore_eos=req.ignore_eos, n=req.n, seed=req.seed, logprobs=logprobs,
                      skip_special_tokens=req.skip_special_tokens)
        if guided is not None:
            fields["guided_json"] = guided
        try:
            return SamplingParams(**fields)
        except ValueError as e:
            m = re.match(r"SamplingParams\.(\w+)=", str(e))
            raise bad_request(str(e).replace("SamplingParams.", ""), param=m.group(1) if m else None) from None

    def guided(self, fmt: ResponseFormat | None):
        if fmt is None or fmt.type == "text":
            return None
        if not GUIDED_JSON:
            raise bad_request(f"response_format {fmt.type} needs constrained decoding, which is not available in "
                              "this engine", param="response_format")
        if fmt.type == "json_object":
            return True
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object",
                              param="response_format.json_schema")
        return schema

    # ------------------------------------------------------------------ token strings
    def token_str(self, tid: int) -> str:
        return self.tok.decode([tid])

    def token_bytes(self, tid: int) -> list[int]:
        """The token's own bytes: for byte-level BPE the bytes its symbols stand for (a piece of a multi-byte
        character decodes to U+FFFD, but its bytes are exact); otherwise the UTF-8 of its text."""
        raw = self.tok.id_to_token(tid)
        if self.byte_level and tid not in self.added_ids and all(c in UNICODE_TO_BYTE for c in raw):
            return [UNICODE_TO_BYTE[c] for c in raw]
        return list(self.token_str(tid).encode("utf-8"))

    def entry(self, tid: int, lp: float) -> dict:
        return {"token": self.token_str(tid), "logprob": lp, "bytes": self.token_bytes(tid)}

    def chat_logprobs(self, lps) -> list[dict]:
        return [{**self.entry(x.token_id, x.logprob),
                 "top_logprobs": [self.entry(t, v) for t, v in x.top.items()]} for x in lps]

    def completion_logprobs(self, lps, offset: int = 0) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for x in lps:
            s = self.token_str(x.token_id)
            tokens.append(s)
            values.append(x.logprob)
            tops.append({self.token_str(t): v for t, v in x.top.items()})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    # ------------------------------------------------------------------ chat
    def template_messages(self, messages: list[Message], param: str = "messages") -> list[dict]:
        out = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise bad_request(f"{param}[{i}].content[{j}] is a {part.type!r} part; only text parts are "
                                          "supported", param=f"{param}[{i}].content")
                    parts.append(part.text)
                content = "\n".join(parts)
            role = "system" if m.role == "developer" else m.role
            d: dict = {"role": role, "content": content}
            if m.tool_calls:
                d["tool_calls"] = [{**({"id": c.id} if c.id else {}), "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
            elif content is None:
                if role != "assistant":
                    raise bad_request(f"{param}[{i}] ({m.role}) has no content", param=f"{param}[{i}].content")
                d["content"] = ""
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
            out.append(d)
        return out

    def tools(self, req: ChatCompletionRequest) -> list[dict] | None:
        choice = req.tool_choice
        if choice is not None and not req.tools and choice != "none":
            raise bad_request("tool_choice is only allowed when tools are given", param="tool_choice")
        if choice == "none" or not req.tools:
            return None
        if isinstance(choice, dict) or choice == "required":
            raise bad_request(f"tool_choice {json.dumps(choice)} is not supported (forcing a call needs constrained "
                              "decoding); use \"auto\" or \"none\"", param="tool_choice")
        if choice not in (None, "auto"):
            raise bad_request(f"tool_choice must be \"auto\", \"none\", \"required\" or a function; got {choice!r}",
                              param="tool_choice")
        return [t.model_dump(exclude_none=True) for t in req.tools]

    def chat_prompt(self, messages: list[dict], tools, param: str = "messages", generation_prompt: bool = True):
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tools=tools)
        except ValueError as e:
            raise bad_request(f"the chat template cannot render these messages: {e}", param=param) from None

    async def chat(self, req: ChatCompletionRequest, request: Request):
        self.check_model(req.model)
        self.check_generator()
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        guided = self.guided(req.response_format)
        tools = self.tools(req)
        ids = self.chat_prompt(self.template_messages(req.messages), tools)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = self.sampling(req, prompt_len=len(ids), max_tokens=max_tokens, param="messages",
                               logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                               stop_ids=self.end_of_turn, guided=guided)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        run = _Run(self, request, [ids], params, cid)
        await run.start()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(run, req, cid, created, tools is not None, include_usage),
                                     media_type="text/event-stream", background=BackgroundTask(run.close))
        final = None
        try:
            async for _, out in run.results():
                final = out
        except ClientGone:
            return PlainTextResponse("", status_code=499)
        finally:
            run.close()
        choices = []
        for comp in final.outputs:
            message: dict = {"role": "assistant", "content": comp.text}
            finish = comp.finish_reason
            if tools is not None:
                content, calls = parse_tool_calls(comp.text)
                if calls:
                    message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            choices.append({"index": comp.index, "message": message, "finish_reason": finish,
                            "logprobs": {"content": self.chat_logprobs(comp.logprobs)} if req.logprobs else None})
        generated = sum(len(c.token_ids) for c in final.outputs)
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": _usage(len(ids), generated)}

    async def _chat_stream(self, run: _Run, req, cid: str, created: int, tools_active: bool, include_usage: bool):
        def chunk(choices, usage=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return _sse(body)

        n = req.n
        sent_text, sent_lp, done = [0] * n, [0] * n, [False] * n
        generated = 0
        try:
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for _, out in run.results():
                for comp in out.outputs:
                    i = comp.index
                    if done[i]:
                        continue
                    text = "" if tools_active else comp.text[sent_text[i]:]
                    lps = comp.logprobs[sent_lp[i]:len(comp.token_ids)] if req.logprobs else []
                    if text or lps:
                        yield chunk([{"index": i, "delta": {"content": text},
                                      "logprobs": {"content": self.chat_logprobs(lps)} if req.logprobs else None,
                                      "finish_reason": None}])
                        sent_text[i] += len(text)
                        sent_lp[i] += len(lps)
                    if comp.finish_reason is None:
                        continue
                    done[i] = True
                    generated += len(comp.token_ids)
                    finish = comp.finish_reason
                    if tools_active:
                        content, calls = parse_tool_calls(comp.text)
                        delta: dict = {"content": comp.text}
                        if calls:
                            finish = "tool_calls"
                            delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                            if content:
                                delta["content"] = content
                        yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                    yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
            if include_usage:
                yield chunk([], _usage(len(run.prompts[0]), generated))
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        except Exception as e:  # noqa: BLE001 -- the status line is gone: report in the stream
            log.exception("chat stream %s failed", cid)
            yield _sse(_internal(e).body())
            yield "data: [DONE]\n\n"
        finally:
            run.close()

    # ------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        self.check_generator()
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported", param="echo")
        if req.suffix:
            raise bad_request("suffix (insertion) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"best_of={req.best_of} is not supported: only best_of == n", param="best_of")
        guided = self.guided(req.response_format)
        prompt = req.prompt
        if isinstance(prompt, str):
            texts = [prompt]
        elif not prompt:
            raise bad_request("prompt is empty", param="prompt")
        elif all(isinstance(p, int) for p in prompt):
            texts = [list(prompt)]
        else:
            texts = list(prompt)
        prompts = []
        for p in texts:
            if isinstance(p, str):
                ids = self.tok.encode(p, parse_special=False)
            else:
                ids = list(p)
                self.check_ids(ids, "prompt")
            if not ids:
                raise bad_request("a prompt is empty: give at least one token", param="prompt")
            prompts.append(ids)
        longest = max(prompts, key=len)
        params = self.sampling(req, prompt_len=len(longest), max_tokens=req.max_tokens, param="prompt",
                               logprobs=req.logprobs, guided=guided)
        if req.max_tokens is None:  # the rest of the window of the longest prompt is what every prompt gets
            params.max_tokens = self.window - len(longest)
        echo = [(p if isinstance(p, str) else self.tok.decode(p)) if req.echo else "" for p in texts]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        run = _Run(self, request, prompts, params, cid)
        await run.start()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(run, req, cid, created, echo, include_usage),
                                     media_type="text/event-stream", background=BackgroundTask(run.close))
        finals: dict[int, object] = {}
        try:
            async for i, out in run.results():
                if out.finished:
                    finals[i] = out
        except ClientGone:
            return PlainTextResponse("", status_code=499)
        finally:
            run.close()
        choices, generated = [], 0
        for i in range(len(prompts)):
            for comp in finals[i].outputs:
                generated += len(comp.token_ids)
                choices.append({"index": i * req.n + comp.index, "text": echo[i] + comp.text,
                                "logprobs": self.completion_logprobs(comp.logprobs) if req.logprobs is not None
                                else None, "finish_reason": comp.finish_reason})
        return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": _usage(sum(map(len, prompts)), generated)}

    async def _completion_stream(self, run: _Run, req, cid: str, created: int, echo: list[str], include_usage: bool):
        def chunk(choices, usage=None) -> str:
            body = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return _sse(body)

        n = req.n
        sent_text: dict[int, int] = {}
        sent_lp: dict[int, int] = {}
        done: set[int] = set()
        generated = 0
        want_lp = req.logprobs is not None
        try:
            if any(echo):
                for i, e in enumerate(echo):
                    for k in range(n):
                        yield chunk([{"index": i * n + k, "text": e, "logprobs": None, "finish_reason": None}])
            async for i, out in run.results():
                for comp in out.outputs:
                    idx = i * n + comp.index
                    if idx in done:
                        continue
                    text = comp.text[sent_text.get(idx, 0):]
                    lps = comp.logprobs[sent_lp.get(idx, 0):len(comp.token_ids)] if want_lp else []
                    if text or lps:
                        lp = self.completion_logprobs(lps, sent_text.get(idx, 0)) if want_lp else None
                        yield chunk([{"index": idx, "text": text, "logprobs": lp, "finish_reason": None}])
                        sent_text[idx] = sent_text.get(idx, 0) + len(text)
                        sent_lp[idx] = sent_lp.get(idx, 0) + len(lps)
                    if comp.finish_reason is not None:
                        done.add(idx)
                        generated += len(comp.token_ids)
                        yield chunk([{"index": idx, "text": "", "logprobs": None,
                                      "finish_reason": comp.finish_reason}])
            if include_usage:
                yield chunk([], _usage(sum(map(len, run.prompts)), generated))
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        except Exception as e:  # noqa: BLE001
            log.exception("completion stream %s failed", cid)
            yield _sse(_internal(e).body())
            yield "data: [DONE]\n\n"
        finally:
            run.close()

    # ------------------------------------------------------------------ embeddings, tokens
    async def embeddings(self, req: EmbeddingRequest):
        self.check_model(req.model)
        if not self.is_encoder:
            raise bad_request(f"{self.model_name} is a {getattr(self.model.cfg, 'kind', 'decoder')} model; "
                              "/v1/embeddings needs an encoder model (such as minilm-l6)", param="model")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise bad_request("input is empty", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise bad_request("token-id input is not supported for embeddings; send text", param="input")
        dim = self.model.cfg.dim
        if req.dimensions is not None and req.dimensions != dim:
            raise bad_request(f"dimensions={req.dimensions} is not supported: this model's embeddings have {dim}",
                              param="dimensions")
        from ..api import embed

        async with self.semaphore:
            vectors = await asyncio.to_thread(embed, self.model, self.tok, texts)
        data = []
        for i, v in enumerate(vectors.float().cpu()):
            value = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                     else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(self.tok.encode(t)) for t in texts)
        self.metrics.add_tokens(tokens, 0)
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            ids = self.chat_prompt(self.template_messages(req.messages), tools,
                                   generation_prompt=req.add_generation_prompt)
        else:
            ids = self.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens, parse_special=False)
        out = {"count": len(ids), "max_model_len": self.window, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [self.tok.id_to_token(i) for i in ids]
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        self.check_ids(req.tokens, "tokens")
        return {"prompt": self.tok.decode(req.tokens)}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmlab",
                "max_model_len": self.window}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _internal(e: BaseException) -> APIError:
    return APIError(500, f"internal server error: {type(e).__name__}: {e}", type="internal_server_error")


# ------------------------------------------------------------------------------------------------ the app


def create_app(llm, *, model_name: str, api_key: str | None = None, max_concurrency: int = 64,
               max_body_bytes: int = 1_000_000) -> FastAPI:
    """A FastAPI app serving llm (an infer.LLM) under model_name. api_key: required as a Bearer token on every
    endpoint but /health and the web page. max_concurrency: HTTP generation requests in the engine at once
    (more wait their turn). max_body_bytes: larger request bodies get 413."""
    server = _Server(llm, model_name, api_key, max_concurrency, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.bridge.stop()

    app = FastAPI(title="llmlab OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.add_middleware(_Gate, server=server)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        elif first.get("type") == "missing" and not loc:
            message = "the request needs a JSON body"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first['msg']}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        return _error_response(bad_request(message, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.method} {request.url.path}"
        return _error_response(APIError(exc.status_code, str(message), type=kind))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error_response(_internal(exc))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await server.embeddings(body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return server.detokenize(body)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return server.model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.engine, server.model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse("<!doctype html><title>llmlab</title><p>llmlab serves the OpenAI API under /v1 "
                            "(the web chat page, serve/static/index.html, is not installed).</p>")

    app.mount("/static", _Static(directory=STATIC_DIR, check_dir=False), name="static")
    return app


class _Static(StaticFiles):
    """The web page's files; a 404 (not a 500) while the folder is missing."""

    async def get_response(self, path: str, scope):
        if not STATIC_DIR.is_dir():
            raise StarletteHTTPException(404)
        return await super().get_response(path, scope)
