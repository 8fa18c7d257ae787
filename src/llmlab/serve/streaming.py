"""Server-sent events for stream=true: the chunk format chat and completions share, and the stream's ending."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from .server import ClientGone, Run, Server, internal_error

log = logging.getLogger("llmlab.serve")

DONE = "data: [DONE]\n\n"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def wants_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def chunk_writer(server: Server, object_name: str, cid: str, created: int,
                 include_usage: bool) -> Callable[..., str]:
    """chunk(choices, usage=None) -> one event; with include_usage every chunk has "usage" (null but the last)."""

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": cid, "object": object_name, "created": created, "model": server.model_name,
                "choices": choices}
        if include_usage:
            body["usage"] = usage
        return sse(body)

    return chunk


async def _ended(run: Run, events: AsyncIterator[str], what: str, cid: str) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
        yield DONE
    except ClientGone:
        return
    except Exception as e:  # noqa: BLE001 -- the status line is gone: report in the stream
        log.exception("%s stream %s failed", what, cid)
        yield sse(internal_error(e).body())
        yield DONE
    finally:
        run.close()


def event_stream(run: Run, events: AsyncIterator[str], what: str, cid: str) -> StreamingResponse:
    """The response streaming events, then [DONE]. A failure after the first byte is an error event (then
    [DONE]); a client that left gets nothing more. The run is closed however it ends (the background task
    covers a response that never started iterating)."""
    return StreamingResponse(_ended(run, events, what, cid), media_type="text/event-stream",
                             background=BackgroundTask(run.close))
