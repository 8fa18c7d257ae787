"""`llmlab eval SRC --task ...`: perplexity, multiple-choice tasks and generation metrics of one model.

    llmlab eval smollm2-135m-instruct --task perplexity --text moby_dick --max-length 512 --max-chars 200000
    llmlab eval ckpt/ --task strategyqa --task truthful_qa --limit 100 --json
    llmlab eval ckpt/ --task my_task.jsonl --task lm_eval_task.yaml --out results.json
    llmlab eval ckpt/ --task generation --data qa.jsonl --metrics em,f1 --chat --max-tokens 32 --stop $'\\n'
    llmlab eval --list-tasks --include-path my_yaml_tasks/

--task is repeatable; every task runs in one process on a model loaded once. A task is:
- perplexity: the text of --text (a file, a directory or a named corpus: english, chinese, moby_dick, ...;
  documents joined by a blank line) scored with Hugging Face's sliding-window protocol: windows of
  --max-length tokens (default: the model's context) start every --stride tokens (default: --max-length,
  disjoint windows); each window scores only the tokens the previous window did not score, each given the
  tokens before it in its window. Reports ppl = exp(NLL / tokens scored) and bits per UTF-8 byte of the text.
- a multiple-choice task: a built-in BIG-bench name (../shared/data/multiple_choice, or --data-dir), a task:
  name of an lm-eval YAML under --include-path, a .jsonl file (question / choices / gold) or an lm-eval .yaml;
  scored as lm-evaluation-harness scores it: acc, acc_norm, acc_bytes with their standard errors.
- generation: --data JSONL with "prompt" and "reference" (or "answers"; a string or a list of strings) per
  line; greedy completions of at most --max-tokens tokens, scored with BLEU, chrF, ROUGE F (rouge1, rouge2,
  rougeL, rougeLsum), SQuAD exact match and token F1, all on a 0-100 scale.
--limit N keeps the first N items of multiple-choice and generation tasks (a number < 1: that fraction).
Output: a table per task; --json one JSON object on stdout; --out also writes that object to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from .generate import add_model_args, check_fits, end_of_turn_ids, engine_options, prompt_ids

METRICS = ("bleu", "chrf", "rouge", "em", "f1")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ------------------------------------------------------------------------------------------------ tasks


def _text(args: argparse.Namespace) -> str:
    from ..data.corpus import read_documents

    if not args.text:
        raise ValueError("--task perplexity needs --text FILE_OR_CORPUS (a file, a directory or a named corpus)")
    text = "\n\n".join(read_documents(args.text))  # the HF recipe joins documents with a blank line
    return text[:args.max_chars] if args.max_chars else text


def _generation_items(path: str) -> list[tuple[str, list[str], str]]:
    """(prompt, references, "file:line") per non-blank line of a JSONL file; a bad line is an error naming file:line."""
    from ..eval.tasks import read_jsonl

    items = []
    for row, where in zip(*read_jsonl(Path(path))):
        refs = row.get("reference", row.get("answers"))
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(row.get("prompt"), str) or not refs or not isinstance(refs, list) \
                or not all(isinstance(r, str) for r in refs):
            raise ValueError(f'{where}: expected an object with a string "prompt" and a "reference" (or "answers"): '
                             f"a string or a non-empty list of strings; got {json.dumps(row)[:80]}")
        items.append((row["prompt"], refs, where))
    if not items:
        raise ValueError(f"{path}: no items (one JSON object per line)")
    return items


def _metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics {spec!r}: unknown metric {unknown[0] if unknown else '(none)'!r}; choose from "
                         f"{','.join(METRICS)}")
    return names


def prepare(args: argparse.Namespace) -> list[tuple[str, str, object]]:
    """(kind, name, payload) per --task, everything read and checked before the (slow) model load."""
    from ..data.sources import MissingDataError
    from ..eval.perplexity import sliding_windows
    from ..eval.tasks import UnknownTaskError, load_task

    tasks = []
    for spec in args.task:
        if spec == "perplexity":
            if args.max_length is not None:  # a bad window fails now, not after the model load
                sliding_windows(0, args.max_length, args.stride)
            tasks.append(("perplexity", spec, _text(args)))
        elif spec == "generation":
            if not args.data:
                raise ValueError("--task generation needs --data FILE.jsonl (\"prompt\" and \"reference\" per line)")
            _metrics(args.metrics)
            if args.max_tokens < 1:
                raise ValueError(f"--max-tokens {args.max_tokens} is invalid: it must be >= 1")
            items = _generation_items(args.data)
            tasks.append(("generation", spec, items[:_limit_n(args.limit, len(items))]))
        else:
            try:
                task = load_task(spec, include_path=args.include_path, data_dir=args.data_dir)
            except UnknownTaskError as e:  # a KeyError: main() only turns ValueError into one clean line
                raise ValueError(str(e)) from None
            except MissingDataError as e:
                raise MissingDataError(f"{e} (on the command line: --data-dir DIR)") from None
            tasks.append(("multiple_choice", task.name, task))
    names = [name for _, name, _ in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"task {twice[0]!r} is given twice; results are keyed by task name")
    return tasks


def _limit_n(limit, n: int) -> int:
    """lm-eval's --limit: an int (or a float >= 1) keeps that many items, a float < 1 that fraction (rounded up)."""
    return n if limit is None else math.ceil(n * limit) if limit < 1 else int(limit)


def _positive(s: str) -> int | float:
    value = float(s) if any(c in s for c in ".eE") else int(s)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return value


def _positive_int(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s}")
    return int(s)


# ------------------------------------------------------------------------------------------------ running


def run_generation(llm, items, args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from ..eval.generation import bleu, chrf, rouge, squad
    from ..infer import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop=list(args.stop))
    if args.chat:  # a chat model ends its turn with a token the engine may not stop at by itself
        params = replace(params, stop_token_ids=end_of_turn_ids(llm))
    ids = [prompt_ids(llm, prompt, args) for prompt, _, _ in items]
    for x, (_, _, where) in zip(ids, items):
        check_fits(llm, x, f"the prompt of {where}", truncate=False)
    hyps = [out.outputs[0].text for out in llm.generate(ids, params, progress=True)]
    refs = [r for _, r, _ in items]
    result = {"n": len(items), "max_tokens": args.max_tokens}
    for metric in _metrics(args.metrics):
        if metric == "bleu":
            result["bleu"] = bleu(hyps, refs).score
        elif metric == "chrf":
            result["chrf"] = chrf(hyps, refs).score
        elif metric == "rouge":  # F-measure averaged over items, as rouge-score's users report it
            scores = [rouge(h, r, mode=args.rouge_mode) for h, r in zip(hyps, refs)]
            result.update({t: 100 * sum(s[t].fmeasure for s in scores) / len(scores) for t in ROUGE_TYPES})
        else:  # SQuAD's corpus exact match / token F1, in percent
            key = "exact_match" if metric == "em" else "f1"
            result[key] = squad(hyps, refs)[key]
    return result


def _print_table(name: str, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name} ({result['n']} items)" if "n" in result else f"{name} of {result['text']}")
    for col in ("metric", "value", "± stderr"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, value in result.items():
        if key.endswith("_stderr") or key in ("task", "n", "text"):
            continue
        stderr = result.get(f"{key}_stderr")
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown, f"{stderr:.4f}" if stderr is not None else "")
    Console().print(table)


def write_json(path: str, payload: dict) -> None:
    """Atomically: a reader (or a crash) never sees half a results file."""
    folder = Path(path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eval-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _eval(args: argparse.Namespace) -> int:
    from ..eval.tasks import available_tasks

    if args.list_tasks:
        names = available_tasks(args.include_path)
        print(json.dumps({"tasks": names}) if args.json else "\n".join(names))
        return 0
    if not args.src or not args.task:
        raise ValueError("give SRC (the model) and at least one --task (or --list-tasks)")
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    if args.chat and "generation" not in args.task:
        raise ValueError("--chat only applies to --task generation")
    options = engine_options(args)  # bad flags and bad task files fail before the model loads
    tasks = prepare(args)

    import torch

    from ..api import load
    from ..eval.multiple_choice import evaluate_multiple_choice
    from ..eval.perplexity import perplexity

    model, tok = load(args.src, dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device)
    if tok is None:
        raise ValueError(f"{args.src} has no tokenizer (tokenizer.json); evaluation needs one")
    if args.chat and tok.chat_template is None and not args.chat_template:
        raise ValueError(f"the tokenizer of {args.src} has no chat template; pass --chat-template chatml (or llama3)")
    if args.bos and "perplexity" in args.task and not tok.bos_token:
        raise ValueError(f"--bos: the tokenizer of {args.src} has no bos_token; drop --bos (GPT-2 style evaluation "
                         "scores the text without one)")
    results = {}
    for kind, name, payload in tasks:
        if kind == "perplexity":
            r = perplexity(model, tok, payload, max_length=args.max_length, stride=args.stride,
                           batch_size=args.batch_size, bos=args.bos)
            results[name] = {"text": args.text, **r.to_dict()}
        elif kind == "multiple_choice":
            r = evaluate_multiple_choice(model, tok, payload, limit=args.limit, batch_size=args.batch_size)
            results[name] = r.metrics()
        else:
            from ..infer import LLM

            results[name] = run_generation(LLM(model, tok, **options), payload, args)
    payload = {"model": args.src, "results": results}
    if args.out:
        write_json(args.out, payload)
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        for name, result in results.items():
            _print_table(name, result)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("eval", help="perplexity, multiple-choice tasks and generation metrics",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, src_optional=True)  # --list-tasks needs no model
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help="perplexity, generation, a built-in or --include-path task name, a .jsonl or .yaml task "
                        "file (repeatable)")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    p.add_argument("--limit", type=_positive, help="the first N items of each task (N < 1: that fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every task's results")
    p.add_argument("--out", metavar="FILE", help="also write the JSON results to FILE (atomically)")
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument("--text", metavar="FILE_OR_CORPUS", help="a text file, directory or named corpus")
    ppl.add_argument("--max-length", type=int, help="tokens per window (default: the model's context)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts, <= --max-length (default: "
                                                "--max-length); smaller gives each token more context")
    ppl.add_argument("--bos", action="store_true",
                     help="put the tokenizer's BOS in front, so the first text token is scored too")
    ppl.add_argument("--max-chars", type=_positive_int, help="score only the first N characters (default: all)")
    mc = p.add_argument_group("multiple choice")
    mc.add_argument("--data-dir", help="folder of the built-in task files (default ../shared/data/multiple_choice)")
    mc.add_argument("--include-path", metavar="DIR", help="folder of lm-eval YAML tasks, found by their task: name")
    gen = p.add_argument_group("generation")
    gen.add_argument("--data", metavar="FILE.jsonl", help='"prompt" and "reference" (or "answers") per line')
    gen.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated (default {','.join(METRICS)})")
    gen.add_argument("--rouge-mode", choices=("rouge_score", "unicode"), default="rouge_score",
                     help="rouge_score: ASCII tokens as rouge-score; unicode: any script, CJK per character")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user turn through the chat template")
    gen.add_argument("--system", help="system message for --chat")
    gen.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64); decoding is greedy")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.set_defaults(run=_eval, group_parser=p)
