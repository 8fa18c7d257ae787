"""POST /v1/embeddings, for encoder models."""

from __future__ import annotations

import asyncio
import base64

from .protocol import EmbeddingRequest, bad_request
from .server import Server


async def embeddings(server: Server, req: EmbeddingRequest) -> dict:
    server.check_model(req.model)
    if not server.is_encoder:
        raise bad_request(f"{server.model_name} is a {getattr(server.model.cfg, 'kind', 'decoder')} model; "
                          "/v1/embeddings needs an encoder model (such as minilm-l6)", param="model")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts:
        raise bad_request("input is empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise bad_request("token-id input is not supported for embeddings; send text", param="input")
    dim = server.model.cfg.dim
    if req.dimensions is not None and req.dimensions != dim:
        raise bad_request(f"dimensions={req.dimensions} is not supported: this model's embeddings have {dim}",
                          param="dimensions")
    from ..api import embed

    # The encoder runs off the event loop, and takes a concurrency slot like a generation request.
    async with server.semaphore:
        vectors = await asyncio.to_thread(embed, server.model, server.tok, texts)
    data = []
    for i, v in enumerate(vectors.float().cpu()):
        value = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(server.tok.encode(t)) for t in texts)
    server.metrics.add_tokens(tokens, 0)
    return {"object": "list", "data": data, "model": server.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
