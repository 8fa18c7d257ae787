"""Perplexity and bits per byte of a causal LM on a text, with Hugging Face's sliding-window protocol
("Perplexity of fixed-length models"):

    windows start at 0, stride, 2·stride, ...; window w holds tokens [b_w, e_w), e_w = min(b_w + max_length, N)
    window w scores the tokens it adds, [e_{w-1}, e_w) (e_{-1} = 0), each given everything before it in the
    window; the first token of a window has no context, so the first window scores tokens 1 .. e_0 - 1
    NLL = -Σ_scored log p(x_t | x_[b_w, t)),   ppl = exp(NLL / tokens_scored),   bpb = NLL / (ln 2 · bytes)

stride = max_length cuts the text into disjoint windows (cheapest; every window restarts without context and
its first token is not scored); stride < max_length gives every token after the first window at least
max_length - stride tokens of context, at about (max_length / stride)× the compute. Windows stop once one
reaches the end of the text, as in the HF recipe. bytes are the UTF-8 bytes of the whole text (the usual, tokenizer-independent
denominator), whatever number of tokens the protocol scores.

BOS: the text is encoded without special tokens. bos=True (the tokenizer's BOS) or bos=<id> puts one BOS
in front of the whole token stream, so the first text token is scored too (every text token is scored when
stride < max_length); later windows do not get a BOS of their own. GPT-2 style evaluation uses bos=False.

The total is the exact sum of the scored tokens' NLL. (The HF recipe weights each window's mean loss by
"valid labels - 1"; after the first window the first label is already -100, so that weight is one token short
and its ppl drifts slightly from the exact value for stride < max_length.)

Windows go through THE log-prob utility (align.logprobs.token_logprobs) in batches of batch_size, shorter
last windows right-padded; the NLL is summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..align.logprobs import eval_mode, token_logprobs
from ..progress import Bar


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go into the model; tokens [score_from, end) are scored (score_from ≥ begin + 1)."""

    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return max(0, self.end - self.score_from)


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # total negative log-likelihood, nats
    tokens: int  # tokens scored
    ppl: float  # exp(nll / tokens)
    bits_per_byte: float  # nll / (ln 2 · bytes); nan without a text
    bytes: int  # UTF-8 bytes of the text (0 when scoring ids)
    n_tokens: int  # tokens in the stream (BOS included)
    windows: int  # model calls' rows (windows that score at least one token)
    max_length: int
    stride: int

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    def to_dict(self) -> dict:
        return asdict(self)


def _check_int(name: str, value, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int ≥ {low}, got {value!r}")
    return value


def sliding_windows(n_tokens: int, max_length: int, stride: int | None = None) -> list[Window]:
    """The HF protocol's windows over n_tokens tokens (see the module docstring); stride defaults to max_length.
    Raises ValueError when stride > max_length (the tokens between windows would never be scored)."""
    _check_int("max_length", max_length, 2)
    stride = max_length if stride is None else _check_int("stride", stride, 1)
    if stride > max_length:
        raise ValueError(f"stride ({stride}) > max_length ({max_length}) would skip the tokens between windows; "
                         "use stride ≤ max_length (stride = max_length: disjoint windows)")
    out, prev_end = [], 0
    for begin in range(0, _check_int("n_tokens", n_tokens, 0), stride):
        end = min(begin + max_length, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))  # score only the new tokens; never the first
        prev_end = end
        if end == n_tokens:
            break
    return out


def _max_length(model: nn.Module, max_length: int | None) -> int:
    if max_length is None:
        max_length = getattr(getattr(model, "cfg", None), "max_seq_len", None)
        if max_length is None:
            raise ValueError("max_length is required for a model without cfg.max_seq_len")
    return max_length


@torch.no_grad()
def sequence_nll(model: nn.Module, ids: Sequence[int], *, max_length: int | None = None, stride: int | None = None,
                 batch_size: int = 8, progress: bool = True) -> tuple[float, int, int]:
    """(NLL in nats, tokens scored, windows run) of a token stream under the sliding-window protocol.
    max_length defaults to the model's max_seq_len."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed to score one given the other "
                         "(or pass bos=True to score the first token after a BOS)")
    max_length = _max_length(model, max_length)
    _check_int("batch_size", batch_size, 1)
    windows = [w for w in sliding_windows(len(ids), max_length, stride) if w.n_scored > 0]
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with eval_mode(model), Bar(len(windows), "perplexity", enabled=progress) as bar:
        for s in range(0, len(windows), batch_size):
            group = windows[s:s + batch_size]
            width = max(w.end - w.begin for w in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            attn = torch.zeros(len(group), width, dtype=torch.long)
            scored = torch.zeros(len(group), width, dtype=torch.bool)
            for i, w in enumerate(group):  # right padding: never reaches real tokens of a causal model
                x[i, :w.end - w.begin] = torch.tensor(ids[w.begin:w.end])
                attn[i, :w.end - w.begin] = 1
                scored[i, w.score_from - w.begin:w.end - w.begin] = True
            lp = token_logprobs(model, x.to(device), attn.to(device), completion_mask=scored.to(device))
            nll -= float(lp.double().sum())
            count += int(scored[:, 1:].sum())
            bar.update(len(group))
    return nll, count, len(windows)


def _bos_id(tokenizer, bos) -> list[int]:
    if bos is False or bos is None:
        return []
    if bos is True:
        token = getattr(tokenizer, "bos_token", None)
        i = tokenizer.token_to_id(token) if token else None
        if i is None:
            raise ValueError("bos=True but the tokenizer has no bos_token; pass bos=<token id> (e.g. the "
                             "<|endoftext|> id for GPT-2 style models) or bos=False")
        return [i]
    return [_check_int("bos", bos, 0)]


def perplexity(model: nn.Module, tokenizer, text: str, *, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, bos: bool | int = False, progress: bool = True) -> PerplexityResult:
    """Perplexity and bits per byte of `text` (see the module docstring for the protocol). max_length defaults
    to the model's max_seq_len, stride to max_length. Raises ValueError on an empty text, stride > max_length,
    or a text too short to score a token."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__} (join documents yourself, e.g. "
                         "'\\n\\n'.join(docs) as in the HF recipe)")
    if not text:
        raise ValueError("text is empty: there is nothing to score")
    max_length = _max_length(model, max_length)
    sliding_windows(0, max_length, stride)  # bad windows fail before a long text is tokenized
    ids = _bos_id(tokenizer, bos) + tokenizer.encode(text, add_special_tokens=False)
    nll, count, windows = sequence_nll(model, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                                       progress=progress)
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(nll=nll, tokens=count, ppl=math.exp(nll / count),
                            bits_per_byte=nll / (math.log(2) * n_bytes), bytes=n_bytes, n_tokens=len(ids),
                            windows=windows, max_length=max_length, stride=stride or max_length)


__all__ = ["PerplexityResult", "Window", "perplexity", "sequence_nll", "sliding_windows"]
