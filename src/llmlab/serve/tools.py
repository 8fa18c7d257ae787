"""Tool calls parsed back out of generated text, in the two formats chat templates ask models for.

Hermes / Qwen / SmolLM: one or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (the
closing tag may be missing at the very end, when generation stopped at it); the text outside the blocks is the
message content. Llama 3: the whole reply is a JSON object with "name" and "parameters" (or "arguments"), or
several separated by ";" or whitespace, optionally after ``<|python_tag|>``.

    content, calls = parse_tool_calls(text)   # calls: OpenAI tool_calls dicts; [] when the text has none
"""

from __future__ import annotations

import json
import re
import uuid

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call(obj) -> dict | None:
    """An OpenAI tool call from {"name", "arguments" | "parameters"}; None when obj is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _json_objects(text: str) -> list | None:
    """text as a sequence of JSON values separated by whitespace or ';' (None when it is not one)."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
        if pos == len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.extend(value if isinstance(value, list) else [value])


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls). Without any valid call: (text, []). With calls: the text outside them, stripped,
    or None when nothing is left."""
    if "<tool_call>" in text:
        calls, kept, pos = [], [], 0
        for m in _BLOCK.finditer(text):
            body = _json_objects(m.group(1))
            parsed = [_call(v) for v in body] if body else [None]
            if all(parsed):
                calls += parsed
                kept.append(text[pos:m.start()])
                pos = m.end()
        if calls:
            kept.append(text[pos:])
            content = "".join(kept).strip()
            return content or None, calls
        return text, []
    stripped = text.strip()
    if stripped.startswith("<|python_tag|>"):
        stripped = stripped[len("<|python_tag|>"):].strip()
    if stripped.startswith(("{", "[")):
        values = _json_objects(stripped)
        if values:
            parsed = [_call(v) for v in values]
            if all(parsed):
                return None, parsed
    return text, []
