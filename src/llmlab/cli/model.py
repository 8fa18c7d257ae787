"""`llmlab model ...`: inspect model configurations and what they cost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..model import PRESETS, ModelConfig


def attention_variants(cfg: ModelConfig) -> dict[str, ModelConfig]:
    """The config as MHA, GQA, MQA and MLA, everything else equal (MLA: latent of 2·head_dim, half-head rotary
    key, as DeepSeek-V2 sizes it relative to its heads)."""
    base = cfg.to_dict()
    if 1 < cfg.n_kv_heads < cfg.n_heads:
        gqa_kv = cfg.n_kv_heads
    else:  # the largest proper divisor of n_heads
        gqa_kv = max([d for d in range(1, cfg.n_heads) if cfg.n_heads % d == 0], default=1)
    hd = cfg.head_dim
    mla = dict(attention="mla", kv_lora_rank=2 * hd, qk_nope_head_dim=hd, qk_rope_head_dim=max(2, hd // 2),
               v_head_dim=hd, qk_norm=False, position="rope")
    return {
        "MHA": ModelConfig.from_dict({**base, "attention": "standard", "n_kv_heads": cfg.n_heads}),
        "GQA": ModelConfig.from_dict({**base, "attention": "standard", "n_kv_heads": gqa_kv}),
        "MQA": ModelConfig.from_dict({**base, "attention": "standard", "n_kv_heads": 1}),
        "MLA": ModelConfig.from_dict({**base, **mla}),
    }


def cost_rows(cfg: ModelConfig, seq_len: int, batch: int) -> list[dict]:
    rows = []
    for name, variant in attention_variants(cfg).items():
        kv = variant.kv_cache_bytes_per_token(2)
        rows.append({
            "attention": name,
            "kv_heads": variant.n_kv_heads if name != "MLA" else f"{variant.kv_lora_rank}+{variant.qk_rope_head_dim}",
            "params": variant.num_parameters(),
            "train_flops_per_token": variant.flops_per_token(seq_len),
            "kv_bytes_per_token_bf16": kv,
            "kv_cache_at_max_seq_mib": kv * variant.max_seq_len / 2**20,
            "activation_mib": variant.activation_bytes(batch, seq_len, 2) / 2**20,
        })
    return rows


def print_cost_table(cfg: ModelConfig, seq_len: int, batch: int, title: str, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=title, caption=f"GFLOP/tok: training, at seq {seq_len}; KV in bf16; "
                                       f"activations in bf16 for batch {batch} × seq {seq_len}")
    for col in ("attention", "KV heads", "params", "GFLOP/tok", "KV B/tok", f"KV MiB@{cfg.max_seq_len}", "act. MiB"):
        table.add_column(col, justify="right")
    for r in cost_rows(cfg, seq_len, batch):
        table.add_row(r["attention"], str(r["kv_heads"]), f"{r['params'] / 1e6:.2f}M",
                      f"{r['train_flops_per_token'] / 1e9:.4f}", f"{r['kv_bytes_per_token_bf16']:,}",
                      f"{r['kv_cache_at_max_seq_mib']:.1f}", f"{r['activation_mib']:.0f}")
    console.print(table)


def describe(source: str) -> tuple[ModelConfig, dict]:
    """The config of a saved model (named asset, .gguf, Hugging Face or llmlab directory) and facts about its
    files: format, weight dtypes as stored, size on disk."""
    from ..io.assets import ASSETS, asset_path
    from ..io.checkpoint import read_json
    from ..io.hf import config_from_hf

    path = asset_path(source) if source in ASSETS else Path(source)
    if path.suffix == ".gguf":
        from ..io.gguf import read_gguf

        g = read_gguf(path)
        return config_from_hf(g.hf_config), {"format": "gguf", "architecture": "llama",
                                             "stored_dtypes": g.metadata["tensor_types"],
                                             "size_on_disk_mib": path.stat().st_size / 2**20}
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a model directory with config.json, a .gguf file or a named asset "
                         f"({', '.join(ASSETS)})")
    raw = read_json(path / "config.json")
    is_hf = "model_type" in raw or "architectures" in raw
    cfg = config_from_hf(raw) if is_hf else ModelConfig.from_dict(raw)
    dtypes: dict[str, int] = {}
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                name = str(st.get_slice(k).get_dtype())
                dtypes[name] = dtypes.get(name, 0) + 1
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    arch = (raw.get("architectures") or [raw.get("model_type")])[0] if is_hf else "llmlab"
    return cfg, {"format": "hf" if is_hf else "llmlab", "architecture": arch, "stored_dtypes": dtypes,
                 "size_on_disk_mib": size / 2**20}


def _info(args: argparse.Namespace) -> int:
    if args.source:
        cfg, facts = describe(args.source)
        seq = args.seq_len or min(cfg.max_seq_len, 256)
        facts = {"source": args.source, **facts, "params": cfg.num_parameters(),
                 "kv_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2)}
        if args.json:
            print(json.dumps({**facts, "config": cfg.to_dict()}, indent=2))
            return 0
        table = Table(title=f"llmlab model: {args.source}", show_header=False)
        for k, v in facts.items():
            table.add_row(k, f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        console = Console()
        console.print(table)
        print_cost_table(cfg, seq, args.batch, "the same model with each attention variant", console)
        return 0
    if args.config:
        cfg = ModelConfig.from_json(args.config)
        name = args.config
    elif args.depth:
        cfg = ModelConfig.from_depth(args.depth)
        name = f"depth {args.depth}"
    else:
        cfg = ModelConfig.preset(args.preset)
        name = f"preset {args.preset}"
    seq = args.seq_len or min(cfg.max_seq_len, 256)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "variants": cost_rows(cfg, seq, args.batch)}, indent=2))
        return 0
    print_cost_table(cfg, seq, args.batch, f"llmlab model: {name} (dim {cfg.dim}, {cfg.n_layers} layers, "
                                           f"{cfg.n_heads} heads, vocab {cfg.vocab_size})")
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("model", help="inspect model configurations and their cost")
    p.set_defaults(group_parser=p)
    commands = p.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="parameters, FLOPs, KV-cache and activation memory per attention variant")
    info.add_argument("source", nargs="?", help="a saved model: named asset, .gguf, Hugging Face or llmlab directory")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list(PRESETS), default="micro")
    src.add_argument("--depth", type=int, help="derive the size from a depth (the size dial)")
    src.add_argument("--config", type=Path, help="a ModelConfig JSON file")
    info.add_argument("--seq-len", type=int, help="sequence length for FLOPs and activations (default min(max_seq_len, 256))")
    info.add_argument("--batch", type=int, default=8)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)
