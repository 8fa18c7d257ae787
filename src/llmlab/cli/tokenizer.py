"""`llmlab tokenizer train | encode | decode | eval`: train, run and measure tokenizers."""

from __future__ import annotations

import argparse
import json
import os
import time

from rich.console import Console
from rich.table import Table

from ..tokenizer import KINDS, load, train
from ..tokenizer.evaluate import evaluate

CORPORA = ("english", "chinese")


def read_corpus(names: list[str]) -> dict[str, list[str]]:
    """Named corpora ("english", "chinese" from llmlab.data.sources) or text files, as lists of lines."""
    from ..data import sources

    out = {}
    for name in names:
        if name == "english":
            text = sources.english_text()
        elif name == "chinese":
            text = sources.chinese_text()
        elif os.path.isfile(name):
            with open(name, encoding="utf-8") as f:
                text = f.read()
        else:
            raise ValueError(f"unknown corpus {name!r}: use {' or '.join(CORPORA)}, or the path of a text file")
        out[name] = [line for line in text.split("\n") if line.strip()]
    return out


def _train(args) -> int:
    corpora = read_corpus(args.corpus)
    texts = [line for lines in corpora.values() for line in lines]
    start = time.perf_counter()
    tok = train(texts, args.kind, vocab_size=args.vocab_size, special_tokens=args.special or (),
                min_frequency=args.min_frequency, byte_level=not args.char_level, progress=True)
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    path = tok.save(args.out)
    print(f"trained {args.kind} with {len(tok)} tokens on {sum(len(t) for t in texts) / 1e6:.2f} M characters "
          f"in {seconds:.1f} s -> {path}")
    return 0


def _encode(args) -> int:
    tok = load(args.tokenizer)
    ids = tok.encode(args.text, parse_special=not args.no_special, add_special_tokens=not args.raw)
    if args.tokens:
        print(json.dumps([tok.id_to_token(i) for i in ids], ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0


def _decode(args) -> int:
    tok = load(args.tokenizer)
    try:
        ids = [int(i) for i in args.ids]
    except ValueError:
        raise ValueError(f"token ids must be integers, got {' '.join(args.ids)!r}") from None
    print(tok.decode(ids, skip_special_tokens=args.skip_special))
    return 0


def _eval(args) -> int:
    rows = []
    for path in args.tokenizer:
        tok = load(path)
        for name, lines in read_corpus(args.corpus).items():
            rows.append({"tokenizer": path, "corpus": name, **evaluate(tok, lines, progress=True)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="tokenizer evaluation")
    for col in ("tokenizer", "corpus", "vocab", "bytes/token", "chars/token", "vocab used", "unk rate"):
        table.add_column(col, justify="left" if col in ("tokenizer", "corpus") else "right")
    for r in rows:
        table.add_row(r["tokenizer"], r["corpus"], str(r["vocab_size"]), f"{r['bytes_per_token']:.2f}",
                      f"{r['chars_per_token']:.2f}", f"{r['vocab_used']:.1%}", f"{r['unk_rate']:.2%}")
    Console().print(table)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("tokenizer", help="train, run and evaluate tokenizers")
    commands = p.add_subparsers(dest="command", metavar="COMMAND")
    p.set_defaults(group_parser=p)

    t = commands.add_parser("train", help="train a tokenizer and save tokenizer.json")
    t.add_argument("--kind", choices=KINDS, default="bpe")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--corpus", nargs="+", default=["english"], help=f"{' / '.join(CORPORA)} or text files")
    t.add_argument("--special", nargs="*", help="special tokens (first ids)")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--char-level", action="store_true", help="BPE on characters with byte fallback (Llama style)")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(run=_train)

    e = commands.add_parser("encode", help="text -> ids (or tokens)")
    e.add_argument("tokenizer", help="tokenizer.json, vocab.json, vocab.txt or a directory")
    e.add_argument("text")
    e.add_argument("--tokens", action="store_true", help="print token strings instead of ids")
    e.add_argument("--no-special", action="store_true", help="treat special-token text as plain text")
    e.add_argument("--raw", action="store_true", help="no post-processing ([CLS]/[SEP], BOS ...)")
    e.set_defaults(run=_encode)

    d = commands.add_parser("decode", help="ids -> text")
    d.add_argument("tokenizer")
    d.add_argument("ids", nargs="+")
    d.add_argument("--skip-special", action="store_true")
    d.set_defaults(run=_decode)

    v = commands.add_parser("eval", help="bytes per token and vocabulary use on corpora")
    v.add_argument("tokenizer", nargs="+")
    v.add_argument("--corpus", nargs="+", default=list(CORPORA))
    v.add_argument("--json", action="store_true")
    v.set_defaults(run=_eval)
