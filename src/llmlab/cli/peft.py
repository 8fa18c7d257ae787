"""`llmlab peft merge BASE ADAPTER OUT [--to hf|llmlab]`: a LoRA, DoRA or (IA)³ adapter in PEFT's format
(what `llmlab sft --peft lora` writes to run_dir/adapter/, or peft.PeftModel.save_pretrained) folded into its
base model's weights, saved as a plain model with the base's tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _merge(args: argparse.Namespace) -> int:
    from ..api import load, save
    from ..peft import load_adapter
    from ..train.supervised import plain_model

    config = Path(args.adapter) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{args.adapter} has no adapter_config.json: expected a PEFT adapter directory")
    kind = json.loads(config.read_text()).get("peft_type", "LORA")
    if kind not in ("LORA", "IA3"):
        raise ValueError(f"{args.adapter}: peft_type={kind!r} cannot be merged into the weights (LoRA, DoRA and IA3 "
                         "can; a prompt or prefix stays an adapter: llmlab.peft.load_prompt)")
    model, tok = load(args.base)
    load_adapter(model, args.adapter)
    merged = plain_model(model)
    save(merged, tok, args.out, format=args.to)
    print(f"wrote {args.out} ({args.to}): {args.base} + {kind} adapter {args.adapter} merged"
          f"{', with tokenizer' if tok is not None else ''}")
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    g = groups.add_parser("peft", help="parameter-efficient fine-tuning adapters (merge)")
    sub = g.add_subparsers(metavar="COMMAND")
    p = sub.add_parser("merge", help="merge a LoRA/DoRA/IA3 adapter (PEFT format) into its base model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the base model: named asset, .gguf, Hugging Face or llmlab directory")
    p.add_argument("adapter", help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=("hf", "llmlab"), default="llmlab", help="output format (default llmlab)")
    p.set_defaults(run=_merge, group_parser=p)
    g.set_defaults(group_parser=g)
