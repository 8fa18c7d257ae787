"""What each PEFT method costs and buys on a real model: SFT of SmolLM2-135M-Instruct on the embedded English
chat corpus (recipes/sft/smollm2.yaml) once per method, each in a FRESH subprocess (peak RSS never goes down
within a process), with the same conversations, batches, steps and validation set.

Measured per method: trainable parameters, the validation loss before the first step and after the last one,
peak RSS of the whole run (getrusage), training tokens/s (the trainer's own count: training tokens over loop
time minus evaluation), wall seconds. Each method has its own learning rate (below): the prompt methods and
IA3 train a few thousand numbers from a fixed start and need a much larger step than LoRA or full FT.

    python benchmarks/peft_sft.py [--methods full,lora,...] [--steps 30] [--conversations 400] [--max-len 128]

Prints one JSON object (with ratios against full fine-tuning when it ran) and, with --markdown, the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "dora", "adalora", "ia3", "bitfit", "adapter", "prompt", "ptuning", "prefix")
# learning rate and extra overrides per method (r=8 adapters on q k v o gate up down where the method has r)
SETTINGS = {
    "full": (3e-5, []),
    "lora": (1e-3, ["peft.r=8", "peft.alpha=16"]),
    "dora": (1e-3, ["peft.r=8", "peft.alpha=16"]),
    "adalora": (1e-2, ["peft.r=8", "peft.init_r=12", "peft.alpha=16"]),
    "ia3": (1e-2, []),
    "bitfit": (1e-3, ["peft.target_modules=[q, o, up, down]"]),
    "adapter": (1e-3, ["peft.reduction_factor=16"]),
    "prompt": (3e-2, ["peft.n_virtual_tokens=16", "peft.init_text=You are a helpful assistant."]),
    "ptuning": (1e-2, ["peft.n_virtual_tokens=16"]),
    "prefix": (1e-2, ["peft.n_virtual_tokens=16"]),
}


def worker(args) -> dict:
    from llmlab.train import load_recipe
    from llmlab.train.metrics import read_metrics
    from llmlab.train.supervised import SFTConfig, sft

    method = args.worker
    lr, extra = SETTINGS[method]
    steps = args.steps
    if method == "adalora":  # the rank budget falls from init_r to r between tinit and steps - tfinal
        extra = [*extra, f"peft.tinit={max(1, steps // 5)}", f"peft.tfinal={max(1, steps // 5)}"]
    out = Path(args.out) / method
    overrides = [f"out_dir={out}", f"data.max_conversations={args.conversations}", f"data.max_len={args.max_len}",
                 f"data.batch_size={args.batch}", "data.val_fraction=0.15", f"train.max_steps={steps}",
                 f"train.lr={lr}", f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}",
                 "train.eval_at_start=true", "train.progress=false", "train.plot=false", "train.sample_prompts=[]",
                 f"train.log_every={max(1, steps // 5)}", f"train.checkpoint_every={steps}",
                 "train.precision=fp32", "train.resume=false"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if method != "full":
        overrides += [f"peft.method={method}", *extra]
    result = sft(load_recipe(SFTConfig, ROOT / "recipes" / "sft" / "smollm2.yaml", overrides))
    vals = read_metrics(out / "metrics.jsonl", "val")
    peft = json.loads((out / "peft.json").read_text())
    return {"method": method, "lr": lr, "trainable_params": peft["trainable_parameters"],
            "trainable_percent": round(peft["trainable_percent"], 4),
            "val_loss_start": round(vals[0]["val_loss"], 4), "val_loss_final": round(vals[-1]["val_loss"], 4),
            "val_loss_change": round(vals[-1]["val_loss"] - vals[0]["val_loss"], 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "tokens_per_s": round(result.tokens_per_s, 1), "tokens": result.tokens,
            "train_seconds": round(result.train_seconds, 1)}


def markdown(rows: dict) -> str:
    lines = ["| method | trainable params | % | lr | val loss start | val loss final | change | peak RSS MiB | "
             "tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3g} | {r['lr']:g} | "
                     f"{r['val_loss_start']:.4f} | {r['val_loss_final']:.4f} | {r['val_loss_change']:+.4f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--conversations", type=int, default=400, help="conversations drawn (15%% held out)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the trainer's default)")
    p.add_argument("--markdown", action="store_true", help="also print the Markdown table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="peft_sft_") as tmp:
        for method in methods:
            cmd = [sys.executable, __file__, "--worker", method, "--out", tmp, "--steps", str(args.steps),
                   "--conversations", str(args.conversations), "--max-len", str(args.max_len),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
            rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(Path(tmp) / method, ignore_errors=True)  # checkpoints of a 135M model: ~1 GB each
            print(f"{method}: {rows[method]}", file=sys.stderr, flush=True)
    full = rows.get("full")
    if full:
        for row in rows.values():
            row["vs_full"] = {"peak_rss": round(row["peak_rss_mib"] / full["peak_rss_mib"], 3),
                              "tokens_per_s": round(row["tokens_per_s"] / full["tokens_per_s"], 3)}
    print(json.dumps({"model": "smollm2-135m-instruct", "data": "chat-english", "steps": args.steps,
                      "batch": args.batch, "max_len": args.max_len, "conversations": args.conversations,
                      "methods": rows}, indent=2))
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
