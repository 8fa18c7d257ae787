"""Multiple-choice scoring exactly as lm-evaluation-harness (0.4.x, HFLM, causal models) does it.

Requests: per item, one (context, target_delimiter + choice) pair per choice (tasks.py builds them).

Tokenization (lm-eval's LM._encode_pair and LM.loglikelihood):
- trailing whitespace of the context moves to the front of the continuation: ("Answer: ", "Paris") is
  scored as ("Answer:", " Paris"), so the space stays with the word as a tokenizer pre-splits it;
- the pair is encoded jointly, whole = encode(context + continuation), ctx = encode(context), and the
  continuation is whole[len(ctx):] (so a merge across the boundary goes to the continuation);
- encode adds the tokenizer's special tokens (its post-processor, e.g. a Llama BOS), except for a string that
  already starts with the prefix token's text;
- an empty context becomes [prefix token] (BOS, else EOS), the continuation encoded without specials (when
  the continuation itself starts with that token, its first token is the context instead);
- longer than max_length + 1 tokens: the context is cut from the left (lm-eval's (ctx + cont)[-(L+1):]).

Scores: ll_i = Σ log p(continuation_i tokens | context) from THE log-prob utility (sequence_logprobs, sum),
    acc       = [argmax_i ll_i == gold]
    acc_norm  = [argmax_i ll_i / len(choice_i) == gold]          characters of the choice, no delimiter
    acc_bytes = [argmax_i ll_i / len(utf8(choice_i)) == gold]    UTF-8 bytes of the choice, no delimiter
argmax takes the first maximum (numpy's); each metric's stderr is lm-eval's mean_stderr, the sample standard
deviation (n - 1) over √n, None below two items ("N/A" in lm-eval).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..align.logprobs import eval_mode, sequence_logprobs
from ..progress import Bar
from .tasks import MultipleChoiceTask, load_task

METRICS = ("acc", "acc_norm", "acc_bytes")


# ------------------------------------------------------------------------------------------- tokenization
def prefix_token_id(tokenizer) -> int | None:
    """lm-eval's HFLM.prefix_token_id: the BOS token, else the EOS token (None when there is neither)."""
    for name in ("bos_token", "eos_token"):
        token = getattr(tokenizer, name, None)
        if token:
            return tokenizer.token_to_id(token)
    return None


def _tok_encode(tokenizer, text: str, prefix_text: str | None) -> list[int]:
    """HFLM.tok_encode: the tokenizer's special tokens unless the text already starts with the prefix token."""
    special = not (prefix_text and text.startswith(prefix_text))
    return tokenizer.encode(text, add_special_tokens=special)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM makes them (see the module docstring)."""
    if not continuation:
        raise ValueError(f"empty continuation after context {context[-40:]!r}: there is nothing to score")
    prefix = prefix_token_id(tokenizer)
    if context == "":
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither")
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix_text = tokenizer.decode([prefix]) if prefix is not None else None
    whole = _tok_encode(tokenizer, context + continuation, prefix_text)
    ctx = _tok_encode(tokenizer, context, prefix_text)
    if not ctx:
        raise ValueError(f"context {context!r} encodes to no tokens (only whitespace?): nothing to condition on")
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   max_length: int | None = None, progress: bool = True) -> list[float]:
    """log p(continuation | context) for each (context, continuation), lm-eval's loglikelihood request.
    Longest first in batches of batch_size (less padding); results in request order. max_length defaults to
    the model's max_seq_len (lm-eval: the HF config's max_position_embeddings)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
    limit = max_length or getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if limit is None:
        raise ValueError("max_length is required for a model without cfg.max_seq_len")
    prompts, conts = [], []
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"request {i}: continuation {continuation!r} adds no tokens after the context")
        if len(cont) > limit:
            raise ValueError(f"request {i}: the continuation has {len(cont)} tokens > max_length {limit}")
        prompts.append(ctx[-(limit + 1 - len(cont)):])  # lm-eval: (ctx + cont)[-(max_length + 1):]
        conts.append(cont)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(conts[i])))
    out = [0.0] * len(prompts)
    with eval_mode(model), Bar(len(order), "loglikelihood", enabled=progress) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            r = sequence_logprobs(model, [prompts[i] for i in idx], [conts[i] for i in idx], pad_id=0)
            for i, v in zip(idx, r.sum.tolist()):
                out[i] = v
            bar.update(len(idx))
    return out


# ------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class ItemScore:
    id: str
    source: str  # file:line
    context: str
    choices: list[str]
    gold: int
    loglikelihoods: list[float]  # one per choice, nats

    def _argmax(self, lengths) -> int:
        return int(np.argmax(np.asarray(self.loglikelihoods) / np.asarray(lengths, dtype=float)))

    @property
    def pred(self) -> int:
        return int(np.argmax(self.loglikelihoods))

    @property
    def pred_norm(self) -> int:
        return self._argmax([len(c) for c in self.choices])

    @property
    def pred_bytes(self) -> int:
        return self._argmax([len(c.encode("utf-8")) for c in self.choices])

    @property
    def acc(self) -> float:
        return float(self.pred == self.gold)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.gold)

    @property
    def acc_bytes(self) -> float:
        return float(self.pred_bytes == self.gold)


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's mean_stderr: sqrt(Σ(x - mean)² / (n - 1)) / sqrt(n); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


@dataclass(frozen=True)
class MultipleChoiceResult:
    task: str
    n: int
    acc: float
    acc_norm: float
    acc_bytes: float
    acc_stderr: float | None
    acc_norm_stderr: float | None
    acc_bytes_stderr: float | None
    items: list[ItemScore]

    def metrics(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "items"}

    def to_dict(self) -> dict:
        return {**self.metrics(), "items": [{**asdict(s), "pred": s.pred, "pred_norm": s.pred_norm,
                                             "pred_bytes": s.pred_bytes} for s in self.items]}


def evaluate_multiple_choice(model: nn.Module, tokenizer, task: MultipleChoiceTask | str | os.PathLike, *,
                             limit: int | float | None = None, batch_size: int = 8, max_length: int | None = None,
                             progress: bool = True, **task_options) -> MultipleChoiceResult:
    """Score a task (a MultipleChoiceTask, a built-in name, a .jsonl or an lm-eval .yaml; task_options go to
    load_task) as lm-eval does: per-choice log-likelihoods, acc, acc_norm, acc_bytes and their stderr.
    limit: the first n items (a float < 1: that fraction, rounded up), as lm-eval's --limit."""
    if isinstance(task, MultipleChoiceTask) and task_options:
        raise ValueError(f"options {sorted(task_options)} only apply when the task is loaded by name or path")
    task = load_task(task, **task_options)
    items = task.select(limit)
    requests = [r for item in items for r in item.requests(task.target_delimiter)]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                         progress=progress)
    scores, at = [], 0
    for item in items:
        k = len(item.choices)
        scores.append(ItemScore(item.id, item.source, item.context, item.choices, item.gold, lls[at:at + k]))
        at += k
    values = {m: [getattr(s, m) for s in scores] for m in METRICS}
    return MultipleChoiceResult(
        task=task.name, n=len(scores), items=scores,
        **{m: sum(v) / len(v) for m, v in values.items()},
        **{f"{m}_stderr": mean_stderr(v) for m, v in values.items()})


__all__ = ["ItemScore", "MultipleChoiceResult", "encode_pair", "evaluate_multiple_choice", "loglikelihoods",
           "mean_stderr", "prefix_token_id"]
