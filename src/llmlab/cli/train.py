"""`llmlab pretrain` and `llmlab sft`: a workflow from a YAML recipe plus key=value overrides.

    llmlab pretrain --recipe recipes/pretrain/micro.yaml train.max_steps=200 out_dir=runs/micro
    llmlab sft --recipe recipes/sft/smollm2.yaml data.max_conversations=200
    llmlab sft --recipe recipes/sft/nano.yaml --peft lora peft.r=8      # LoRA (the `peft` section; adapter/)
    llmlab pretrain --recipe recipes/pretrain/nano.yaml --print-config     # the resolved config, then exit
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import yaml

from ..train import PretrainConfig, SFTConfig, TrainingDiverged, load_recipe, pretrain, sft
from ..train.recipe import to_dict

WORKFLOWS = {
    "pretrain": (PretrainConfig, pretrain, "pretrain a model from a preset on text corpora"),
    "sft": (SFTConfig, sft, "supervised fine-tuning on conversations (loss on assistant turns)"),
}


def _run(name: str, args: argparse.Namespace) -> int:
    cls, workflow, _ = WORKFLOWS[name]
    overrides = list(args.overrides)
    if getattr(args, "peft", None):  # the shortcut first: an explicit peft.method=... still wins
        overrides.insert(0, f"peft.method={args.peft}")
    cfg = load_recipe(cls, args.recipe, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    try:
        result = workflow(cfg)
    except TrainingDiverged as e:
        print(f"llmlab {name}: {e}", file=sys.stderr)
        return 3
    parts = [f"{result.steps} steps", f"{result.tokens:,} tokens", f"{result.tokens_per_s:,.0f} tokens/s"]
    if result.val_loss is not None:
        parts.append(f"val loss {result.val_loss:.4f}")
    if result.best_step is not None:
        parts.append(f"best {result.best_val_loss:.4f} at step {result.best_step}")
    print(f"{name}: " + ", ".join(parts))
    print(f"model: {cfg.out_dir}/final   metrics: {result.metrics_path}   plot: {result.plot_path}")
    peft = getattr(getattr(cfg, "peft", None), "method", "none")
    if peft != "none":
        import json
        from pathlib import Path

        s = json.loads((Path(cfg.out_dir) / "peft.json").read_text())
        print(f"peft {peft}: {s['trainable_parameters']:,} trainable parameters of {s['total_parameters']:,} "
              f"({s['trainable_percent']:.3f}%)   adapter: {cfg.out_dir}/adapter")
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    for name, (_, _, help_text) in WORKFLOWS.items():
        p = groups.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0])
        p.add_argument("--recipe", help=f"a YAML recipe (recipes/{name}/*.yaml); without one the defaults apply")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="override recipe keys, dotted for nested sections (train.lr=1e-3 data.seq_len=128)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if name == "sft":
            p.add_argument("--peft", metavar="METHOD",
                           help="parameter-efficient fine-tuning: sets peft.method (none lora dora adalora ia3 "
                                "bitfit adapter prompt ptuning prefix); tune it with peft.r=8 peft.alpha=16 ...")
        p.set_defaults(run=partial(_run, name), group_parser=p)
