"""`llmlab convert SRC DST --to hf|llmlab`: any model llmlab loads, written as a Hugging Face directory or an
llmlab checkpoint (with its tokenizer)."""

from __future__ import annotations

import argparse


def _convert(args: argparse.Namespace) -> int:
    from ..api import load, save

    model, tok = load(args.src)
    save(model, tok, args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
          f"{', with tokenizer' if tok is not None else ''})")
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("convert", help="convert a model between formats (GGUF / HF / llmlab -> HF or llmlab)")
    p.add_argument("src", help="named asset, .gguf, Hugging Face or llmlab directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "llmlab"), required=True)
    p.set_defaults(run=_convert, group_parser=p)
