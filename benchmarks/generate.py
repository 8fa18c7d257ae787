"""Generation speed: llmlab's engine vs transformers' generate on the same weights, same run.

- decode_b1: greedy decode tokens/s at batch 1 (a 32-token prompt, --new-tokens tokens), on the 15.7M shape of
  the foundation benchmark (random weights) and on SmolLM2-135M-Instruct when its package is installed. Both
  sides are timed alternately, median over rounds; outputs must be identical. Also the weight bytes read per
  second (parameters x tokens/s) against a measured memory-copy bandwidth.
- throughput: --requests requests with random prompt and output lengths (seeded). llmlab: all submitted at
  once, continuously batched over the paged KV pool. transformers: padded static batches of 16 in arrival
  order, each run until its longest output. Throughput counts only the tokens the requests asked for.
  Also the KV memory actually used at peak vs the pool allocated, and vs what a contiguous cache of
  max_seq_len per sequence would hold.

    python benchmarks/generate.py [--rounds 3] [--new-tokens 128] [--requests 64] [--no-smollm2]

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

from llmlab.infer import LLM, SamplingParams
from llmlab.io import config_from_hf, state_dict_from_hf
from llmlab.model import Transformer

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


def decode_b1(hf, ours, new_tokens: int, rounds: int) -> dict:
    vocab = ours.cfg.vocab_size
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    llm = LLM(ours)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run_hf():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, 32:].tolist()

    def run_ours():
        return llm.generate([prompt[0].tolist()], params)[0].token_ids

    same = run_hf() == run_ours()  # also the warm-up
    times = {"llmlab": [], "transformers": []}
    for _ in range(rounds):
        for name, fn in (("transformers", run_hf), ("llmlab", run_ours)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tps = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    return {"params": ours.num_parameters(), "new_tokens": new_tokens, "identical": same,
            "llmlab_tokens_per_s": tps["llmlab"], "transformers_tokens_per_s": tps["transformers"],
            "speedup": tps["llmlab"] / tps["transformers"],
            "llmlab_ms_per_token": 1e3 / tps["llmlab"], "transformers_ms_per_token": 1e3 / tps["transformers"],
            "llmlab_weight_gb_per_s": weight_bytes * tps["llmlab"] / 1e9}


def throughput(hf, ours, n_requests: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    vocab = ours.cfg.vocab_size
    reqs = [([rng.randrange(vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 256))
            for _ in range(n_requests)]
    wanted = sum(n for _, n in reqs)

    t = time.perf_counter()
    for i in range(0, n_requests, 16):  # transformers: padded static batches of 16
        batch = reqs[i:i + 16]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                        pad_token_id=0)
    hf_s = time.perf_counter() - t

    llm = LLM(ours, max_num_seqs=n_requests)
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                                               for _, n in reqs])
    ours_s = time.perf_counter() - t
    assert sum(len(o.token_ids) for o in outs) == wanted
    blocks = llm.engine.cache.blocks
    block_bytes = llm.engine.cache.nbytes() / blocks.num_blocks
    contiguous = n_requests * ours.cfg.max_seq_len * block_bytes / blocks.block_size
    return {"requests": n_requests, "tokens_requested": wanted,
            "llmlab_tokens_per_s": wanted / ours_s, "transformers_tokens_per_s": wanted / hf_s,
            "speedup": hf_s / ours_s, "engine_steps": llm.engine.num_steps,
            "preemptions": llm.engine.scheduler.num_preemptions,
            "kv_mib_used_at_peak": blocks.peak_in_use * block_bytes / 2**20,
            "kv_mib_allocated": llm.engine.cache.nbytes() / 2**20,
            "kv_mib_contiguous_max_len": contiguous / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    result = {"benchmark": "generate", "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                                   "transformers": transformers.__version__,
                                                   "copy_gb_per_s": copy_bandwidth() / 1e9}}
    log(result)
    hf, ours = random_llama()
    result["decode_b1_15m"] = decode_b1(hf, ours, args.new_tokens, args.rounds)
    log({"decode_b1_15m": result["decode_b1_15m"]})
    if args.requests:
        result["throughput_15m"] = throughput(hf, ours, args.requests)
        log({"throughput_15m": result["throughput_15m"]})
    if not args.no_smollm2:
        try:
            hf, ours = smollm2()
        except Exception as e:  # the asset package is optional
            result["decode_b1_smollm2"] = {"skipped": str(e)}
        else:
            result["decode_b1_smollm2"] = decode_b1(hf, ours, args.new_tokens, args.rounds)
        log({"decode_b1_smollm2": result["decode_b1_smollm2"]})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
