"""Training throughput: llmlab's Transformer vs transformers' LlamaForCausalLM, same shape, same run.

Shape: vocab 8192, hidden 384, 6 layers, 6 heads / 2 KV heads, MLP 1024, seq 256, batch 8, AdamW (torch's
fused kernel on both sides, as both trainers default to); fp32 and bf16 autocast. The two models are timed alternately (round-robin) so machine noise hits both alike; the
figure is the median over rounds. MFU divides achieved FLOP/s (the config's training FLOPs per token) by
the matmul peak measured in this run. `llmlab` is the training path (loss computed chunk by chunk without
materializing the logits, see llmlab.model.losses); `llmlab_logits` is the same model returning full logits
like transformers does. `llmlab_compiled` and `transformers_compiled` are the two models through
torch.compile (inductor), as `train.compile=true` runs ours; their speedup is compiled against compiled, and
`compile_s` is each one's warm-up, compilation included (--no-compile leaves them out).

    python benchmarks/model_throughput.py [--rounds 5] [--steps 3] [--device cpu|cuda] [--no-compile]

Prints one JSON object on stdout (each dtype's row also goes to stderr as it is measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.train.optim import can_fuse

SHAPE = dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024, max_seq_len=1024)


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 5, trials: int = 5) -> float:
    """Best FLOP/s of an n×n×n matmul over several trials (the best, since noise only ever slows it down)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_hf(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["dim"], num_hidden_layers=SHAPE["n_layers"],
        num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_kv_heads"],
        intermediate_size=SHAPE["hidden_dim"], max_position_embeddings=SHAPE["max_seq_len"],
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(device)


def make_step(model, opt, x, dtype, device, kind: str):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if kind == "transformers":
                out = model(input_ids=x, labels=x)
            else:  # llmlab trains without materializing the logits; llmlab_logits is the plain path
                out = model(x, labels=x, return_logits=kind == "llmlab_logits")
        out.loss.backward()
        opt.step()
        return out.loss

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    args = p.parse_args()
    device = args.device
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE)
    ours = Transformer(cfg).to(device).train()
    theirs = build_hf(device).train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    flops_per_token = cfg.flops_per_token(args.seq)
    result = {
        "benchmark": "model_throughput",
        "machine": {"device": device if device == "cpu" else torch.cuda.get_device_name(), "threads":
                    torch.get_num_threads(), "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__},
        "shape": {**SHAPE, "seq": args.seq, "batch": args.batch},
        "params": {"llmlab": ours.num_parameters(), "transformers": sum(p.numel() for p in theirs.parameters())},
        "flops_per_token": flops_per_token,
    }
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        # Probe small first, against fp32 at the same size: where bf16 is emulated (no native instructions)
        # a full-size bf16 probe alone takes minutes.
        small = {d: matmul_peak(d, device, n=256, reps=2, trials=1) for d in (dtype, torch.float32)}
        if small[dtype] < 0.5 * small[torch.float32]:
            row = {"matmul_peak_gflops_256": small[dtype] / 1e9, "fp32_matmul_peak_gflops_256": small[torch.float32] / 1e9,
                   "skipped": f"{name} matmul is slower than half the fp32 matmul on this device (no native {name})"}
            result[name] = row
            print(json.dumps({name: row}), file=sys.stderr, flush=True)
            continue
        peak = matmul_peak(dtype, device)
        contenders = [("llmlab", ours), ("llmlab_logits", ours), ("transformers", theirs)]
        if not args.no_compile:
            contenders += [("llmlab_compiled", torch.compile(ours)), ("transformers_compiled", torch.compile(theirs))]
        steps, compile_s = {}, {}
        for label, model in contenders:
            # fused on both sides: what llmlab's trainer and transformers' Trainer (adamw_torch_fused) both use
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=can_fuse(model.parameters()) or None)
            steps[label] = make_step(model, opt, x, dtype, device, label.removesuffix("_compiled"))
            sync(device)
            t = time.perf_counter()
            for _ in range(2):  # warm-up: allocator, autocast caches, optimizer state, compilation
                steps[label]()
            sync(device)
            compile_s[label] = round(time.perf_counter() - t, 1)
        times = {label: [] for label in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                sync(device)
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync(device)
                times[label].append((time.perf_counter() - t) / args.steps)
        row = {"matmul_peak_gflops": round(peak / 1e9, 1)}
        for label, ts in times.items():
            tps = tokens / statistics.median(ts)
            row[f"{label}_tokens_per_s"] = round(tps, 1)
            row[f"{label}_mfu"] = round(tps * flops_per_token / peak, 4)
        row["speedup"] = round(row["llmlab_tokens_per_s"] / row["transformers_tokens_per_s"], 3)
        row["speedup_with_logits"] = round(row["llmlab_logits_tokens_per_s"] / row["transformers_tokens_per_s"], 3)
        if not args.no_compile:
            compiled = row["llmlab_compiled_tokens_per_s"]
            row["speedup_compiled"] = round(compiled / row["transformers_compiled_tokens_per_s"], 3)
            row["speedup_compiled_vs_eager"] = round(compiled / row["transformers_tokens_per_s"], 3)
            row["compile_s"] = {k: v for k, v in compile_s.items() if k.endswith("_compiled")}
        result[name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)  # progress; stdout gets one object
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
