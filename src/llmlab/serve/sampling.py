"""A chat or completions request's sampling fields -> SamplingParams, each bad value a 400 naming its field."""

from __future__ import annotations

import re

from ..infer import SamplingParams
from .protocol import ResponseFormat, bad_request
from .server import Server


def sampling_params(server: Server, req, *, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                    param: str, stop_ids: list[int] = (), guided=None) -> SamplingParams:
    """max_tokens None: the rest of the context window. param: the field the prompt came in (for the context
    length errors). stop_ids: stop tokens added to the request's own stop_token_ids. guided: guided_json."""
    window = server.window
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
        server.check_ids([tid], "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must lie in [-100, 100], got {value} for token {tid}",
                              param="logit_bias")
        bias[tid] = value
    extra_stop = list(req.stop_token_ids or [])
    server.check_ids(extra_stop, "stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0),
            min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
            logit_bias=bias, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=extra_stop + [i for i in stop_ids if i not in extra_stop],
            ignore_eos=req.ignore_eos, n=req.n, seed=req.seed, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, guided_json=guided)
    except ValueError as e:
        # SamplingParams names the field as "SamplingParams.top_p=..."; the client knows it as top_p
        m = re.match(r"SamplingParams\.(\w+)=", str(e))
        raise bad_request(str(e).replace("SamplingParams.", ""), param=m.group(1) if m else None) from None


def guided_json(server: Server, fmt: ResponseFormat | None) -> bool | dict | None:
    """SamplingParams.guided_json for a response_format: None (free text), True (any JSON object) or a schema."""
    if fmt is None or fmt.type == "text":
        return None
    if not server.json_mode_available():
        raise bad_request(f"response_format {fmt.type} needs constrained decoding, which is not available in "
                          "this engine", param="response_format")
    if fmt.type == "json_object":
        return True
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object",
                          param="response_format.json_schema")
    return schema
