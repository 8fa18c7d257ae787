"""POST /tokenize and /detokenize, with vLLM's request and response bodies."""

from __future__ import annotations

from .chat import chat_prompt, template_messages, tool_dicts
from .protocol import DetokenizeRequest, TokenizeRequest, bad_request
from .server import Server


def tokenize(server: Server, req: TokenizeRequest) -> dict:
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        ids = chat_prompt(server, template_messages(req.messages), tool_dicts(req.tools) if req.tools else None,
                          generation_prompt=req.add_generation_prompt)
    else:
        ids = server.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens, parse_special=False)
    out = {"count": len(ids), "max_model_len": server.window, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [server.tok.id_to_token(i) for i in ids]
    return out


def detokenize(server: Server, req: DetokenizeRequest) -> dict:
    server.check_model(req.model)
    server.check_ids(req.tokens, "tokens")
    return {"prompt": server.tok.decode(req.tokens)}
