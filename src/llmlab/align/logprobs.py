"""Log-probabilities of tokens under a causal LM: the one utility that DPO, PPO, GRPO, reward evaluation and
the evaluation harness share.

    logp_t = log softmax(z_{t-1} / τ)[x_t],   z_{t-1} = head(h_{t-1}) the logits at the previous position
    H_t    = -Σ_v p_v log p_v  (the entropy of that same distribution, PPO/GRPO log it)

The [B, T, vocab] logits are never held at once: the model runs with return_logits=False, the hidden states
of the scored positions are gathered ([N, dim], N = tokens that count), and the head is applied a chunk of
rows at a time (logsumexp and gather per chunk). For training, each chunk runs under activation
checkpointing, so backward recomputes one chunk's logits at a time instead of keeping them all.

Padding: either side works. Our Transformer numbers positions by the attention mask (real tokens count
0, 1, ...), so a left-padded row gets the logits it gets alone; right padding never reaches real tokens of a
causal model. A token counts only if it and its predecessor are real (the first real token has no context).

Models: our Transformer, or any nn.Module called like it, model(input_ids, attention_mask,
return_logits=False) -> an output with hidden_states [B, T, dim] lined up with input_ids (PEFT wrappers such
as PromptTuning return the real positions only, and LoRA patches the model in place). The LM head is found on
the model or on a wrapped `.model`; a module without one is called as model(input_ids, attention_mask) and
its logits are reduced in the same chunks (left padding is then exact only if that module, like ours, takes
positions from the mask).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

REDUCTIONS = ("sum", "mean", "none")


# ------------------------------------------------------------------------------------------------ helpers
@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout) for scoring, put back in the mode it was in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _find_lm(model: nn.Module):
    """(head, cfg) of the causal LM inside model (through wrappers' .model / .base_model), or (None, cfg)."""
    m, cfg = model, None
    for _ in range(4):
        cfg = cfg or getattr(m, "cfg", None)
        head = getattr(m, "head", None)
        if isinstance(head, nn.Module) and getattr(getattr(m, "cfg", None), "head", None) == "lm":
            return head, m.cfg
        m = getattr(m, "model", None) or getattr(m, "base_model", None)
        if not isinstance(m, nn.Module):
            break
    return None, cfg


def _check_mask(name: str, mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} (like input_ids), got {got}")
    return mask.bool()


def _check_contiguous(mask: torch.Tensor) -> None:
    """Each row's real tokens must be one run (padding on the left and/or right, never inside): a pad inside
    would sit between a token and its context."""
    n = mask.sum(dim=1)
    idx = torch.arange(mask.shape[1], device=mask.device)
    first = torch.where(mask, idx, mask.shape[1]).amin(dim=1)
    last = torch.where(mask, idx, -1).amax(dim=1)
    bad = (n > 0) & (last - first + 1 != n)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens; pad on the left or right only")


def target_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                completion_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which of input_ids[:, 1:] are scored, bool [B, T-1]: the token and its predecessor are real (and the
    token is in completion_mask, when given)."""
    B, T = input_ids.shape
    valid = torch.ones(B, max(T - 1, 0), dtype=torch.bool, device=input_ids.device)
    attention_mask = _check_mask("attention_mask", attention_mask, (B, T))
    completion_mask = _check_mask("completion_mask", completion_mask, (B, T))
    if attention_mask is not None:
        _check_contiguous(attention_mask)
        valid &= attention_mask[:, 1:] & attention_mask[:, :-1]
    if completion_mask is not None:
        valid &= completion_mask[:, 1:]
    return valid


def _chunk_stats(head, h: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    """log p(target) and (optionally) the entropy for rows h [n, dim] (or logits [n, V] when head is None)."""
    z = (h if head is None else head(h)).float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None])[:, 0] - lse
    if not entropy:
        return logp, torch.zeros_like(logp)
    p = torch.exp(z - lse[:, None])
    return logp, lse - (p * z).sum(dim=-1)


def _rows_stats(head, rows: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool,
                chunk_size: int | None):
    vocab = rows.shape[-1] if head is None else getattr(getattr(head, "proj", None), "out_features", 32768)
    chunk = chunk_size or max(16, 2**22 // vocab)  # one chunk of float32 logits ≈ 16 MB, as linear_cross_entropy
    params = [] if head is None else [p for p in head.parameters() if p.requires_grad]
    recompute = torch.is_grad_enabled() and (rows.requires_grad or bool(params))
    out_lp, out_h = [], []
    for start in range(0, rows.shape[0], chunk):
        args = (head, rows[start:start + chunk], targets[start:start + chunk], temperature, entropy)
        lp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False) if recompute else _chunk_stats(*args)
        out_lp.append(lp)
        out_h.append(ent)
    if not out_lp:
        empty = rows.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(out_lp), torch.cat(out_h)


# --------------------------------------------------------------------------------------------- public
def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   completion_mask: torch.Tensor | None = None, temperature: float = 1.0,
                   return_entropy: bool = False, chunk_size: int | None = None):
    """log p(x_t | x_<t) for t ≥ 1: float32 [B, T-1], lined up with input_ids[:, 1:]; 0 where a token does
    not count (see target_mask: padding, the first real token, tokens outside completion_mask [B, T]).

    Differentiable; the caller chooses train/eval mode (dropout) and torch.no_grad. temperature divides the
    logits (τ of the sampler whose probabilities are wanted). chunk_size: rows per head call (default: about
    4M logits per chunk). return_entropy=True returns (logprobs, entropy), both [B, T-1]."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq] tensor of token ids")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    B, T = input_ids.shape
    valid = target_mask(input_ids, attention_mask, completion_mask)
    head, cfg = _find_lm(model)
    if cfg is not None and not getattr(cfg, "is_causal", True):
        raise ValueError(f"log p(x_t | x_<t) needs a causal model; this one is kind={cfg.kind!r}")
    # no LM head to reach: run the module plainly (logits) and reduce its logits in the same chunks
    out = model(input_ids, attention_mask) if head is None else model(input_ids, attention_mask, return_logits=False)
    if head is None:
        states = getattr(out, "logits", out if isinstance(out, torch.Tensor) else None)
        if states is None or states.dim() != 3:
            raise ValueError(f"{type(model).__name__} returned no [batch, seq, vocab] logits")
    else:
        states = out.hidden_states
    if states.shape[:2] != (B, T):
        raise ValueError(f"{type(model).__name__} returned outputs of shape {tuple(states.shape)}; expected "
                         f"[{B}, {T}, ...] lined up with input_ids (a prompt wrapper must return the real "
                         "positions only)")
    rows = states[:, :-1][valid]  # [N, dim]: only the positions that predict a scored token
    targets = input_ids[:, 1:][valid].long()
    lp, ent = _rows_stats(head, rows, targets, float(temperature), return_entropy, chunk_size)
    logp = torch.zeros(B, max(T - 1, 0), dtype=torch.float32, device=input_ids.device).masked_scatter(valid, lp)
    if not return_entropy:
        return logp
    return logp, torch.zeros_like(logp).masked_scatter(valid, ent)


@dataclass
class SequenceLogprobs:
    """Completion log-probs of a batch. per_token/mask are [B, C], lined up with each completion (column j is
    completion token j; C = the longest completion); sum/mean/n_tokens are [B]; value is the requested
    reduction (sum or mean [B], or per_token for "none")."""

    sum: torch.Tensor
    mean: torch.Tensor
    n_tokens: torch.Tensor
    per_token: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None  # [B, C] when asked for
    reduce: str = "sum"

    @property
    def value(self) -> torch.Tensor:
        return {"sum": self.sum, "mean": self.mean, "none": self.per_token}[self.reduce]


def _as_ids(seq, what: str, i: int, vocab: int | None) -> list[int]:
    if hasattr(seq, "tolist"):  # tensors, numpy arrays
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
        raise ValueError(f"{what}[{i}] must be a list of int token ids, got {type(seq).__name__}")
    if not seq:
        hint = "the first completion token needs a context (e.g. a BOS token)" if what == "prompts" else \
            "there is nothing to score"
        raise ValueError(f"{what}[{i}] is empty: {hint}")
    bad = [t for t in seq if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise ValueError(f"{what}[{i}] has token id {bad[0]} outside [0, {vocab}) (the model's vocab_size)")
    return list(seq)


def sequence_logprobs(model: nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      *, pad_id: int, reduce: str = "sum", temperature: float = 1.0, return_entropy: bool = False,
                      batch_size: int | None = None, chunk_size: int | None = None) -> SequenceLogprobs:
    """log p(completion | prompt) for lists of token ids (prompt i goes with completion i).

    Each batch row is [left padding, prompt, completion, right padding]: prompts end and completions start
    at the same column (the layout generation produces), so per-token results are a plain slice. batch_size
    splits the examples into micro-batches (same results, less memory). Raises ValueError naming the index
    of a bad example: different list lengths, an empty prompt or completion, ids outside the vocabulary."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must pair up: got {len(prompts)} prompts and "
                         f"{len(completions)} completions")
    if not len(prompts):
        raise ValueError("no examples: prompts and completions are empty")
    _, cfg = _find_lm(model)
    vocab = getattr(cfg, "vocab_size", None)
    ps = [_as_ids(p, "prompts", i, vocab) for i, p in enumerate(prompts)]
    cs = [_as_ids(c, "completions", i, vocab) for i, c in enumerate(completions)]
    device = next(model.parameters()).device
    C = max(len(c) for c in cs)
    step = batch_size or len(ps)
    parts = []
    for s in range(0, len(ps), step):
        lp, ent, mask = _batch(model, ps[s:s + step], cs[s:s + step], int(pad_id), device, temperature,
                               return_entropy, chunk_size)
        pad = C - lp.shape[1]  # micro-batches have their own longest completion
        parts.append((torch.nn.functional.pad(lp, (0, pad)), None if ent is None else
                      torch.nn.functional.pad(ent, (0, pad)), torch.nn.functional.pad(mask, (0, pad))))
    per_token = torch.cat([p[0] for p in parts])
    mask = torch.cat([p[2] for p in parts])
    entropy = torch.cat([p[1] for p in parts]) if return_entropy else None
    n = mask.sum(dim=1)
    total = per_token.sum(dim=1)
    return SequenceLogprobs(total, total / n, n, per_token, mask, entropy, reduce)


def _batch(model, ps, cs, pad_id, device, temperature, return_entropy, chunk_size):
    P, C = max(len(p) for p in ps), max(len(c) for c in cs)
    ids = torch.full((len(ps), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros(len(ps), P + C, dtype=torch.bool)
    comp = torch.zeros_like(attn)
    for i, (p, c) in enumerate(zip(ps, cs)):
        ids[i, P - len(p):P], ids[i, P:P + len(c)] = torch.tensor(p), torch.tensor(c)
        attn[i, P - len(p):P + len(c)] = True
        comp[i, P:P + len(c)] = True
    ids, attn, comp = ids.to(device), attn.to(device), comp.to(device)
    out = token_logprobs(model, ids, attn.long(), completion_mask=comp, temperature=temperature,
                         return_entropy=return_entropy, chunk_size=chunk_size)
    lp, ent = out if return_entropy else (out, None)
    # target column t-1 scores token t: completion token j (column P + j) is at P - 1 + j
    cut = slice(P - 1, P - 1 + C)
    return lp[:, cut], None if ent is None else ent[:, cut], comp[:, P:]


__all__ = ["SequenceLogprobs", "sequence_logprobs", "target_mask", "token_logprobs"]
