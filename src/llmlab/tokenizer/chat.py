"""Chat templates: render a conversation to the text a chat model was trained on, and find the assistant turns.

Templates are Jinja source, as shipped in Hugging Face ``tokenizer_config.json`` (``chat_template``) or GGUF
metadata (``tokenizer.chat_template``). They are untrusted code, so they run in jinja2's immutable sandbox, set
up so the text is byte-identical to transformers' ``apply_chat_template(..., tokenize=False)``: trim_blocks and
lstrip_blocks, loop controls, ``tojson`` as ``json.dumps(ensure_ascii=False, indent=..., separators=...,
sort_keys=...)``, globals ``raise_exception``, ``strftime_now``, ``dict``, ``namespace``; the template sees
``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and every extra keyword (the tokenizer passes
its special tokens, ``bos_token=...``). As in transformers 5, message keys whose value is None are dropped and a
message's reasoning is readable as both ``reasoning_content`` and ``thinking``.

Assistant spans, what multi-turn SFT trains on: the characters the assistant produced in one turn, its content
and tool calls *plus its end-of-turn token* (so the model learns to stop), *without* the role header (the prompt
writes that). ``{% generation %}...{% endgeneration %}`` blocks mark them; in a template without the tag a span
starts after the generation prompt (``render(messages[:i], add_generation_prompt=True)``) and ends where
``render(messages[:i+1])`` ends, less trailing whitespace (the newline between turns is the template's).

Tool calls in the built-ins use the OpenAI shape: assistant ``tool_calls=[{"type": "function", "function":
{"name": ..., "arguments": dict or JSON string}}]``, results as ``{"role": "tool", "content": ...}``. ChatML writes
them as Qwen2.5 does (tools in the system turn inside ``<tools>``, one ``<tool_call>\\n{"name", "arguments"}
\\n</tool_call>`` per call, consecutive results in one user turn as ``<tool_response>`` blocks); Llama-3 as Llama 3.1's
JSON tool use (tools as indented JSON in the system turn, one ``{"name", "parameters"}`` line per call, results
in an ``ipython`` turn).

User text that looks like a control token (``"<|im_end|>"``) renders verbatim: the defence against prompt
injection is the tokenizer's, which must encode message text with special-token parsing off.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

__all__ = ["CHATML", "LLAMA3", "assistant_token_mask", "chatml", "get_template", "llama3", "render_chat",
           "render_chat_with_spans"]

# ------------------------------------------------------------------------------------------------ environment

# Unicode noncharacters bracket each {% generation %} block's output while spans are wanted; they are stripped
# afterwards. Markers (rather than counting rendered characters) stay right when a block sits in a macro or a
# {% set %} block, whose output Jinja buffers before emitting.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_marking: ContextVar[bool] = ContextVar("llmlab_chat_marking", default=False)
_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")


class _Raised(TemplateError):
    """A template's own raise_exception(message): the template rejects the conversation."""


def _raise_exception(message: str):
    raise _Raised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML; chat templates want plain JSON, as transformers does.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates may not store underscore names on a namespace (got {name!r})")


class _SafeNamespace(Namespace):
    """namespace() that refuses underscore attribute names, which the sandbox treats as internals."""

    def __init__(*args, **kwargs):  # self comes in args, as in jinja's Namespace, so namespace(self=1) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        # jinja returns an Undefined that prints as "", so `{{ x.__class__ }}` would pass silently; a template
        # probing internals is hostile or broken either way, so stop it at once.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _GenerationBlocks(Extension):
    """{% generation %}...{% endgeneration %}: renders its body, bracketed by span markers when they are wanted."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    def _render_block(self, caller):
        text = caller()
        return _OPEN + text + _CLOSE if _marking.get() else text


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                    dict=_Dict(), namespace=_SafeNamespace)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error on line {e.lineno}: {e.message}") from None


# ------------------------------------------------------------------------------------------------ inputs


def _plain(value: Any, where: str, forbid_markers: bool = False) -> Any:
    """A fresh copy built from JSON-like types only: the sandbox trusts str/dict/list methods, not arbitrary
    objects (a numpy array or a pydantic model has methods that do real work), and the copy keeps the template
    away from the caller's data."""
    if isinstance(value, str):
        if forbid_markers and (_OPEN in value or _CLOSE in value):
            raise ValueError(f"{where} contains U+FDD0/U+FDD1, which mark assistant spans; remove them")
        return str.__str__(value)  # a str subclass could carry extra methods
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, where, forbid_markers): _plain(v, f"{where}[{k!r}]", forbid_markers)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]", forbid_markers) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise ValueError(f"{where} is a {type(value).__name__}; chat templates only see str, int, float, bool, None, "
                     "dict and list values: convert it first")


def _check_messages(messages: Any) -> None:
    # ValueError throughout, so an SFT loader can catch one exception type and report or skip the bad row.
    example = "[{'role': 'user', 'content': 'Hi'}]"
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts like {example}, got a {type(messages).__name__}")
    if not messages:
        raise ValueError(f"messages is empty; a chat needs at least one message, like {example}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got a {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}]['role'] must be a str such as 'user' or 'assistant', "
                             f"got {m.get('role')!r}")
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, (list, tuple))
                                  or not all(isinstance(c, Mapping) for c in calls)):
            raise ValueError(f"messages[{i}]['tool_calls'] must be a list of dicts like {{'type': 'function', "
                             f"'function': {{'name': ..., 'arguments': {{...}}}}}}, got {calls!r}")
        content = m.get("content")
        if isinstance(content, str) or (content is None and calls):
            continue
        if content is None:
            raise ValueError(f"messages[{i}] ({m['role']}) has no content: give a str (content may be None or "
                             "missing only on an assistant message with tool_calls)")
        raise ValueError(f"messages[{i}]['content'] must be a str, got a {type(content).__name__}; "
                         "join multi-part content into one string first")


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _prepare(messages, tools, documents, variables, forbid_markers=False):
    _check_messages(messages)
    prepared = []
    for i, m in enumerate(messages):
        # APIs send content=None / tool_calls=None; templates handle a missing key better than a None value.
        m = {k: v for k, v in _plain(m, f"messages[{i}]", forbid_markers).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
        if reasoning is not None:  # templates read `reasoning_content`, gpt-oss ones read `thinking`
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        prepared.append(m)
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, Mapping) for t in tools)):
        raise ValueError("tools must be a list of JSON-schema dicts like {'type': 'function', 'function': "
                         "{'name': ..., 'description': ..., 'parameters': {...}}}")
    if documents is not None and not (isinstance(documents, (list, tuple))
                                      and all(isinstance(d, Mapping) for d in documents)):
        raise ValueError("documents must be a list of dicts, usually with 'title' and 'text' keys")
    return (prepared, _plain(tools, "tools", forbid_markers), _plain(documents, "documents", forbid_markers),
            _plain(variables, "template variables", forbid_markers))


# ------------------------------------------------------------------------------------------------ rendering


def _check_template(template: Any) -> str:
    if not isinstance(template, str):
        raise ValueError(f"template must be Jinja source text, got a {type(template).__name__}; "
                         "for a built-in use get_template('chatml') or get_template('llama3')")
    return template


def _render(template, messages, add_generation_prompt, tools, documents, variables, mark=False) -> str:
    compiled = _compile(_check_template(template))
    token = _marking.set(mark)
    try:
        return compiled.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except _Raised as e:
        raise ValueError(f"the chat template rejected this conversation: {e.message}") from None
    except SecurityError as e:
        raise ValueError(f"the chat template did something the sandbox forbids: {e}. Chat templates may only "
                         "read messages and variables; do not use this template") from None
    except Exception as e:  # template bugs or data the template cannot handle (UndefinedError, TypeError, ...)
        raise ValueError(f"rendering the chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _marking.reset(token)


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
                **variables: Any) -> str:
    """The conversation as the template writes it; equal to transformers' apply_chat_template(tokenize=False)
    given the same variables (pass the tokenizer's special tokens, e.g. bos_token=..., eos_token=...)."""
    messages, tools, documents, variables = _prepare(messages, tools, documents, variables)
    return _render(template, messages, add_generation_prompt, tools, documents, variables)


def render_chat_with_spans(template: str, messages: Sequence[Mapping[str, Any]], *,
                           add_generation_prompt: bool = False, tools: Sequence[Mapping] | None = None,
                           documents: Sequence[Mapping] | None = None,
                           **variables: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the assistant turns (see the module doc):
    from {% generation %} blocks when the template has them, otherwise from rendering message prefixes."""
    marked = _GENERATION_TAG.search(_check_template(template)) is not None
    args = _prepare(messages, tools, documents, variables, forbid_markers=marked)
    if marked:
        return _split_markers(_render(template, args[0], add_generation_prompt, *args[1:], mark=True))
    text = _render(template, args[0], add_generation_prompt, *args[1:])
    return text, _prefix_spans(template, text, *args)


_CONTENT = "\uE000{}\uE001"  # private-use characters around a message number


def content_spans(template: str, messages: Sequence[Mapping[str, Any]], text: str, *,
                  add_generation_prompt: bool = False, tools: Sequence[Mapping] | None = None,
                  documents: Sequence[Mapping] | None = None, **variables: Any) -> list[tuple[int, int]] | None:
    """The [start, end) character spans of the messages' string contents in `text` (their rendering), found by
    rendering once more with every content replaced by a numbered marker and checking that putting the
    contents back gives `text` exactly. None when it does not (a template that trims or tests contents):
    the caller then searches for them. A search alone can be fooled: the reply "a" is also in "assistant"."""
    if any(_CONTENT[0] in str(m.get("content", "")) or _CONTENT[-1] in str(m.get("content", "")) for m in messages):
        return None
    marked = [dict(m, content=_CONTENT.format(j)) if isinstance(m.get("content"), str) and m["content"] else m
              for j, m in enumerate(messages)]
    try:
        args = _prepare(marked, tools, documents, variables)
        rendered = _render(template, args[0], add_generation_prompt, *args[1:])
    except ValueError:
        return None
    parts = re.split(f"{_CONTENT[0]}(\\d+){_CONTENT[-1]}", rendered)
    spans, rebuilt, pos = [], [], 0
    for k, piece in enumerate(parts):
        if k % 2:
            j = int(piece)
            if j >= len(messages) or not isinstance(messages[j].get("content"), str):
                return None
            piece = messages[j]["content"]
            spans.append((pos, pos + len(piece)))
        rebuilt.append(piece)
        pos += len(piece)
    return spans if "".join(rebuilt) == text else None


def _split_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    pieces, spans, start, pos = [], [], None, 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece == _OPEN:
            if start is not None:
                raise ValueError("the chat template nests {% generation %} blocks; a span cannot hold another")
            start = pos
        elif piece == _CLOSE:
            if start is None:
                raise ValueError("the chat template's output contains U+FDD1, which marks assistant spans")
            if pos > start:  # an empty block trains on nothing
                spans.append((start, pos))
            start = None
        else:
            pieces.append(piece)
            pos += len(piece)
    if start is not None:
        raise ValueError("the chat template's output contains U+FDD0, which marks assistant spans")
    return "".join(pieces), spans


def _prefix_spans(template, text, messages, tools, documents, variables) -> list[tuple[int, int]]:
    def render_prefix(n: int, prompt: bool) -> str:
        try:
            return _render(template, messages[:n], prompt, tools, documents, variables)
        except ValueError as e:
            if n == 0:  # many templates index messages[0]; an assistant-first chat then has no header to find
                return ""
            raise ValueError(f"finding assistant spans by rendering messages[:{n}] failed ({e}); add "
                             "{% generation %}...{% endgeneration %} around the assistant turn in the template "
                             "instead") from None

    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, with_prompt, upto = render_prefix(i, False), render_prefix(i, True), render_prefix(i + 1, False)
        if not (text.startswith(head) and text.startswith(upto) and with_prompt.startswith(head)):
            raise ValueError(
                f"the chat template is not prefix-stable at messages[{i}]: rendering messages[:{i}] or [:{i + 1}] "
                "does not give a prefix of the whole chat (templates that rewrite earlier turns, e.g. drop old "
                "reasoning, or write a footer do this). Mark assistant turns with {% generation %}...{% "
                "endgeneration %} instead")
        prompt, turn = with_prompt[len(head):], text[len(head):len(upto)]
        # The assistant header is the generation prompt; after an empty prefix it may follow a preamble (a
        # default system turn), and a prompt that differs from the written header (say it opens <think>)
        # still matches up to where they part.
        found = turn.find(prompt) if prompt else -1
        start = len(head) + (found + len(prompt) if found >= 0 else len(os.path.commonprefix([prompt, turn])))
        end = len(head) + len(turn.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def assistant_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token trained on, 0 otherwise. A token counts when its characters [start, end) overlap a span
    (transformers' return_assistant_tokens_mask rule): a token straddling the span start holds the first
    characters of the answer, and one straddling the end holds its end-of-turn token, so both are kept."""
    merged: list[list[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    ends = [e for _, e in merged]
    mask = []
    for i, pair in enumerate(offsets):
        if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
            raise ValueError(f"offsets[{i}] must be a (start, end) character pair with 0 <= start <= end, "
                             f"got {pair!r}")
        start, end = pair
        j = bisect.bisect_right(ends, start)  # first span ending after this token starts
        mask.append(int(j < len(merged) and merged[j][0] < end))
    return mask


# ------------------------------------------------------------------------------------------------ built-ins


def _literal(text: str | None) -> str:
    # JSON string syntax is valid Jinja string syntax (\n, \", \\, \uXXXX); none means "no default system turn".
    return "none" if text is None else json.dumps(text, ensure_ascii=False)


def _system_turn(default_system, opening, closing, tools_intro, tool_json, content="system") -> str:
    # The system turn: the chat's own system message, else the default, plus the tool list when tools are given.
    return (
        "{%- if messages and messages[0].role == 'system' -%}"
        "{%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {_literal(default_system)} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}"
        "{%- if system is not none or tools -%}"
        f"{{{{- {opening!r} -}}}}{{%- if system is not none -%}}{{{{- {content} -}}}}{{%- endif -%}}"
        f"{{%- if tools -%}}{{{{- ('\\n\\n' if system else '') + {tools_intro!r} + {tool_json} -}}}}{{%- endif -%}}"
        f"{{{{- {closing!r} -}}}}"
        "{%- endif -%}"
    )


def _tool_calls(call_format: str) -> str:
    # One line per call, after the content; `arguments` may be a dict or an already-serialised JSON string.
    return (
        "{%- for call in m.tool_calls or [] -%}"
        "{%- set f = call.function if call.function is defined else call -%}"
        "{%- set args = f.arguments if f.arguments is string else (f.arguments | tojson) -%}"
        f"{{{{- ('\\n' if m.content or not loop.first else '') + {call_format} -}}}}"
        "{%- endfor -%}"
    )


def chatml(default_system: str | None = None) -> str:
    """ChatML (SmolLM2, Qwen): <|im_start|>role\\ncontent<|im_end|>\\n; default_system is used when the chat has
    no system message (SmolLM2's own template does this)."""
    tools_intro = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
                   "provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
    tools_outro = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                   "\"arguments\": <args-json-object>}\n</tool_call>")
    return (
        _system_turn(default_system, "<|im_start|>system\n", "<|im_end|>\n", tools_intro,
                     f"(tools | map('tojson') | join('\\n')) + {tools_outro!r}")
        + "{%- for m in turns -%}"
        "{%- if m.role == 'assistant' -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{% generation %}{%- if m.content is string -%}{{- m.content -}}{%- endif -%}"
        + _tool_calls("'<tool_call>\\n{\"name\": ' + (f.name | tojson) + ', \"arguments\": ' + args "
                      "+ '}\\n</tool_call>'")
        + "{{- '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
        # Consecutive tool results share one user turn, as Qwen2.5 writes them.
        "{%- elif m.role == 'tool' -%}"
        "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
        "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
        "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- else -%}"
        "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def llama3(default_system: str | None = None) -> str:
    """Llama 3: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> per turn,
    content trimmed as Meta's template does; tool results go in an `ipython` turn."""
    tools_intro = ("You have access to the following functions. To call a function, respond with JSON of the form "
                   "{\"name\": function name, \"parameters\": dictionary of argument name and its value}.\n\n")
    return (
        "{{- '<|begin_of_text|>' -}}"
        + _system_turn(default_system, "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>",
                       tools_intro, "(tools | map('tojson', indent=4) | join('\\n\\n'))", content="system | trim")
        + "{%- for m in turns -%}"
        "{%- set role = 'ipython' if m.role == 'tool' else m.role -%}"
        "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
        "{%- if m.role == 'assistant' -%}"
        "{% generation %}{%- if m.content is string -%}{{- m.content | trim -}}{%- endif -%}"
        + _tool_calls("'{\"name\": ' + (f.name | tojson) + ', \"parameters\": ' + args + '}'")
        + "{{- '<|eot_id|>' -}}{% endgeneration %}"
        "{%- else -%}"
        "{{- (m.content | trim) + '<|eot_id|>' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )


CHATML = chatml()
LLAMA3 = llama3()
_BUILTINS = {"chatml": chatml, "llama3": llama3}


def get_template(name: str, default_system: str | None = None) -> str:
    """A built-in template by name: "chatml" or "llama3"."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    if key not in _BUILTINS:
        raise ValueError(f"unknown chat template {name!r}; built-ins: {', '.join(sorted(_BUILTINS))} "
                         "(or pass the Jinja source from the model's tokenizer_config.json / GGUF)")
    return _BUILTINS[key](default_system)

