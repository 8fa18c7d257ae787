"""One engine, driven by one background thread, fed from asyncio.

The thread loops ``engine.step()`` while there is work and sleeps on a condition when there is none. The asyncio
side never calls the engine: it posts "add" and "abort" commands to a queue that the thread applies between
steps, and reads each request's results from an asyncio.Queue that the thread fills through
``loop.call_soon_threadsafe``. Every item is ``(request_id, kind, payload)``:

    ("ack", None)             the engine accepted the request
    ("error", exception)      add_request refused it, or a step failed (the request is gone)
    ("out", RequestOutput)    the request advanced; the last one has .finished

    sub = bridge.submit([(rid, prompt_ids, params), ...])   # in the event loop
    await sub.accepted()                                     # raises the engine's ValueError, if any
    async for rid, out in sub: ...                           # until every request has finished
    sub.abort()                                              # idempotent: frees the KV blocks of the rest
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Sequence

log = logging.getLogger("llmlab.serve")

_BRIDGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BRIDGES_LOCK = threading.Lock()


def bridge_for(engine) -> EngineBridge:
    """The one bridge of this engine (apps created on the same engine share it, so one thread steps it)."""
    with _BRIDGES_LOCK:
        bridge = _BRIDGES.get(engine)
        if bridge is None:
            bridge = _BRIDGES[engine] = EngineBridge(engine)
        return bridge


class EngineBridge:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ asyncio side
    def _post(self, command: tuple) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="llmlab-engine", daemon=True)
                self._thread.start()
            self._commands.append(command)
            self._cond.notify()

    def submit(self, requests: Sequence[tuple[str, list[int], object]]) -> Submission:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for rid, ids, params in requests:
            self._post(("add", rid, ids, params, loop, queue))
        return Submission(self, [r[0] for r in requests], queue)

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            thread = self._thread
            self._stopping = True
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _emit(self, rid: str, kind: str, payload) -> None:
        sink = self._sinks.get(rid)
        if sink is None:
            return
        loop, queue = sink
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (rid, kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._sinks.pop(rid, None)
            self.engine.abort(rid)

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, rid, ids, params, loop, queue = command
            self._sinks[rid] = (loop, queue)
            try:
                self.engine.add_request(rid, ids, params)
            except Exception as e:  # noqa: BLE001 -- reported to the request, the loop goes on
                self._emit(rid, "error", e)
                self._sinks.pop(rid, None)
            else:
                self._emit(rid, "ack", None)
        else:
            rid = command[1]
            self._sinks.pop(rid, None)
            self.engine.abort(rid)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not engine.has_unfinished():
                    self._cond.wait()
                if self._stopping:
                    for rid in list(self._sinks):
                        engine.abort(rid)
                        self._emit(rid, "error", RuntimeError("the server is shutting down"))
                    self._sinks.clear()
                    self._commands.clear()
                    return
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 -- fail the requests in flight, keep serving
                log.exception("engine step failed; aborting the %d requests in flight", len(self._sinks))
                for rid in list(self._sinks):
                    engine.abort(rid)
                    self._emit(rid, "error", e)
                self._sinks.clear()
                for rid in list(getattr(engine, "requests", {})):
                    engine.abort(rid)
                continue
            for out in outputs:
                self._emit(out.request_id, "out", out)
                if out.finished:
                    self._sinks.pop(out.request_id, None)


class Submission:
    """The requests of one HTTP call: their results in one queue."""

    def __init__(self, bridge: EngineBridge, rids: list[str], queue: asyncio.Queue) -> None:
        self.bridge, self.rids, self.queue = bridge, rids, queue
        self.pending = set(rids)  # not finished yet
        self._aborted = False
        self._early: list[tuple] = []  # outputs that arrived while accepted() waited for the acks

    async def accepted(self) -> None:
        """Wait for every request's ack; on a refusal abort the others and raise the engine's error."""
        waiting, error = set(self.rids), None
        while waiting:
            rid, kind, payload = await self.queue.get()
            if kind == "ack":
                waiting.discard(rid)
            elif kind == "error":
                waiting.discard(rid)
                self.pending.discard(rid)
                error = error or payload
            else:  # an output of an accepted request arrived first; keep it for the reader
                self._early.append((rid, kind, payload))
        if error is not None:
            self.abort()
            raise error

    async def next(self, timeout: float | None = None):
        """(rid, RequestOutput) or raises the error of a failed step; TimeoutError after timeout seconds."""
        if self._early:
            rid, kind, payload = self._early.pop(0)
        elif timeout is None:
            rid, kind, payload = await self.queue.get()
        else:
            rid, kind, payload = await asyncio.wait_for(self.queue.get(), timeout)
        if kind == "error":
            self.pending.discard(rid)
            raise payload
        if kind == "out" and payload.finished:
            self.pending.discard(rid)
        return rid, payload

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        for rid in self.pending:
            self.bridge.abort(rid)
        self.pending.clear()

