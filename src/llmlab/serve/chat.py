"""POST /v1/chat/completions: messages through the chat template, tool calls parsed back out of the reply."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import PlainTextResponse

from .protocol import ChatCompletionRequest, Message, Tool, bad_request
from .sampling import guided_json, sampling_params
from .server import ClientGone, Run, Server, usage
from .streaming import chunk_writer, event_stream, wants_usage
from .tools import parse_tool_calls


def template_messages(messages: list[Message], param: str = "messages") -> list[dict]:
    """The messages as the chat template's dicts: text parts joined, developer -> system, tool calls kept."""
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


def tool_dicts(tools: list[Tool]) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in tools]


def chat_tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The tools to put in the prompt (None: no tool calls are parsed); tool_choice values that would need
    constrained decoding to force a call are refused."""
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
    return tool_dicts(req.tools)


def chat_prompt(server: Server, messages: list[dict], tools, param: str = "messages",
                generation_prompt: bool = True) -> list[int]:
    try:
        return server.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tools=tools)
    except ValueError as e:
        raise bad_request(f"the chat template cannot render these messages: {e}", param=param) from None


async def chat_completion(server: Server, req: ChatCompletionRequest, request: Request):
    server.check_model(req.model)
    server.check_generator()
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    guided = guided_json(server, req.response_format)
    tools = chat_tools(req)
    ids = chat_prompt(server, template_messages(req.messages), tools)
    params = sampling_params(server, req, prompt_len=len(ids), max_tokens=req.max_completion_tokens or req.max_tokens,
                             param="messages", logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                             stop_ids=server.end_of_turn, guided=guided)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    run = Run(server, request, [ids], params, cid)
    await run.start()
    if req.stream:
        chunk = chunk_writer(server, "chat.completion.chunk", cid, created, wants_usage(req))
        return event_stream(run, _chat_events(server, run, req, chunk, tools is not None), "chat", cid)
    try:
        final = (await run.final_outputs())[0]
    except ClientGone:
        return PlainTextResponse("", status_code=499)
    choices = []
    for comp in final.outputs:
        message: dict = {"role": "assistant", "content": comp.text}
        finish = comp.finish_reason
        if tools is not None:
            content, calls = parse_tool_calls(comp.text)
            if calls:
                message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        choices.append({"index": comp.index, "message": message, "finish_reason": finish,
                        "logprobs": {"content": server.logprobs.chat(comp.logprobs)} if req.logprobs else None})
    generated = sum(len(c.token_ids) for c in final.outputs)
    return {"id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
            "choices": choices, "usage": usage(len(ids), generated)}


async def _chat_events(server: Server, run: Run, req: ChatCompletionRequest, chunk, tools_active: bool):
    """The chunks of n choices. With tools the text is held back until a choice finishes: only then can it be
    told apart from a tool call (its logprobs still stream)."""
    n = req.n
    sent_text, sent_lp, done = [0] * n, [0] * n, [False] * n
    generated = 0
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
                              "logprobs": {"content": server.logprobs.chat(lps)} if req.logprobs else None,
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
    if wants_usage(req):
        yield chunk([], usage(len(run.prompts[0]), generated))
