"""Peak training memory and speed of parameter-efficient fine-tuning vs full fine-tuning: the same model, the
same random batches, a few AdamW steps (forward, backward, step) per method, each method in a FRESH subprocess
(peak RSS never goes down within a process, so one process per method is the only honest way on CPU).

Measured per method: peak RSS (resource.getrusage(RUSAGE_SELF).ru_maxrss) over the whole child, the RSS once the
model is built (before the method is applied), their difference (what training adds: gradients, AdamW state,
activations, adapters), tokens/s over the timed steps (after one untimed warm-up step) and trainable
parameters. The model: the `micro` preset with random weights (default), or SmolLM2-135M-Instruct (--smollm2).

    python benchmarks/peft.py [--smollm2] [--methods full,lora,dora,ia3,bitfit] [--steps 4] [--batch 4] [--seq 256]

LoRA and DoRA: r=8, alpha=16 on q k v o gate up down. IA3: k v down. BitFit: zero biases added to q o up down
(the Llama-style models have none). Prints one JSON object with ratios vs full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> dict:
    import torch

    from llmlab import peft as P

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.smollm2:
        import llmlab

        model, _ = llmlab.load("smollm2-135m-instruct")
        model = model.float()
    else:
        from llmlab.model import ModelConfig, Transformer

        model = Transformer(ModelConfig.preset(args.preset, max_seq_len=max(args.seq, 128)))
    model.train()
    built_rss = rss_mib()
    method = args.worker
    if method == "lora":
        P.add_lora(model, P.LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    elif method == "dora":
        P.add_lora(model, P.LoraConfig(r=8, alpha=16, target_modules=TARGETS, use_dora=True))
    elif method == "ia3":
        P.add_ia3(model, P.IA3Config())
    elif method == "bitfit":
        P.apply_bitfit(model, ("q", "o", "up", "down"))
    elif method != "full":
        raise SystemExit(f"unknown method {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(2)]
    losses = []
    for i in range(args.steps + 1):
        if i == 1:
            start = time.perf_counter()
        x = batches[i % 2]
        loss = model(x, labels=x, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {"method": method, "trainable_params": trainable, "total_params": total,
            "trainable_percent": 100 * trainable / total, "built_rss_mib": round(built_rss, 1),
            "peak_rss_mib": round(peak, 1), "training_mib": round(peak - built_rss, 1),
            "tokens_per_s": round(args.batch * args.seq * args.steps / seconds, 1), "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="full,lora,dora,ia3,bitfit")
    p.add_argument("--preset", default="micro")
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the random preset")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--preset", args.preset, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
        if args.smollm2:
            cmd.append("--smollm2")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
    full = rows.get("full")
    if full:
        for row in rows.values():
            row["vs_full"] = {"peak_rss": round(row["peak_rss_mib"] / full["peak_rss_mib"], 3),
                              "training_mib": round(row["training_mib"] / max(full["training_mib"], 1e-9), 3),
                              "tokens_per_s": round(row["tokens_per_s"] / full["tokens_per_s"], 3),
                              "trainable_params": round(row["trainable_params"] / full["trainable_params"], 5)}
    print(json.dumps({"model": "smollm2-135m-instruct" if args.smollm2 else f"{args.preset} (random weights)",
                      "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads or None,
                      "methods": rows}, indent=2))


if __name__ == "__main__":
    main()
