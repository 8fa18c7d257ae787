"""The OpenAI-compatible HTTP server: a FastAPI app on one continuously batching engine.

    app = create_app(llm, model_name="smollm2", api_key=None, max_concurrency=64, max_body_bytes=1_000_000)

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /v1/embeddings (encoder
models), POST /tokenize and /detokenize (vLLM's bodies), GET /metrics (Prometheus), GET /health, and the web
chat page at GET / with its files under /static. Every endpoint but /health needs
``Authorization: Bearer KEY`` when api_key is set. Errors use OpenAI's shape {"error": {"message", "type",
"param", "code"}}: 400 validation and context length, 401 key, 404 model, 413 body size, 500 anything else
(the server keeps running).
"""

from __future__ import annotations

import base64
import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from .chat import chat_completion
from .completions import completion
from .embeddings import embeddings as embed_texts
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                       TokenizeRequest, bad_request)
from .server import Server, internal_error
from .tokens import detokenize as detokenize_ids
from .tokens import tokenize as tokenize_text

log = logging.getLogger("llmlab.serve")

# response_format json_object / json_schema (constrained decoding). The engine always has it; the switch stays
# so that the refusal a server without it gives can be tested (tests/serve flips it per request).
GUIDED_JSON = True
STATIC_DIR = Path(__file__).parent / "static"
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/tokenize",
               "/detokenize", "/metrics", "/health", "/"}


def _error_response(err: APIError, path: str = "") -> JSONResponse:
    headers = None
    if err.status == 401:  # a browser opening the page gets its password prompt (Basic); API clients use Bearer
        page = path == "/" or path.startswith("/static/")
        headers = {"WWW-Authenticate": 'Basic realm="llmlab", charset="UTF-8"' if page else "Bearer"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ------------------------------------------------------------------------------------------------ the gate


class _Gate:
    """Pure ASGI middleware: API key, body size (Content-Length and the bytes actually sent), request counts."""

    def __init__(self, app, server: Server) -> None:
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
                await _error_response(err, scope["path"])(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.server.metrics.count_request(_endpoint(scope["path"]), status[0])

    def _auth(self, scope) -> APIError | None:
        """Every path but /health needs the key: `Authorization: Bearer KEY`, or HTTP Basic with the key as the
        password (what a browser sends for the web page once its user typed the key into the prompt; the
        browser then sends it with the page's own API calls too)."""
        key, path = self.server.api_key, scope["path"]
        if key is None or path == "/health":
            return None
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not header:
            return APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                            type="authentication_error", code="invalid_api_key")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        elif scheme.lower() != "bearer":
            given = ""
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
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


# ------------------------------------------------------------------------------------------------ the app


def create_app(llm, *, model_name: str, api_key: str | None = None, max_concurrency: int = 64,
               max_body_bytes: int = 1_000_000) -> FastAPI:
    """A FastAPI app serving llm (an infer.LLM) under model_name. api_key: required as a Bearer token on every
    endpoint but /health and the web page. max_concurrency: HTTP generation requests in the engine at once
    (more wait their turn). max_body_bytes: larger request bodies get 413."""
    # GUIDED_JSON is looked up per request, not once here, so that flipping it takes effect on a running app
    server = Server(llm, model_name, api_key, max_concurrency, max_body_bytes,
                    json_mode_available=lambda: GUIDED_JSON)

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
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.method} {request.url.path}"
        return _error_response(APIError(exc.status_code, str(message), type=kind))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error_response(internal_error(exc))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat_completion(server, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await completion(server, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await embed_texts(server, body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return tokenize_text(server, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return detokenize_ids(server, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

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
