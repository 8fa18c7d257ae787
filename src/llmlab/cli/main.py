"""`llmlab <group> <command> ...`. Each group module exposes `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys

from . import align, chat, convert, eval, generate, model, peft, serve, speedrun, tokenizer, train

GROUPS = [model, tokenizer, convert, train, peft, align, generate, chat, serve, speedrun, eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmlab", description="The whole LLM lifecycle, small and tested.")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", title="command groups")
    for module in GROUPS:
        module.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        (getattr(args, "group_parser", None) or parser).print_help()
        return 0 if args.group is None else 2
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input or missing data: one clear line, no traceback
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
