"""`llmlab serve SRC`: an OpenAI-compatible HTTP server (chat, completions, models, embeddings, tokenize,
metrics) on the continuously batching engine, plus a web chat page at /.

    llmlab serve smollm2-135m-instruct                        # http://127.0.0.1:8000/v1
    llmlab serve ckpt/ --port 9000 --api-key secret --max-concurrency 16
    llmlab serve minilm-l6                                    # an encoder: /v1/embeddings

Any OpenAI client works against it: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret"). It binds
the loopback interface unless --host says otherwise; with --api-key (or LLMLAB_API_KEY) every endpoint except
/health and the web page needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import os

from .generate import add_model_args, load_llm


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is invalid: it must lie in [0, 65535]")
    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency {args.max_concurrency} is invalid: it must be >= 1")
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes {args.max_body_bytes} is invalid: it must be >= 1")
    import uvicorn

    from ..serve import create_app

    llm = load_llm(args)
    if args.chat_template:
        llm.tokenizer.chat_template = args.chat_template
    name = args.served_model_name or args.src
    api_key = args.api_key or os.environ.get("LLMLAB_API_KEY") or None
    app = create_app(llm, model_name=name, api_key=api_key, max_concurrency=args.max_concurrency,
                     max_body_bytes=args.max_body_bytes)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1" + (" (API key required)" if api_key else ""),
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("serve", help="OpenAI-compatible HTTP server on the inference engine",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $LLMLAB_API_KEY, else no key)")
    s.add_argument("--max-concurrency", type=int, default=64, metavar="N",
                   help="generation requests in the engine at once; more wait their turn (default 64)")
    s.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: SRC)")
    s.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413 (default 1e6)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn log level (default info)")
    p.set_defaults(run=_serve, group_parser=p)
