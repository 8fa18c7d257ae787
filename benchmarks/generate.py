"""Generation speed: llmlab's engine vs transformers' generate on the same weights, same run.

- decode_b1: greedy decode tokens/s at batch 1 (a 32-token prompt, --new-tokens tokens), on the 15.7M shape of
  the foundation benchmark (random weights) and on SmolLM2-135M-Instruct when its package is installed, for
  both KV layouts and for the engine with compiled decode steps (contiguous layout; --no-compile leaves it out;
  first_run_s shows the compilation). All contenders are timed alternately, median over rounds; outputs must be
  identical. Also the weight bytes read per second, and the floor: one product of a single row with every
  weight matrix and nothing else (no attention, no Python around them; per matrix the faster of matrix-vector
  and the row twice as a two-column product), which bounds any engine's speed on this machine.
- beam_15m: beam search (4 prompts of 32-96 tokens, 4 beams, --beam-tokens tokens) on the 15.7M shape against
  transformers' generate(num_beams=4): ours over the paged pool (beams share blocks, copy on write) and over a
  growing KVCache (rows copied as beams are reordered); identical hypotheses required; KV bytes held at peak.
- throughput: --requests requests with random prompt and output lengths (seeded). llmlab: all submitted at
  once, continuously batched over the paged KV pool. transformers: padded static batches of 16 in arrival
  order, each run until its longest output. Throughput counts only the tokens the requests asked for; the
  contenders run alternately --rounds times, median.
  Both KV layouts: paged (blocks of 16 from a memory budget) and contiguous (a max_seq_len row per
  sequence). Also the KV memory actually used at peak vs allocated.

    python benchmarks/generate.py [--rounds 3] [--new-tokens 128] [--requests 64] [--beam-tokens 64] [--no-smollm2] [--no-compile]

Prints one JSON object on stdout (rows also go to stderr as they are measured).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from llmlab.infer import LLM, BeamParams, PagedKVCache, SamplingParams, beam_search
from llmlab.infer.beam import DEFAULT_BLOCK_SIZE
from llmlab.io import config_from_hf, state_dict_from_hf
from llmlab.model import KVCache, Transformer

SHAPE = dict(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=1024, max_position_embeddings=1024, tie_word_embeddings=False)


def log(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def copy_bandwidth(mb: int = 256, trials: int = 5) -> float:
    """Best bytes/s of a large tensor copy (read + write counted)."""
    a = torch.empty(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t))
    return best


def alternate(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, the contenders taking turns each round, so a slow spell of a shared machine hits all."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).eval()
    data = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    cfg = config_from_hf(data)
    ours = Transformer(cfg)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, data))
    return hf, ours.eval()


def smollm2():
    import transformers

    import llmlab
    from llmlab.io.assets import asset_path

    path = asset_path("smollm2-135m-instruct")
    ours, _ = llmlab.load("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    return hf, ours


def decode_b1(hf, ours, new_tokens: int, rounds: int, compile: bool = True) -> dict:
    vocab = ours.cfg.vocab_size
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llms = {layout: LLM(ours, max_num_seqs=1, kv_layout=layout) for layout in ("paged", "contiguous")}
    if compile:
        llms["compiled"] = LLM(ours, max_num_seqs=1, kv_layout="contiguous", compile=True)
    weights = [p for p in ours.parameters() if p.dim() == 2 and p is not ours.tok_emb.weight]
    if ours.head is not None and ours.head.proj.weight is ours.tok_emb.weight:
        weights.append(ours.tok_emb.weight)  # tied: the head reads it
    x = {w.shape[1]: torch.ones(1, w.shape[1], dtype=w.dtype) for w in weights}
    x2 = {k: v.expand(2, k).contiguous().t() for k, v in x.items()}

    def fastest_product(w):  # matrix-vector, or the row twice as a two-column product: whichever is faster here
        ways = [lambda: torch.nn.functional.linear(x[w.shape[1]], w), lambda: torch.mm(w, x2[w.shape[1]])]
        secs = []
        for way in ways:
            t = time.perf_counter()
            for _ in range(5):
                way()
            secs.append(time.perf_counter() - t)
        return ways[secs.index(min(secs))]

    with torch.no_grad():
        products = [fastest_product(w) for w in weights]

    def run_hf():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, 32:].tolist()

    def runner(llm):
        return lambda: llm.generate([prompt[0].tolist()], params)[0].token_ids

    def weights_only():  # the floor: one product per weight matrix per token, nothing else
        with torch.no_grad():
            for _ in range(new_tokens):
                for product in products:
                    product()

    contenders = {"transformers": run_hf, **{f"llmlab_{k}": runner(v) for k, v in llms.items()},
                  "weights_floor": weights_only}
    reference = run_hf()
    warmup_s = {}
    for k in llms:  # also the warm-up; the compiled engine compiles here
        t = time.perf_counter()
        warmup_s[k] = (contenders[f"llmlab_{k}"]() == reference, time.perf_counter() - t)
    same = all(ok for ok, _ in warmup_s.values())
    times = alternate(contenders, rounds)
    ms = {k: 1e3 * statistics.median(v) / new_tokens for k, v in times.items()}
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    best = min(ms[f"llmlab_{k}"] for k in llms)
    return {"params": ours.num_parameters(), "new_tokens": new_tokens, "identical": same,
            "ms_per_token": ms, "tokens_per_s": {k: 1e3 / v for k, v in ms.items()},
            **{f"speedup_{k}": ms["transformers"] / ms[f"llmlab_{k}"] for k in llms},
            "first_run_s": {k: round(s, 1) for k, (_, s) in warmup_s.items()},
            "speedup_ceiling": ms["transformers"] / ms["weights_floor"],
            "llmlab_weight_gb_per_s": weight_bytes / best / 1e6,
            "weights_floor_gb_per_s": weight_bytes / ms["weights_floor"] / 1e6}


def throughput(hf, ours, n_requests: int, rounds: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    vocab = ours.cfg.vocab_size
    reqs = [([rng.randrange(vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 256))
            for _ in range(n_requests)]
    wanted = sum(n for _, n in reqs)

    def run_hf():
        for i in range(0, n_requests, 16):  # transformers: padded static batches of 16
            batch = reqs[i:i + 16]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            longest = max(n for _, n in batch)
            with torch.no_grad():
                hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                            do_sample=False, pad_token_id=0)

    engines = {}

    def runner(layout):
        def run():
            llm = engines[layout] = LLM(ours, max_num_seqs=n_requests, kv_layout=layout)
            outs = llm.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                                                       for _, n in reqs])
            assert sum(len(o.token_ids) for o in outs) == wanted
        return run

    contenders = {"transformers": run_hf, "paged": runner("paged"), "contiguous": runner("contiguous")}
    times = alternate(contenders, rounds)
    secs = {k: statistics.median(v) for k, v in times.items()}
    row = {"requests": n_requests, "tokens_requested": wanted, "rounds": rounds,
           "transformers_tokens_per_s": wanted / secs["transformers"]}
    for layout in ("paged", "contiguous"):
        llm = engines[layout]
        blocks = llm.engine.cache.blocks
        block_bytes = llm.engine.cache.nbytes() / blocks.num_blocks
        row[layout] = {"llmlab_tokens_per_s": wanted / secs[layout], "speedup": secs["transformers"] / secs[layout],
                       "speedups_by_round": [h / o for h, o in zip(times["transformers"], times[layout])],
                       "engine_steps": llm.engine.num_steps, "preemptions": llm.engine.scheduler.num_preemptions,
                       "kv_mib_used_at_peak": blocks.peak_in_use * block_bytes / 2**20,
                       "kv_mib_allocated": llm.engine.cache.nbytes() / 2**20}
    return row


def beams(hf, ours, n_prompts: int, num_beams: int, new_tokens: int, rounds: int) -> dict:
    """Beam search: transformers' generate(num_beams) against ours over the paged pool (beams share blocks, copy
    on write) and over a growing KVCache (every beam's past in its own rows, copied when beams are reordered).
    Same hypotheses required; KV bytes held at peak for both of ours."""
    vocab = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (64, 32, 96, 48)[:n_prompts]]
    params = BeamParams(num_beams, new_tokens, 1.0, False, 1)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    per_beam = sum(-(-(len(p) + new_tokens) // DEFAULT_BLOCK_SIZE) + 1 for p in prompts)
    pools = []

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return [row[width:].tolist() for row in out]

    def run_paged():
        pools.append(PagedKVCache(per_beam * num_beams, DEFAULT_BLOCK_SIZE, prefix_caching=False))
        return [hs[0].token_ids for hs in beam_search(ours, prompts, params, cache=pools[-1])]

    copied = []

    def run_copied():
        copied.append(KVCache())
        return [hs[0].token_ids for hs in beam_search(ours, prompts, params, cache=copied[-1])]

    contenders = {"transformers": run_hf, "llmlab_paged": run_paged, "llmlab_kvcache": run_copied}
    answers = {name: fn() for name, fn in contenders.items()}  # also the warm-up
    times = alternate(contenders, rounds)
    secs = {k: statistics.median(v) for k, v in times.items()}
    pool = pools[-1]
    block_bytes = pool.nbytes() / pool.blocks.num_blocks
    return {"prompts": len(prompts), "num_beams": num_beams, "new_tokens": new_tokens,
            "identical": answers["llmlab_paged"] == answers["transformers"] == answers["llmlab_kvcache"],
            "seconds": secs, **{f"speedup_{k}": secs["transformers"] / secs[f"llmlab_{k}"] for k in ("paged", "kvcache")},
            "kv_mib_paged_at_peak": pool.blocks.peak_in_use * block_bytes / 2**20,
            "kv_mib_kvcache_at_end": copied[-1].nbytes() / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--beam-tokens", type=int, default=64, help="new tokens of the beam-search row (0: no row)")
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled engine (minutes of compilation)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    result = {"benchmark": "generate", "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                                   "transformers": transformers.__version__,
                                                   "copy_gb_per_s": copy_bandwidth() / 1e9}}
    log(result)
    hf, ours = random_llama()
    result["decode_b1_15m"] = decode_b1(hf, ours, args.new_tokens, args.rounds, not args.no_compile)
    log({"decode_b1_15m": result["decode_b1_15m"]})
    if args.requests:
        result["throughput_15m"] = throughput(hf, ours, args.requests, args.rounds)
        log({"throughput_15m": result["throughput_15m"]})
    if args.beam_tokens:
        result["beam_15m"] = beams(hf, ours, 4, 4, args.beam_tokens, args.rounds)
        log({"beam_15m": result["beam_15m"]})
    if not args.no_smollm2:
        try:
            hf, ours = smollm2()
        except Exception as e:  # the asset package is optional
            result["decode_b1_smollm2"] = {"skipped": str(e)}
        else:
            result["decode_b1_smollm2"] = decode_b1(hf, ours, args.new_tokens, args.rounds, not args.no_compile)
        log({"decode_b1_smollm2": result["decode_b1_smollm2"]})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
