"""Serving under load: `llmlab serve` vs `transformers serve`, same weights, same workload, same run.

The model: the 15.7M shape of the foundation benchmark (random weights, a transformers LlamaForCausalLM saved
as a Hugging Face directory) with a byte-level BPE tokenizer of the same vocabulary trained here on the Python
standard library's sources (quality is irrelevant with random weights; both servers load the same files).
`--small` uses a tiny shape instead (for tests).

The servers, each in its own process on a loopback port, one after the other (never both at once):
- llmlab: `llmlab serve DIR` (the continuously batching engine behind the OpenAI-compatible app).
- transformers: `transformers serve DIR` as installed (its default mode: one inference thread that runs
  `generate` for one request at a time, streaming tokens through a streamer). `--transformers-cb` also runs
  it with `--continuous-batching` (its paged continuous-batching manager).

The workload: --requests streaming POST /v1/completions from --concurrency concurrent asyncio clients (httpx),
each with a distinct text prompt (16-64 random words of the corpus), greedy (temperature 0) and a random
max_tokens in [8, 48] (seeded: the same requests for every server). After --warmup requests that are not
timed, the whole batch is timed. Per request: latency (send to the end of the stream), time to first token
(send to the first chunk that carries text), completion tokens (the usage the server reports). Per server:
requests/s and completion tokens/s over the wall time, p50/p99 latency and TTFT. For context, also
transformers' own `generate` at batch 1 on the same weights (ms per token, no server). Greedy outputs are
compared across servers (reported, not asserted: random weights give flat logits, and batched float math can
flip a near tie).

    python benchmarks/serve.py [--requests 200] [--concurrency 32] [--warmup 8] [--small] [--transformers-cb]

Prints one JSON object on stdout (rows also go to stderr as they are measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

SHAPE = dict(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=1024, max_position_embeddings=1024, tie_word_embeddings=False)  # as generate.py
SMALL = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; eos = <|endoftext|>


def log(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def corpus(max_bytes: int) -> list[str]:
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return texts


def build_model_dir(directory: Path, shape: dict) -> list[str]:
    """Random-weight Llama + a byte-level BPE tokenizer of the same vocabulary, as a Hugging Face directory.
    Returns the corpus words (for prompts)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = corpus(3_000_000 if shape["vocab_size"] > 2048 else 300_000)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=shape["vocab_size"], special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    vocab = bpe.get_vocab_size()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(directory)

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**shape, "vocab_size": vocab}, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(directory)
    words = sorted({w for text in texts[:20] for w in text.split() if w.isidentifier()})
    return words


def generate_ms_per_token(directory: Path, new_tokens: int = 32) -> float:
    """Context for the reference: transformers' own generate at batch 1 on these weights, in this process
    (no server, no other server running), greedy, median of 3."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompt = torch.randint(3, hf.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(4):  # the first is a warm-up
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[1:]) / new_tokens


def workload(words: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(16, 64))),
             "max_tokens": rng.randint(8, 48)} for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, directory: Path, port: int, concurrency: int, threads: int | None):
    bindir = Path(sys.executable).parent
    if kind == "llmlab":
        cmd = [str(bindir / "llmlab"), "serve", str(directory), "--port", str(port), "--served-model-name",
               str(directory), "--max-concurrency", str(max(64, concurrency)),
               "--max-num-seqs", str(max(64, concurrency)), "--log-level", "warning"]
    else:
        cmd = [str(bindir / "transformers"), "serve", str(directory), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--dtype", "float32", "--log-level", "error"]
        if kind == "transformers_cb":
            cmd.append("--continuous-batching")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start in 180 s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one(client: httpx.AsyncClient, model: str, req: dict) -> dict:
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, tokens, finish = None, [], None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": tokens, "text": "".join(text),
            "finish": finish}


async def drive(port: int, model: str, reqs: list[dict], concurrency: int) -> tuple[list[dict], float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        async def limited(req):
            async with sem:
                return await one(client, model, req)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(r) for r in reqs))
        return results, time.perf_counter() - t0


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(kind: str, directory: Path, reqs: list[dict], warm: list[dict], concurrency: int,
            threads) -> tuple[dict, list[str]]:
    port = free_port()
    proc = start_server(kind, directory, port, concurrency, threads)
    try:
        asyncio.run(drive(port, str(directory), warm, concurrency))
        results, wall = asyncio.run(drive(port, str(directory), reqs, concurrency))
    finally:
        stop_server(proc)
    tokens = sum(r["tokens"] for r in results)
    lat = [1e3 * r["latency"] for r in results]
    ttft = [1e3 * r["ttft"] for r in results]
    row = {"wall_s": round(wall, 3), "requests_per_s": len(reqs) / wall, "tokens_per_s": tokens / wall,
           "completion_tokens": tokens, "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99)},
           "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)}}
    log({kind: row})
    return row, [r["text"] for r in results]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=8, help="untimed requests before the timed ones")
    p.add_argument("--small", action="store_true", help="a tiny model shape (for tests) instead of the 15.7M one")
    p.add_argument("--transformers-cb", action="store_true",
                   help="also run transformers serve --continuous-batching")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch
    import transformers

    shape = SMALL if args.small else SHAPE
    result = {"benchmark": "serve", "requests": args.requests, "concurrency": args.concurrency,
              "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": transformers.__version__}}
    with tempfile.TemporaryDirectory(prefix="llmlab-serve-bench-") as tmp:
        directory = Path(tmp) / "model"
        words = build_model_dir(directory, shape)
        reqs = workload(words, args.requests, args.seed)
        warm = workload(words, args.warmup, args.seed + 1) if args.warmup else []
        result["model"] = {"shape": "small" if args.small else "15.7M foundation shape", **shape,
                           "random_weights": True}
        log({"model": result["model"]})
        result["transformers_generate_b1_ms_per_token"] = generate_ms_per_token(directory)
        log({"transformers_generate_b1_ms_per_token": result["transformers_generate_b1_ms_per_token"]})
        texts = {}
        kinds = ["llmlab", "transformers"] + (["transformers_cb"] if args.transformers_cb else [])
        for kind in kinds:
            result[kind], texts[kind] = measure(kind, directory, reqs, warm, args.concurrency, args.threads)
    ours, ref = result["llmlab"], result["transformers"]
    result["ratio"] = {"requests_per_s": ours["requests_per_s"] / ref["requests_per_s"],
                       "tokens_per_s": ours["tokens_per_s"] / ref["tokens_per_s"],
                       "p50_latency": ours["latency_ms"]["p50"] / ref["latency_ms"]["p50"],
                       "p50_ttft": ours["ttft_ms"]["p50"] / ref["ttft_ms"]["p50"]}
    result["greedy_texts_equal_fraction"] = {
        k: sum(a == b for a, b in zip(texts["llmlab"], texts[k])) / len(reqs) for k in kinds if k != "llmlab"}
    result["goal_3x_requests_at_equal_or_better_p50"] = (result["ratio"]["requests_per_s"] >= 3
                                                         and result["ratio"]["p50_latency"] <= 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
