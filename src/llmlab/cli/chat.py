"""`llmlab chat SRC`: an interactive chat in the terminal, replies streamed as they are generated.

    llmlab chat smollm2-135m-instruct --system "You are terse." --temperature 0.7

Each line you type is a user message; the whole conversation goes through the model's chat template and the
reply streams to stdout. /reset starts over (the system message stays), /exit or end of input (Ctrl-D) quits.
When the conversation outgrows the context window the oldest turns are dropped (never the system message) so
that the prompt plus --max-tokens fits; a single message too long to fit is refused, not sent.
"""

from __future__ import annotations

import argparse
import sys

from .generate import add_model_args, add_sampling_args, end_of_turn_ids, load_llm, sampling_params

DEFAULT_MAX_TOKENS = 256
COMMANDS = {"/reset": "forget the conversation (the system message stays)", "/exit": "quit (or Ctrl-D)",
            "/help": "list the commands"}


def _prompt_tokens(tokenizer, messages: list[dict], chat_template: str | None) -> int:
    if not messages:
        return 0
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=chat_template))


def fit_history(tokenizer, messages: list[dict], max_prompt_tokens: int,
                chat_template: str | None = None) -> list[dict]:
    """The conversation shortened to at most max_prompt_tokens prompt tokens (rendered with the generation
    prompt): the oldest turns go first, a whole turn at a time (a user message with the replies that follow it,
    so the rest still opens with a user message); a leading system message always stays. When even the last
    message alone does not fit, it is dropped too, leaving only the system message (or nothing): the caller
    sees its message is gone. A new list; the input is not changed."""
    messages = list(messages)
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(system):]
    while rest and _prompt_tokens(tokenizer, system + rest, chat_template) > max_prompt_tokens:
        if len(rest) == 1:
            return system
        rest = rest[1:]
        while len(rest) > 1 and rest[0].get("role") != "user":  # drop the replies of the dropped turn too
            rest = rest[1:]
    return system + rest


def _chat(args: argparse.Namespace) -> int:
    default_max_tokens = args.max_tokens is None
    if default_max_tokens:
        args.max_tokens = 1
    sampling_params(args)  # bad flags fail before the model loads
    llm = load_llm(args, need_chat=True)
    window = llm.model.cfg.max_seq_len
    if default_max_tokens:
        args.max_tokens = max(1, min(DEFAULT_MAX_TOKENS, window // 2))
    params = sampling_params(args)
    if params.max_tokens >= window:
        raise ValueError(f"--max-tokens {params.max_tokens} leaves no room for the conversation in the context "
                         f"window of {window} tokens; lower it")
    if end_of_turn_ids(llm):
        params = sampling_params(args, stop_token_ids=end_of_turn_ids(llm))
    tok, template = llm.tokenizer, args.chat_template
    budget = window - params.max_tokens
    system = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.src} (context {window} tokens); /reset to start over, /exit to quit",
              file=sys.stderr)
    history = list(system)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and text.split()[0] in COMMANDS:
            command = text.split()[0]
            if command == "/exit":
                return 0
            if command == "/reset":
                history = list(system)
                print("(conversation reset)", file=sys.stderr)
            else:
                for name, what in COMMANDS.items():
                    print(f"{name:8} {what}", file=sys.stderr)
            continue
        user = {"role": "user", "content": text}
        fitted = fit_history(tok, history + [user], budget, template)
        if not fitted or fitted[-1] is not user:
            needed = _prompt_tokens(tok, system + [user], template)
            print(f"llmlab: that message needs {needed} prompt tokens{' with the system message' if system else ''}"
                  f" but only {budget} fit (context window {window} - --max-tokens {params.max_tokens}); it was "
                  "not sent. Shorten it or lower --max-tokens.", file=sys.stderr)
            continue
        if len(fitted) < len(history) + 1:
            print(f"(dropped {len(history) + 1 - len(fitted)} old messages to fit the context window)",
                  file=sys.stderr)
        history = fitted
        ids = tok.apply_chat_template(history, add_generation_prompt=True, chat_template=template)
        pieces = []
        try:
            for piece in llm.stream(ids, params):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep what was said
            print(" [interrupted]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("chat", help="interactive chat with streamed replies",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--system", help="system message, kept through /reset and context trimming")
    add_sampling_args(p, max_tokens=None, temperature=0.7, several=False)
    p.set_defaults(run=_chat, group_parser=p)
