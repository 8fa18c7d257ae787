"""What a run reports: the JSONL metrics log, throughput and MFU, the console progress bar and the loss plot.

MFU (model FLOPs utilization) = achieved FLOP/s ÷ peak FLOP/s, with
    achieved = tokens/s × training FLOPs per token   (ModelConfig.flops_per_token(seq_len): 6·N plus attention,
               less where frozen layers end backward early: backward_extent)
    peak     = the best FLOP/s of a large square matmul measured on this device in this process, in the dtype
               the run computes in (or TrainConfig.peak_flops when given).
A measured peak, not the vendor's datasheet: on a shared 2-core CPU the datasheet number is unreachable and
the matmul is what the model's time goes into, so 1.0 means "as fast as this machine multiplies matrices".
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ============================================================================================ device facts


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n×n×n matmul over a few trials (noise only ever slows a trial down). Uses its own
    generator, so measuring never moves the global RNG a training run depends on."""
    # 2048 on a CPU: smaller matmuls do not reach the peak (1024 measured 30% lower on 2 cores). About a
    # second, once per process.
    n = 8192 if device.startswith("cuda") else 2048
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    best = 0.0
    for _ in range(4):
        _sync(device)
        t = time.perf_counter()
        for _ in range(2):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * 2 / (time.perf_counter() - t))
    return best


@functools.lru_cache(maxsize=None)
def bf16_is_faster(device: str) -> bool:
    """Whether bf16 autocast pays off here: on CUDA when the GPU supports bf16; on a CPU only when a bf16
    matmul is measured at least 1.5× faster than fp32 (CPUs with AVX-512 BF16 / AMX are; others emulate
    bf16 and are slower)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    n = 512
    g = torch.Generator().manual_seed(0)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, generator=g).to(dtype)
        a @ a
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        times[dtype] = time.perf_counter() - t
    return times[torch.bfloat16] * 1.5 < times[torch.float32]


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> 'bf16' where bf16 is faster on this device, else 'fp32'."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_faster(device) else "fp32"
    return precision


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ============================================================================================ the JSONL log
class MetricsLog:
    """One JSON object per line: {"kind": "train" | "val" | "sample" | ..., "step": n, ...}; flushed per line
    so a killed run keeps everything it logged."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def truncate(path: str | os.PathLike, step: int) -> None:
        """Keep the records up to `step` (the checkpoint a run resumes from): the steps after it will be run,
        and logged, again. A line cut short by a kill is dropped."""
        path = Path(path)
        if path.exists():
            kept = [json.dumps(r, ensure_ascii=False) for r in read_metrics(path) if r.get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)


_IN_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_AFTER_BLOCKS = re.compile(r"(?:^|\.)(?:norm|head)\.")


def backward_extent(model: nn.Module, n_layers: int) -> dict[str, Any]:
    """What backward computes when some weights are frozen, as ModelConfig.flops_per_token's keywords: the first
    block holding a trained parameter (gradients flow back no further; a trained embedding or virtual token
    means all blocks, only the final norm or head means none) and the trained matrix weights (embedding tables
    excluded: their gradient is a scatter, not a product). {} when every parameter trains."""
    params = list(model.named_parameters())
    if all(p.requires_grad for _, p in params):
        return {}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    first, weights = n_layers, 0
    for name, p in params:
        if not p.requires_grad:
            continue
        block = _IN_BLOCK.search(name)
        if block:
            first = min(first, int(block.group(1)))
        elif not _AFTER_BLOCKS.search(name):
            first = 0
        if p.dim() >= 2 and id(p) not in tables:
            weights += p.numel()
    return {"first_trained_layer": first, "trained_weights": weights}


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run may be cut short
        if kind is None or r.get("kind") == kind:
            records.append(r)
    return records


# ============================================================================================ the loss plot
def plot_losses(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "") -> Path:
    """PNG of training loss (per logged interval) and validation loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metrics(metrics_path, "train")
    val = read_metrics(metrics_path, "val")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1.2, color="tab:blue")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", lw=1.5,
                color="tab:orange")
        last = val[-1]
        if "val_bpb" in last:
            ax.annotate(f"{last['val_loss']:.3f} nats/token, {last['val_bpb']:.3f} bits/byte",
                        (last["step"], last["val_loss"]), textcoords="offset points", xytext=(-10, 12),
                        ha="right", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


# ============================================================================================ console
class Progress:
    """A rich progress bar with loss, tokens/s and MFU; plain lines instead when stderr is not a terminal
    (printed at evaluations and at the end only, so logs of long runs stay short)."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            # on stderr, the terminal just checked (rich's default console is stdout, which may be redirected)
            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, stats="")

    def update(self, step: int, record: dict[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        kw: dict[str, Any] = {"completed": step}
        if record is not None:
            mfu = f"  MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
            kw["stats"] = f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s{mfu}"
        self._bar.update(self._task, **kw)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def format_eval(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}", f"val loss {record['val_loss']:.4f}", f"ppl {record['val_ppl']:.2f}"]
    if "val_bpb" in record:
        parts.append(f"bpb {record['val_bpb']:.4f}")
    if record.get("train_loss") is not None:
        parts.insert(1, f"train loss {record['train_loss']:.4f}")
    return "  ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
