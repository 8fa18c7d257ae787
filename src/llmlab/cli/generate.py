"""`llmlab generate SRC [PROMPT ...]`: complete prompts with the inference engine.

    llmlab generate smollm2-135m-instruct "Once upon a time" --max-tokens 64 --temperature 0
    llmlab generate ckpt/ --file prompts.jsonl --json          # {"prompt": ...} per line, or plain lines
    echo "Hi" | llmlab generate smollm2-135m-instruct --chat --stream
    llmlab generate smollm2-135m-instruct "The capital of France" --num-beams 4 --n 2 --max-tokens 16

Prompts come from the arguments, else from --file (one per line, or JSONL with a "prompt" key), else from
stdin (the same formats). --chat renders each prompt as a user turn through the model's chat template. Output:
the generated text (one block per completion), --json one JSON line per completion, --stream the single
prompt's text as it is produced. --num-beams N runs beam search instead of sampling (--n best hypotheses per
prompt, --length-penalty; the sampling flags other than --max-tokens do not apply). The sampling and engine flags
are shared with `llmlab chat`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------------ shared flags


def add_model_args(p: argparse.ArgumentParser, *, src_optional: bool = False) -> None:
    p.add_argument("src", nargs="?" if src_optional else None, help="named asset, .gguf, Hugging Face or llmlab directory")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: as stored)")
    p.add_argument("--chat-template", metavar="NAME_OR_JINJA",
                   help="chat template: a built-in name (chatml, llama3) or Jinja source; default: the tokenizer's")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, help="tokens per KV-cache block (default 16)")
    e.add_argument("--max-num-seqs", type=int, help="sequences decoded together at most (default 64)")
    e.add_argument("--kv-memory-mb", type=float, help="memory for the KV cache in MiB (default 256)")
    e.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile (contiguous KV layout): minutes of compilation "
                        "first, faster tokens after")


def add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int | None, temperature: float,
                      several: bool = True) -> None:
    """max_tokens=None: the command picks the default (chat: 256, at most half the context window)."""
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"new tokens at most (default {max_tokens or '256, at most half the context window'})")
    s.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy (default {temperature})")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (1 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens with p < min_p * p_max (0 = off)")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0 (1 = off)")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string, not part of the output (repeatable)")
    s.add_argument("--seed", type=int, help="per-request seed: the same seed reproduces the same sample")
    if several:
        s.add_argument("--n", type=int, default=1, help="completions per prompt")
        s.add_argument("--logprobs", type=int, metavar="K",
                       help="report each token's logprob and the top K alternatives (with --json)")


def sampling_params(args: argparse.Namespace, stop_token_ids=()):
    """SamplingParams from the flags; an invalid value is reported by its flag name (--top-p, not top_p)."""
    from ..infer import SamplingParams

    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                  stop=list(args.stop), seed=args.seed, stop_token_ids=list(stop_token_ids))
    if hasattr(args, "n"):
        fields.update(n=args.n, logprobs=args.logprobs)
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise ValueError(re.sub(r"SamplingParams\.(\w+)=", lambda m: "--" + m.group(1).replace("_", "-") + " ",
                                str(e))) from None


def engine_options(args: argparse.Namespace) -> dict:
    opts = {}
    for flag, key in (("block_size", "block_size"), ("max_num_seqs", "max_num_seqs")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} {value} is invalid: it must be >= 1")
            opts[key] = value
    if args.kv_memory_mb is not None:
        if args.kv_memory_mb <= 0:
            raise ValueError(f"--kv-memory-mb {args.kv_memory_mb:g} is invalid: it must be > 0")
        opts["kv_memory"] = int(args.kv_memory_mb * 2**20)
    if getattr(args, "compile", False):
        opts.update(compile=True, kv_layout="contiguous")
    return opts


def load_llm(args: argparse.Namespace, *, need_chat: bool = False):
    """The LLM for args.src with the engine flags; errors (ValueError) when it has no tokenizer or, for chat,
    no chat template."""
    import torch

    from ..api import load
    from ..infer import LLM

    options = engine_options(args)
    model, tok = load(args.src, dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device)
    if tok is None:
        raise ValueError(f"{args.src} has no tokenizer (tokenizer.json); text generation needs one")
    if need_chat and tok.chat_template is None and not args.chat_template:
        raise ValueError(f"the tokenizer of {args.src} has no chat template; pass --chat-template chatml (or "
                         "llama3, or Jinja source)")
    return LLM(model, tok, **options)


def end_of_turn_ids(llm) -> list[int]:
    """Ids of end-of-turn tokens in the vocabulary that the engine does not already stop at (the server's list)."""
    # imported here: llmlab.serve loads the web stack, which `llmlab --help` and friends should not pay for
    from ..serve.end_of_turn import end_of_turn_ids as ids_of

    return ids_of(llm.tokenizer, llm.engine.eos_token_ids)


def check_fits(llm, ids: list[int], what: str, truncate: bool) -> None:
    window = llm.engine.max_seq_len
    if not ids:
        raise ValueError(f"{what} is empty: give at least one token")
    if len(ids) >= window and not truncate:
        raise ValueError(f"{what} has {len(ids)} tokens but the context window is {window} (at least one must be "
                         "left to generate); shorten it or pass --truncate to keep its last tokens")


# ------------------------------------------------------------------------------------------------ prompts


def parse_prompts(text: str, source: str) -> list[str]:
    """Plain text: one prompt per non-empty line. JSONL (the first non-empty line starts with "{"): one object
    with a string "prompt" per line."""
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines or not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {n}: not valid JSON ({e.msg}); JSONL input needs one "
                             '{"prompt": "..."} object per line') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{source} line {n}: expected an object with a string "prompt", got {line[:60]!r}')
        prompts.append(row["prompt"])
    return prompts


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt and args.file:
        raise ValueError("give prompts as arguments or with --file, not both")
    if args.prompt:
        return list(args.prompt)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts = parse_prompts(f.read(), args.file)
        source = args.file
    else:
        if sys.stdin.isatty():
            print("reading prompts from stdin, one per line (Ctrl-D to finish)", file=sys.stderr)
        prompts = parse_prompts(sys.stdin.read(), "stdin")
        source = "stdin"
    if not prompts:
        raise ValueError(f"no prompts in {source}: give one per line (or JSONL with a \"prompt\" key)")
    return prompts


def prompt_ids(llm, prompt: str, args: argparse.Namespace) -> list[int]:
    tok = llm.tokenizer
    if not args.chat:
        return tok.encode(prompt)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, chat_template=args.chat_template)


# ------------------------------------------------------------------------------------------------ command


def _json_row(prompt: str, req, comp) -> dict:
    row = {"prompt": prompt, "index": comp.index, "text": comp.text, "token_ids": comp.token_ids,
           "finish_reason": comp.finish_reason, "prompt_tokens": len(req.prompt_token_ids)}
    if comp.stop_reason is not None:
        row["stop_reason"] = comp.stop_reason
    if comp.logprobs is not None:
        row["cumulative_logprob"] = comp.cumulative_logprob
        row["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                            "top": {str(k): v for k, v in lp.top.items()}} for lp in comp.logprobs]
    return row


def _beam_params(args: argparse.Namespace, eos: list[int]):
    from ..infer import BeamParams

    if args.stream or args.stop or args.seed is not None or args.logprobs is not None:
        raise ValueError("--num-beams runs beam search: --stream, --stop, --seed and --logprobs do not apply to it")
    try:
        return BeamParams(num_beams=args.num_beams, max_tokens=args.max_tokens, length_penalty=args.length_penalty,
                          num_return_sequences=args.n, eos_token_ids=tuple(eos))
    except ValueError as e:
        flags = {"num_return_sequences": "n", "max_tokens": "max-tokens", "length_penalty": "length-penalty",
                 "num_beams": "num-beams"}
        raise ValueError(re.sub(r"BeamParams\.(\w+)=", lambda m: f"--{flags.get(m.group(1), m.group(1))} ",
                                str(e))) from None


def _beams(args: argparse.Namespace, llm, prompts: list[str], ids: list[list[int]], params) -> int:
    results = llm.beam_search(ids, params, truncate=args.truncate)
    eos = set(params.eos_token_ids)
    several = len(results) * params.num_return_sequences > 1
    for i, (prompt, hyps) in enumerate(zip(prompts, results)):
        for k, h in enumerate(hyps):
            if args.json:
                reason = "stop" if h.token_ids and h.token_ids[-1] in eos else "length"
                print(json.dumps({"prompt": prompt, "index": k, "text": h.text, "token_ids": h.token_ids,
                                  "score": h.score, "finish_reason": reason}, ensure_ascii=False))
                continue
            if several:
                print(f"--- prompt {i + 1}" + (f", beam {k + 1}" if params.num_return_sequences > 1 else ""))
            print(h.text)
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.stream and args.json:
        raise ValueError("--stream prints text as it comes; it does not combine with --json")
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    params = sampling_params(args)  # bad flags fail before the model loads
    if args.stream and params.n != 1:
        raise ValueError("--stream follows one completion; use --n 1 (or drop --stream)")
    if args.num_beams != 1:
        _beam_params(args, [])  # bad flags fail before the model loads
    prompts = read_prompts(args)
    if args.stream and len(prompts) != 1:
        raise ValueError(f"--stream takes a single prompt, got {len(prompts)}")
    llm = load_llm(args, need_chat=args.chat)
    stop_ids = end_of_turn_ids(llm) if args.chat else []
    if stop_ids:
        params = sampling_params(args, stop_token_ids=stop_ids)
    ids = [prompt_ids(llm, p, args) for p in prompts]
    if args.num_beams != 1:
        return _beams(args, llm, prompts, ids, _beam_params(args, [*llm.engine.eos_token_ids, *stop_ids]))
    for i, x in enumerate(ids):
        check_fits(llm, x, f"prompt {i + 1}" if len(ids) > 1 else "the prompt", args.truncate)

    if args.stream:
        for piece in llm.stream(ids[0], params, truncate=args.truncate):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0

    outs = llm.generate(ids, params, truncate=args.truncate, progress=len(ids) > 1)
    several = len(outs) * params.n > 1
    for i, (prompt, req) in enumerate(zip(prompts, outs)):
        for comp in req.outputs:
            if args.json:
                print(json.dumps(_json_row(prompt, req, comp), ensure_ascii=False))
                continue
            if several:
                print(f"--- prompt {i + 1}" + (f", sample {comp.index + 1}" if params.n > 1 else ""))
            print(comp.text)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("generate", help="complete prompts with a model (batched, streamed or as JSON)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("prompt", nargs="*", help="prompts (default: --file, else stdin, one per line)")
    p.add_argument("--file", help="prompts, one per line, or JSONL with {\"prompt\": ...} per line")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--stream", action="store_true", help="print the single prompt's text as it is produced")
    p.add_argument("--json", action="store_true",
                   help="one JSON line per completion: prompt, text, token_ids, finish_reason, ...")
    p.add_argument("--truncate", action="store_true", help="keep the last tokens of a prompt that is too long")
    add_sampling_args(p, max_tokens=128, temperature=1.0)
    b = p.add_argument_group("beam search")
    b.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams instead of sampling "
                   "(1 = sample); --n best hypotheses are printed")
    b.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam scores are sum(logprobs) / length^this (> 0 favours longer outputs)")
    p.set_defaults(run=_generate, group_parser=p)
