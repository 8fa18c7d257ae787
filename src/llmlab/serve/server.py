"""What every endpoint shares: the Server (the model, tokenizer, engine bridge, concurrency limit and metrics of
one app, and the checks common to the endpoints) and the Run (the engine requests of one HTTP call)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from ..infer import SamplingParams
from .bridge import Submission, bridge_for
from .end_of_turn import end_of_turn_ids
from .logprobs import LogprobFormatter
from .metrics import Metrics
from .protocol import APIError, bad_request

# How often a waiting request checks whether its client is still there (an abandoned request frees its KV blocks).
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client disconnected; its requests were aborted."""


class Server:
    """The state of one app. json_mode_available is asked on every request with a response_format json_*."""

    def __init__(self, llm, model_name: str, api_key: str | None, max_concurrency: int, max_body_bytes: int, *,
                 json_mode_available: Callable[[], bool]) -> None:
        if llm.tokenizer is None:
            raise ValueError("the server needs a tokenizer: LLM(model, tokenizer)")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.tok, self.engine, self.model = llm.tokenizer, llm.engine, llm.model
        self.model_name, self.api_key = model_name, api_key or None
        self.max_body_bytes = max_body_bytes
        self.json_mode_available = json_mode_available
        self.semaphore = asyncio.Semaphore(max_concurrency)
        self.metrics = Metrics()
        self.bridge = bridge_for(self.engine)
        self.window = self.engine.max_seq_len
        self.vocab = min(len(self.tok), self.model.cfg.vocab_size)
        self.is_encoder = getattr(self.model.cfg, "kind", "decoder") == "encoder"
        self.created = int(time.time())
        self.end_of_turn = end_of_turn_ids(self.tok, self.engine.eos_token_ids)
        self.logprobs = LogprobFormatter(self.tok)

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

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmlab",
                "max_model_len": self.window}


class Run:
    """The engine requests of one HTTP call: a concurrency slot, the submission, timing and token counts."""

    def __init__(self, server: Server, request: Request, prompts: list[list[int]], params: SamplingParams,
                 rid: str) -> None:
        self.server, self.request, self.prompts, self.params, self.rid = server, request, prompts, params, rid
        self.t0 = time.perf_counter()
        self.first_token: float | None = None
        self.generated: dict[tuple[int, int], int] = {}  # (prompt index, completion index) -> tokens so far
        self.sub: Submission | None = None
        self._slot = False
        self._closed = False

    async def start(self) -> None:
        """Wait for a concurrency slot and submit; the engine's refusal (a ValueError) becomes a 400."""
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
        """(prompt index, RequestOutput) as the engine advances, until all have finished; ClientGone (after
        aborting the rest) when the client disconnects."""
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

    async def final_outputs(self) -> dict[int, object]:
        """For a non-streamed response: run to the end and close; the finished RequestOutput of each prompt."""
        finals: dict[int, object] = {}
        try:
            async for i, out in self.results():
                finals[i] = out  # the last output of a request is its finished one
        finally:
            self.close()
        return finals

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


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def internal_error(e: BaseException) -> APIError:
    return APIError(500, f"internal server error: {type(e).__name__}: {e}", type="internal_server_error")
