"""`make demo`: the most complete end-to-end path llmlab has today.

Builds the `micro` model, prints what each attention variant costs (parameters, training FLOPs, KV cache,
activations), then runs a forward and backward pass of every variant and one cached decoding check. Then
trains a byte-level BPE tokenizer on Moby Dick and loads the real SmolLM2-135M-Instruct from its GGUF to answer
questions through its chat template with the inference engine: one streamed, four continuously batched (each
skipped, saying why, when its data is not installed).
"""

from __future__ import annotations

import time

import torch
from rich.console import Console

from .cli.model import attention_variants, print_cost_table
from .model import KVCache, ModelConfig, Transformer


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("micro")
    batch, seq = 4, 128
    console.rule("[bold]llmlab demo: the micro model")
    print_cost_table(cfg, seq, batch, f"what each attention variant costs (micro, seq {seq}, batch {batch})", console)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    for name, variant in attention_variants(cfg).items():
        model = Transformer(variant).train()
        t = time.perf_counter()
        out = model(x, labels=x)
        out.loss.backward()
        dt = time.perf_counter() - t
        grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
        console.print(f"{name}: forward+backward of {batch}×{seq} tokens in {dt:.2f}s, loss {out.loss.item():.3f} "
                      f"(ln vocab = {torch.log(torch.tensor(cfg.vocab_size)).item():.3f}), grad norm {grad_norm:.3f}")
        model.eval()
        with torch.no_grad():
            full = model(x[:1, :16]).logits
            cache = KVCache()
            model(x[:1, :8], cache=cache)
            steps = torch.cat([model(x[:1, i : i + 1], cache=cache).logits for i in range(8, 16)], 1)
        err = (steps - full[:, 8:]).abs().max().item()
        console.print(f"     cached decoding of 8 tokens matches the full forward (max |Δlogit| = {err:.1e}), "
                      f"cache holds {cache.nbytes() // 16:,} bytes per token in fp32")
    tokenizer_demo(console)
    chat_demo(console)
    console.rule("[green]done")


def tokenizer_demo(console: Console) -> None:
    from .data import sources
    from .tokenizer import train
    from .tokenizer.evaluate import evaluate

    console.rule("[bold]a tokenizer trained here")
    try:
        chapters = sources.moby_dick_chapters()
    except sources.MissingDataError as e:
        console.print(f"skipped: {e}")
        return
    lines = [line for c in chapters for line in c.split("\n") if line.strip()]
    t = time.perf_counter()
    tok = train(lines[1::2], vocab_size=2048, special_tokens=["<|endoftext|>"])
    console.print(f"byte-level BPE, vocab {len(tok)}, trained on half of Moby Dick in {time.perf_counter() - t:.1f}s")
    q = evaluate(tok, lines[::2])
    console.print(f"held-out half: {q['bytes_per_token']:.2f} bytes/token, {q['vocab_used']:.0%} of the vocab used; "
                  f"'Call me Ishmael.' -> {[tok.id_to_token(i) for i in tok.encode('Call me Ishmael.')]}")


def chat_demo(console: Console) -> None:
    from .api import load
    from .io.assets import AssetNotFoundError

    console.rule("[bold]a real model: SmolLM2-135M-Instruct from its GGUF")
    t = time.perf_counter()
    try:
        model, tok = load("smollm2-135m-instruct")
    except AssetNotFoundError as e:
        console.print(f"skipped: {e}")
        return
    console.print(f"loaded {model.num_parameters() / 1e6:.1f}M parameters and the tokenizer in {time.perf_counter() - t:.1f}s")
    from .infer import LLM, SamplingParams

    llm = LLM(model, tok)
    question = "What is the capital of France?"
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    console.print(f"user: {question}\nassistant: ", end="")
    t, pieces = time.perf_counter(), []
    for piece in llm.stream(ids, SamplingParams(max_tokens=24, temperature=0)):  # greedy, streamed
        console.print(piece, end="")
        pieces.append(piece)
    console.print(f"   ({time.perf_counter() - t:.1f}s, greedy, streamed)")
    questions = ["Name three colors.", "What is 2 + 2?", "Say hello in French.", "What do bees make?"]
    t = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                    SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=0))
    n = sum(len(o.token_ids) for o in outs)
    console.print(f"{len(questions)} more questions, continuously batched: {n} tokens in "
                  f"{time.perf_counter() - t:.1f}s (temperature 0.7, top-p 0.9, seeded)")
    for q, o in zip(questions, outs):
        console.print(f"  {q} -> {o.text.strip()[:80]!r}")


if __name__ == "__main__":
    main()
