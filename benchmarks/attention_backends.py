"""The three attention backends side by side: agreement with sdpa (values and gradients) and time/memory of
forward+backward, per mask kind, on CPU or CUDA.

    python benchmarks/attention_backends.py [--device cuda] [--dtype bf16] [--seq 1024]

On CUDA it also reports which fused SDPA kernel torch can use for our causal call (flash / memory-efficient),
by forcing each one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from llmlab.model import ModelConfig
from llmlab.model.attention import attend
from llmlab.model.mask import AttentionMask


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    dev, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    B, H, Hkv, T, D = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    valid[0, : T // 4] = False
    masks = {
        "causal": AttentionMask(True, T, T),
        "padded_causal": AttentionMask(True, T, T, key_valid=valid),
        "sliding_window": AttentionMask(True, T, T, window=T // 8),
        "bidirectional": AttentionMask(False, T, T),
    }
    result = {"benchmark": "attention_backends", "device": dev, "dtype": args.dtype,
              "shape": dict(batch=B, heads=H, kv_heads=Hkv, seq=T, head_dim=D), "masks": {}}
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for name, mask in masks.items():
        entry = {}
        ref = None
        for backend in ("sdpa", "math", "flash"):
            cfg = ModelConfig(attn_backend=backend, flash_block_size=128)

            def run():
                out, _ = attend(q, k, v, mask, cfg, 1 / math.sqrt(D), training=False)
                grads = torch.autograd.grad(out, (q, k, v), g)
                return out, grads

            out, grads = run()
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync(dev)
            t = time.perf_counter()
            for _ in range(args.reps):
                run()
            sync(dev)
            ms = (time.perf_counter() - t) / args.reps * 1e3
            row = {"fwd_bwd_ms": round(ms, 3)}
            if dev == "cuda":
                row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            if ref is None:
                ref = (out, grads)
            else:
                errs = [(a.float() - b.float()).abs().max().item() for a, b in zip((out, *grads), (ref[0], *ref[1]))]
                row["max_abs_diff_vs_sdpa"] = max(errs)
                row["agrees"] = max(errs) < tol * max(1.0, ref[0].abs().max().item())
            entry[backend] = row
        result["masks"][name] = entry
    if dev == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = {}
        cfg = ModelConfig(attn_backend="sdpa")
        for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(kernel):
                    out, _ = attend(q, k, v, masks["causal"], cfg, 1 / math.sqrt(D), training=False)
                    torch.autograd.grad(out, (q, k, v), g)
                kernels[kernel.name] = "ok"
            except RuntimeError as e:
                kernels[kernel.name] = f"unavailable: {str(e).splitlines()[0][:120]}"
        result["sdpa_kernels_for_causal_gqa"] = kernels
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
