"""An OpenAI-compatible HTTP server on the continuously batching engine.

    from llmlab.serve import create_app
    app = create_app(llm, model_name="smollm2", api_key=None, max_concurrency=64, max_body_bytes=1_000_000)
    # uvicorn.run(app, host="127.0.0.1", port=8000)    -- or: llmlab serve SOURCE

The engine is stepped by one background thread (bridge.py); requests come and go through a command queue.
"""

from .app import create_app
from .tools import parse_tool_calls

__all__ = ["create_app", "parse_tool_calls"]
