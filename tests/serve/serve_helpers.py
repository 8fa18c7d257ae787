"""What the server tests share: a small ChatML tokenizer and the real app running under uvicorn."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from llmlab.tokenizer import train
from llmlab.tokenizer.chat import get_template


def chatml_tokenizer(text: str):
    """A 300-token byte-level BPE trained on text, with ChatML's specials, template and end of turn."""
    tok = train([text], kind="bpe", vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = get_template("chatml")
    tok.eos_token = "<|im_end|>"  # train() sets none; a ChatML model ends its turn with <|im_end|>
    return tok


@contextlib.contextmanager
def running(app, log_level: str = "warning"):
    """app under uvicorn in a background thread on a free loopback port; yields its base URL. The socket is
    bound here and handed to uvicorn, so no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the uvicorn server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
