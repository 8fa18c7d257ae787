"""Tasks for online RL (GRPO, PPO): where the prompts come from, their answers when the task is verifiable, and
how completions are scored (reward functions by name, weighted: RewardConfig and Scorer).

    train, held_out = load_prompts(PromptData(source="arithmetic", a_range=[10, 99], b_range=[0, 9]), seed=0)
    train[0]  # {"prompt": "What is 37 + 5?", "answer": "42"}

An item is a dict with "prompt" (a string, or a list of chat messages) and optionally "answer"; any other
columns ride along and reach the reward functions as keyword lists, one value per completion (as TRL's GRPO
passes dataset columns). Sources:

    arithmetic      a seeded generator of "What is a op b?" problems over configurable operand ranges
    sentiment       built-in openers for the "make the policy positive" demo (no answers)
    chat-english, chat-chinese   the questions of the chatterbot-corpus turns (no answers)
    a .jsonl file   one object a line with a prompt column (and an answer column when the task has one)

The held-out split never shares a prompt with the training split: prompts are de-duplicated first (by their
text), then split. `eval_source` names a separate held-out file instead.

Reward functions (align/reward.py) by name: exact_answer (needs the items' answers), format, lexicon_sentiment,
length_penalty, model (a reward model checkpoint); the score is Σ_i w_i·r_i as in TRL.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .reward import EXTRACTORS

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NAMED_SOURCES = ("arithmetic", "sentiment", "chat-english", "chat-chinese")
REWARD_FUNCTIONS = ("exact_answer", "format", "lexicon_sentiment", "length_penalty", "model")

SENTIMENT_OPENERS = (
    "Write a short review of the film.", "How was your day?", "Describe the weather today.",
    "Tell me about your favourite book.", "What do you think of the new restaurant?", "Describe the concert.",
    "How was the trip?", "What did you think of the game?", "Review the hotel you stayed at.",
    "Describe your new phone.", "How was the party?", "Tell me about the museum.", "What do you think of the city?",
    "Describe the meal you had.", "How was the lecture?", "Tell me about your weekend.", "Review the coffee shop.",
    "Describe the park.", "How is the new job?", "What do you think of the song?", "Describe the garden.",
    "Tell me about the show you watched.", "How was the flight?", "Describe the beach.",
)


@dataclass
class PromptData:
    source: str = "arithmetic"  # arithmetic | sentiment | chat-english | chat-chinese | path to a .jsonl file
    eval_source: str | None = None  # a separate held-out .jsonl; None: hold out n_eval prompts of source
    n_train: int = 0  # training prompts; 0: all that are not held out
    n_eval: int = 64  # held-out prompts (for evaluation); 0: none
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    # the arithmetic generator: every (a, op, b) with a in a_range, b in b_range (inclusive), seeded shuffle
    ops: list[str] = field(default_factory=lambda: ["+"])
    a_range: list[int] = field(default_factory=lambda: [0, 20])
    b_range: list[int] = field(default_factory=lambda: [0, 20])
    template: str = "What is {a} {op} {b}?"
    chat_template: str | None = None  # None: the tokenizer's; or a built-in name (chatml, llama3) or Jinja text

    def validate(self) -> None:
        if self.source not in NAMED_SOURCES and not self.source.endswith(".jsonl"):
            close = difflib.get_close_matches(self.source, NAMED_SOURCES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown data.source {self.source!r}{hint}; use one of {', '.join(NAMED_SOURCES)} "
                             "or a .jsonl file with a prompt column")
        if self.n_train < 0 or self.n_eval < 0:
            raise ValueError(f"data.n_train and data.n_eval must be >= 0, got {self.n_train} and {self.n_eval}")
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise ValueError(f"data.ops has {bad or 'nothing'}; use some of {', '.join(OPS)}")
        for name in ("a_range", "b_range"):
            r = getattr(self, name)
            if len(r) != 2 or r[0] > r[1]:
                raise ValueError(f"data.{name} must be [low, high] with low <= high, got {r}")
        if "{a}" not in self.template or "{b}" not in self.template:
            raise ValueError(f"data.template must contain {{a}} and {{b}} (and may use {{op}}), got {self.template!r}")


# ----------------------------------------------------------------------------------------------- sources
def arithmetic_problems(*, ops=("+",), a_range=(0, 20), b_range=(0, 20), template: str = "What is {a} {op} {b}?",
                        seed: int = 0) -> list[dict]:
    """Every problem a op b over the inclusive operand ranges, in a seeded random order:
    {"prompt": "What is 7 + 5?", "answer": "12", "a": 7, "b": 5, "op": "+"}."""
    items = [{"prompt": template.format(a=a, op=op, b=b), "answer": str(OPS[op](a, b)), "a": a, "b": b, "op": op}
             for op in ops for a in range(a_range[0], a_range[1] + 1) for b in range(b_range[0], b_range[1] + 1)]
    random.Random(seed).shuffle(items)
    return items


def read_prompts(path: str | Path, *, prompt_column: str = "prompt", answer_column: str = "answer") -> list[dict]:
    """Items from a JSONL file: one object a line with `prompt_column` (a string or a list of chat messages) and,
    when present, `answer_column` (kept as "answer"). Blank lines are skipped; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        if prompt_column not in row:
            raise ValueError(f"{path}:{n}: no {prompt_column!r} column (columns: {', '.join(row) or 'none'}); set "
                             "data.prompt_column to the column that holds the prompt")
        prompt = row.pop(prompt_column)
        if not _is_prompt(prompt):
            raise ValueError(f"{path}:{n}: {prompt_column!r} must be a non-empty string or a list of "
                             f"{{'role', 'content'}} messages, got {str(prompt)[:60]!r}")
        item = {"prompt": prompt}
        if answer_column in row:
            answer = row.pop(answer_column)
            if answer is None or isinstance(answer, (dict, list)):
                raise ValueError(f"{path}:{n}: {answer_column!r} must be a string or a number, got {answer!r}")
            item["answer"] = str(answer)
        item.update(row)
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _is_prompt(p: Any) -> bool:
    if isinstance(p, str):
        return bool(p.strip())
    return isinstance(p, list) and bool(p) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p)


def named_prompts(name: str) -> list[dict]:
    """The items of a named source other than arithmetic."""
    if name == "sentiment":
        return [{"prompt": p} for p in SENTIMENT_OPENERS]
    if name in ("chat-english", "chat-chinese"):
        from ..data.sources import chat_pairs

        return [{"prompt": q} for q, _ in chat_pairs(name.split("-", 1)[1])]
    raise ValueError(f"unknown prompt source {name!r}; use one of {', '.join(NAMED_SOURCES)} or a .jsonl file")


def prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _unique(items: list[dict]) -> list[dict]:
    seen, out = set(), []
    for item in items:
        key = prompt_key(item["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def load_prompts(cfg: PromptData, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items) for cfg; the two never share a prompt."""
    cfg.validate()
    if cfg.source == "arithmetic":
        items = arithmetic_problems(ops=cfg.ops, a_range=cfg.a_range, b_range=cfg.b_range, template=cfg.template,
                                    seed=seed)
    elif cfg.source.endswith(".jsonl"):
        items = read_prompts(cfg.source, prompt_column=cfg.prompt_column, answer_column=cfg.answer_column)
    else:
        items = named_prompts(cfg.source)
    items = _unique(items)
    if cfg.source != "arithmetic":  # the generator already shuffled; files keep a seeded order too
        random.Random(seed).shuffle(items)
    if cfg.eval_source:
        held = _unique(read_prompts(cfg.eval_source, prompt_column=cfg.prompt_column, answer_column=cfg.answer_column))
        if cfg.n_eval:
            held = held[:cfg.n_eval]
        keys = {prompt_key(x["prompt"]) for x in held}
        train = [x for x in items if prompt_key(x["prompt"]) not in keys]
    else:
        if cfg.n_eval >= len(items):
            raise ValueError(f"data.n_eval={cfg.n_eval} leaves no training prompts: {cfg.source} has {len(items)} "
                             "distinct prompts; lower n_eval" + (" or widen a_range/b_range" if
                                                                 cfg.source == "arithmetic" else ""))
        held, train = items[:cfg.n_eval], items[cfg.n_eval:]
    if cfg.n_train:
        if cfg.n_train > len(train):
            raise ValueError(f"data.n_train={cfg.n_train} but only {len(train)} training prompts remain after "
                             f"holding out {len(held)}; lower n_train (0: all)")
        train = train[:cfg.n_train]
    if not train:
        raise ValueError(f"{cfg.source}: no training prompts left after removing the held-out ones")
    return train, held


# ----------------------------------------------------------------------------------------------- rewards
@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["exact_answer"])  # see REWARD_FUNCTIONS
    weights: list[float] = field(default_factory=list)  # one per function (TRL's reward_weights); []: all 1
    extract: str = "auto"  # exact_answer: auto | boxed | tag | answer | last_number
    format_pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>"  # format: the whole reply must match
    lexicon_positive: list[str] = field(default_factory=list)  # lexicon_sentiment: [] = the built-in lexicon
    lexicon_negative: list[str] = field(default_factory=list)
    lexicon_scale: str = "ratio"  # ratio | tanh
    max_chars: int = 512  # length_penalty (DAPO's soft overlong punishment)
    soft_chars: int = 128
    model: str | None = None  # "model": a reward model checkpoint (e.g. an align.rm run's final/)
    model_input: str = "auto"  # auto | text | ids (see build_reward)
    missing_eos_penalty: float = 0.0  # subtracted from completions cut off at max_tokens (TRL's PPO option)

    def validate(self) -> None:
        for name in self.functions:
            if name not in REWARD_FUNCTIONS:
                close = difflib.get_close_matches(name, REWARD_FUNCTIONS, n=1) or \
                    [f for f in REWARD_FUNCTIONS if f.startswith(name)][:1]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown reward function {name!r}{hint}; reward.functions takes "
                                 f"{', '.join(REWARD_FUNCTIONS)}")
        if not self.functions:
            raise ValueError(f"reward.functions is empty; name at least one of {', '.join(REWARD_FUNCTIONS)}")
        if self.weights and len(self.weights) != len(self.functions):
            raise ValueError(f"reward.weights has {len(self.weights)} values for {len(self.functions)} functions "
                             f"{self.functions}; give one weight per function (or [] for all 1.0)")
        if self.extract not in EXTRACTORS:
            raise ValueError(f"reward.extract={self.extract!r}: use one of {', '.join(EXTRACTORS)}")
        if "model" in self.functions and not self.model:
            raise ValueError("reward function 'model' needs reward.model=PATH (a reward model checkpoint)")
        if self.model_input not in ("auto", "text", "ids"):
            raise ValueError(f"reward.model_input={self.model_input!r}: use auto, text or ids")
        if self.lexicon_scale not in ("ratio", "tanh"):
            raise ValueError(f"reward.lexicon_scale={self.lexicon_scale!r}: use ratio or tanh")


def check_answers(reward: RewardConfig, items: list[dict], source: str) -> None:
    if "exact_answer" in reward.functions and any("answer" not in x for x in items):
        raise ValueError(f"reward function exact_answer needs reference answers, but the prompts of {source} have "
                         "no 'answer' column; use data.source=arithmetic, a .jsonl with an answer column "
                         "(data.answer_column), or another reward function")


class Scorer:
    """The configured reward functions, weighted and summed (TRL: Σ_i w_i·r_i, a None score counting 0).
    Called with the rows' prompts, completion texts, finish reasons, token ids and the items' columns;
    returns (total [N], {function name: scores [N]})."""

    def __init__(self, cfg: RewardConfig, policy_tokenizer, device="cpu"):
        from . import reward as R

        self.cfg, self.fns = cfg, []
        weights = cfg.weights or [1.0] * len(cfg.functions)
        for name, w in zip(cfg.functions, weights):
            if name == "exact_answer":
                fn = R.exact_answer_reward(extract=cfg.extract)
            elif name == "format":
                fn = R.format_reward(cfg.format_pattern)
            elif name == "lexicon_sentiment":
                kw = {k: frozenset(w.lower() for w in v) for k, v in
                      (("positive", cfg.lexicon_positive), ("negative", cfg.lexicon_negative)) if v}
                fn = R.lexicon_sentiment_reward(scale=cfg.lexicon_scale, **kw)
            elif name == "length_penalty":
                fn = R.length_penalty(cfg.max_chars, soft=cfg.soft_chars)
            else:
                fn = self._model_reward(cfg, policy_tokenizer, device)
            self.fns.append((name, fn, float(w)))

    @staticmethod
    def _model_reward(cfg: RewardConfig, policy_tokenizer, device):
        """A reward model as a function. "text": ModelReward renders prompt + completion and re-tokenizes with the
        reward model's tokenizer (any tokenizer works). "ids": the policy's own token ids (prompt with its chat
        template + completion, as sampled) go to the reward model unchanged: exact and cheaper, but only valid
        when both tokenizers map ids to the same tokens, which check_same_tokenizer verifies (a mismatch would
        score other tokens than the policy wrote). "auto": ids when the check passes, else text."""
        from .reward import ModelReward, RewardModel, _run_batched, check_same_tokenizer

        rm, rm_tok = RewardModel.load(cfg.model, device=device)
        mode = cfg.model_input
        if rm_tok is None:
            if mode == "text":
                raise ValueError(f"{cfg.model} has no tokenizer; reward.model_input=text needs one (save the reward "
                                 "model with its tokenizer)")
            mode = "ids"  # nothing to check against: the reward model must share the policy's tokenizer
        elif mode == "auto":
            try:
                check_same_tokenizer(policy_tokenizer, rm_tok)
                mode = "ids"
            except ValueError:
                mode = "text"
        elif mode == "ids":
            check_same_tokenizer(policy_tokenizer, rm_tok)
        if mode == "text":
            return ModelReward(rm, rm_tok)

        def model_reward(prompts, completions, *, prompt_ids, completion_ids, **kwargs):
            rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
            return _run_batched(rm, rm, rows, 16, rm.cfg.max_seq_len).tolist()

        return model_reward

    def __call__(self, prompts: list, texts: list[str], *, finish_reasons: list[str], prompt_ids: list,
                 completion_ids: list, cols: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros(len(texts), dtype=torch.float32)
        parts = {}
        for name, fn, w in self.fns:
            scores = fn(prompts, texts, prompt_ids=prompt_ids, completion_ids=completion_ids, **cols)
            s = torch.tensor([math.nan if x is None else float(x) for x in scores], dtype=torch.float32)
            parts[name] = s
            total += w * torch.nan_to_num(s, nan=0.0)
        if self.cfg.missing_eos_penalty:
            total -= self.cfg.missing_eos_penalty * torch.tensor([r == "length" for r in finish_reasons]).float()
        return total, parts


# ----------------------------------------------------------------------------------------------- sampling
class PromptSampler:
    """Batches of training-prompt indices: epochs over the prompts, each in a new seeded order (TRL's
    RepeatSampler order, without repeats: the group's copies come from sampling n completions). Its state is
    two integers, so a resumed run draws exactly the prompts it would have drawn."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError("no training prompts to sample from")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = order[self.pos:self.pos + k - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"the checkpoint's prompt sampler had {state['n']} training prompts, this run has "
                             f"{self.n}; resume with the data settings the run used")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def columns(items: list[dict], repeat: int = 1) -> dict[str, list]:
    """The items' columns other than prompt, each value repeated `repeat` times (one per completion): the
    keyword arguments reward functions receive."""
    keys = [k for k in items[0] if k != "prompt"] if items else []
    return {k: [item.get(k) for item in items for _ in range(repeat)] for k in keys}


__all__ = ["NAMED_SOURCES", "OPS", "REWARD_FUNCTIONS", "PromptData", "PromptSampler", "RewardConfig", "Scorer",
           "check_answers", "arithmetic_problems", "columns", "load_prompts",
           "named_prompts", "prompt_key", "read_prompts"]
