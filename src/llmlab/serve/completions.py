"""POST /v1/completions: raw prompts (text or token ids, one or a batch), n completions each."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import PlainTextResponse

from .protocol import CompletionRequest, bad_request
from .sampling import guided_json, sampling_params
from .server import ClientGone, Run, Server, usage
from .streaming import chunk_writer, event_stream, wants_usage


def _prompts(server: Server, prompt) -> tuple[list, list[list[int]]]:
    """(the prompts as given: text or id lists, their token ids); prompt: a string, ids, or a list of either."""
    if isinstance(prompt, str):
        given = [prompt]
    elif not prompt:
        raise bad_request("prompt is empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        given = [list(prompt)]
    else:
        given = list(prompt)
    prompts = []
    for p in given:
        if isinstance(p, str):
            ids = server.tok.encode(p, parse_special=False)
        else:
            ids = list(p)
            server.check_ids(ids, "prompt")
        if not ids:
            raise bad_request("a prompt is empty: give at least one token", param="prompt")
        prompts.append(ids)
    return given, prompts


async def completion(server: Server, req: CompletionRequest, request: Request):
    server.check_model(req.model)
    server.check_generator()
    if req.echo and req.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported", param="echo")
    if req.suffix:
        raise bad_request("suffix (insertion) is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of={req.best_of} is not supported: only best_of == n", param="best_of")
    guided = guided_json(server, req.response_format)
    given, prompts = _prompts(server, req.prompt)
    # Every prompt gets the same max_tokens: without one, the rest of the window of the longest prompt.
    params = sampling_params(server, req, prompt_len=max(map(len, prompts)), max_tokens=req.max_tokens,
                             param="prompt", logprobs=req.logprobs, guided=guided)
    echo = [(p if isinstance(p, str) else server.tok.decode(p)) if req.echo else "" for p in given]
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    run = Run(server, request, prompts, params, cid)
    await run.start()
    if req.stream:
        chunk = chunk_writer(server, "text_completion", cid, created, wants_usage(req))
        return event_stream(run, _completion_events(server, run, req, chunk, echo), "completion", cid)
    try:
        finals = await run.final_outputs()
    except ClientGone:
        return PlainTextResponse("", status_code=499)
    choices, generated = [], 0
    for i in range(len(prompts)):
        for comp in finals[i].outputs:
            generated += len(comp.token_ids)
            choices.append({"index": i * req.n + comp.index, "text": echo[i] + comp.text,
                            "logprobs": server.logprobs.completion(comp.logprobs) if req.logprobs is not None
                            else None, "finish_reason": comp.finish_reason})
    return {"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
            "choices": choices, "usage": usage(sum(map(len, prompts)), generated)}


async def _completion_events(server: Server, run: Run, req: CompletionRequest, chunk, echo: list[str]):
    """The chunks of every prompt's n choices (choice index: prompt index * n + completion index); the echoed
    prompts first."""
    n = req.n
    sent_text: dict[int, int] = {}
    sent_lp: dict[int, int] = {}
    done: set[int] = set()
    generated = 0
    want_lp = req.logprobs is not None
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
                lp = server.logprobs.completion(lps, sent_text.get(idx, 0)) if want_lp else None
                yield chunk([{"index": idx, "text": text, "logprobs": lp, "finish_reason": None}])
                sent_text[idx] = sent_text.get(idx, 0) + len(text)
                sent_lp[idx] = sent_lp.get(idx, 0) + len(lps)
            if comp.finish_reason is not None:
                done.add(idx)
                generated += len(comp.token_ids)
                yield chunk([{"index": idx, "text": "", "logprobs": None, "finish_reason": comp.finish_reason}])
    if wants_usage(req):
        yield chunk([], usage(sum(map(len, run.prompts)), generated))
