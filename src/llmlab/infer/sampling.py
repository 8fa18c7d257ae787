"""The sampler: logits of one decoding step -> processed logits -> one token per sequence (plus logprobs).

Processing runs in transformers' order: logit bias, repetition penalty, no-repeat n-grams, min_tokens, the
OpenAI frequency/presence penalties, then the warpers temperature, top-k, top-p, min-p. Each processor is a
function over float32 [B, V] logits with per-row parameters, applied once to the whole batch; process_logits
skips those no row uses, so an all-greedy batch without penalties costs one float cast and one argmax.
Masked entries become -inf (transformers' filter_value). Logprobs come from the raw logits, before any
processing, as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .params import Logprob, SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplerRow:
    """What the sampler must know about one sequence in the batch."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]  # generated so far
    generator: torch.Generator | None = None  # per-request RNG (seeded when params.seed is set); None: global


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]  # per row; None where params.logprobs is None


# ---------------------------------------------------------------------------------------------- processors


def _padded(lists: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Token lists -> LongTensor [B, max(len, 1)] padded with `pad` (ids >= pad are clamped onto it, as
    transformers does for ids the output layer cannot produce)."""
    width = max(1, max((len(t) for t in lists), default=0))
    out = torch.full((len(lists), width), pad, dtype=torch.long)
    for i, tokens in enumerate(lists):
        if len(tokens):
            out[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    if (out < 0).any():
        raise ValueError("token ids must be >= 0")
    return out.clamp_(max=pad).to(device)


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float]]) -> torch.Tensor:
    """logit[i, j] += biases[i][j] (the OpenAI logit_bias)."""
    vocab = logits.shape[1]
    index = [(i, t, b) for i, bias in enumerate(biases) for t, b in bias.items()]
    if not index:
        return logits
    if bad := [t for _, t, _ in index if not 0 <= t < vocab]:
        raise ValueError(f"logit_bias token ids {bad[:5]} lie outside the vocabulary [0, {vocab})")
    r, t, b = zip(*index)
    at = (torch.tensor(r, device=logits.device), torch.tensor(t, device=logits.device))
    return logits.index_put(at, torch.tensor(b, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_repetition_penalty(
    logits: torch.Tensor, token_lists: Sequence[Sequence[int]], penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) as transformers' RepetitionPenaltyLogitsProcessor
    applies it: for every token seen (each once), logit < 0 -> logit · r, else logit / r."""
    vocab = logits.shape[1]
    ids = _padded(token_lists, vocab, logits.device)  # the pad column V absorbs padding
    scores = torch.nn.functional.pad(logits, (0, 1))
    seen = scores.gather(1, ids)
    r = penalty.to(logits)[:, None]
    return scores.scatter(1, ids, torch.where(seen < 0, seen * r, seen / r))[:, :vocab]


def apply_no_repeat_ngram(
    logits: torch.Tensor, sequences: Sequence[Sequence[int]], n_list: Sequence[int]
) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor (from fairseq): ban every token that would complete an
    n-gram already present in the sequence (prompt included). For n = 1 every seen token is banned."""
    vocab = logits.shape[1]
    rows, banned = [], []
    for i, (seq, n) in enumerate(zip(sequences, n_list)):
        if n <= 0 or len(seq) < n:
            continue
        ids = torch.as_tensor(seq, dtype=torch.long, device=logits.device)
        windows = ids.unfold(0, n, 1)  # [L - n + 1, n]: every n-gram so far
        prefix = ids[len(seq) + 1 - n :]  # the last n - 1 tokens: the n-gram the next token would complete
        hits = windows[(windows[:, :-1] == prefix).all(dim=1), -1]
        hits = hits[hits < vocab]
        rows.append(torch.full_like(hits, i))
        banned.append(hits)
    if not rows:
        return logits
    return logits.index_put((torch.cat(rows), torch.cat(banned)), torch.tensor(NEG_INF, device=logits.device))


def apply_frequency_presence(
    logits: torch.Tensor, output_lists: Sequence[Sequence[int]], freq: torch.Tensor, pres: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties over the output tokens only: mu[j] -= c[j] · frequency + [c[j] > 0] · presence,
    c[j] = how often token j has been generated (platform.openai.com/docs, "Frequency and presence")."""
    vocab = logits.shape[1]
    ids = _padded(output_lists, vocab, logits.device)
    counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
    counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :vocab]
    return logits - counts * freq.to(logits)[:, None] - (counts > 0).to(logits) * pres.to(logits)[:, None]


def apply_temperature(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """logits / T: T < 1 sharpens, T > 1 flattens (TemperatureLogitsWarper)."""
    return logits / t.to(logits)[:, None]


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row, ties with the k-th included (TopKLogitsWarper); k = 0: off."""
    vocab = logits.shape[1]
    k = k.to(device=logits.device, dtype=torch.long)
    kmax = int(k.clamp(max=vocab).max())
    if kmax <= 0:
        return logits
    kth = logits.topk(kmax, dim=1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
    kth = kth.masked_fill((k <= 0)[:, None], NEG_INF)
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020) exactly as TopPLogitsWarper with min_tokens_to_keep=1: sort
    ascending, drop the tokens whose cumulative probability is <= 1 - p, always keep the most likely one.
    Which of several tied tokens at the boundary survives is decided by the order torch.sort leaves ties
    in, so the call is transformers' own (default, unstable sort). With p = 1 only tokens whose probability
    is exactly 0 are dropped, which changes no distribution."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)
    # 1 - p in float64 then rounded, as transformers computes the Python float before comparing
    threshold = (1 - p.to(device=logits.device, dtype=torch.float64)).to(cumulative.dtype)[:, None]
    remove = cumulative <= threshold
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def apply_min_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024) as MinPLogitsWarper: drop tokens with prob < p · max prob."""
    probs = logits.softmax(dim=1)
    remove = probs < p.to(probs)[:, None] * probs.amax(dim=1, keepdim=True)
    remove.scatter_(1, probs.argmax(dim=1, keepdim=True), False)  # the most likely token always stays
    return logits.masked_fill(remove, NEG_INF)


# ---------------------------------------------------------------------------------------------- the step


def _check(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D tensor [batch, vocab]; got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got {logits.dtype}")
    if len(rows) != logits.shape[0]:
        raise ValueError(f"got {len(rows)} sampler rows for a batch of {logits.shape[0]} logits rows")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")


def process_logits(
    logits: torch.Tensor, rows: Sequence[SamplerRow], eos_token_ids: Sequence[int] = ()
) -> torch.Tensor:
    """float32 [B, V] logits after every processor the rows ask for, in transformers' order. Greedy rows skip
    the warpers (they never move the argmax). When nothing applies the result may be `logits` itself."""
    _check(logits, rows)
    out = logits.float()
    params = [r.params for r in rows]
    dev = out.device

    def per_row(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=dev)

    if any(p.logit_bias for p in params):
        out = apply_logit_bias(out, [p.logit_bias for p in params])
    needs_history = [p.repetition_penalty != 1 or p.no_repeat_ngram_size > 0 for p in params]
    if any(needs_history):
        history = [list(r.prompt_ids) + list(r.output_ids) if h else [] for r, h in zip(rows, needs_history)]
        if any(p.repetition_penalty != 1 for p in params):
            out = apply_repetition_penalty(out, history, per_row([p.repetition_penalty for p in params]))
        if any(p.no_repeat_ngram_size > 0 for p in params):
            out = apply_no_repeat_ngram(out, history, [p.no_repeat_ngram_size for p in params])
    # min_tokens: the sequence may not end before min_tokens new tokens (MinNewTokensLengthLogitsProcessor).
    # ignore_eos does not mask EOS: it only tells the engine not to stop on it.
    early = [(i, list(eos_token_ids) + p.stop_token_ids) for i, (r, p) in enumerate(zip(rows, params))
             if len(r.output_ids) < p.min_tokens]
    if banned := [(i, t) for i, ids in early for t in ids if 0 <= t < out.shape[1]]:
        at = per_row(banned, torch.long).T
        out = out.index_put((at[0], at[1]), torch.tensor(NEG_INF, device=dev))
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        outputs = [r.output_ids if p.frequency_penalty or p.presence_penalty else [] for r, p in zip(rows, params)]
        freq, pres = per_row([p.frequency_penalty for p in params]), per_row([p.presence_penalty for p in params])
        out = apply_frequency_presence(out, outputs, freq, pres)

    # Warpers: greedy rows get neutral values (T = 1, top-k off, top-p 1 is skipped below, min-p 0).
    sampled = [p for p in params if not p.greedy]
    if any(p.temperature != 1 for p in sampled):
        out = apply_temperature(out, per_row([1.0 if p.greedy else p.temperature for p in params]))
    if any(p.top_k > 0 for p in sampled):
        out = apply_top_k(out, per_row([0 if p.greedy else p.top_k for p in params], torch.long))
    if any(p.top_p < 1 for p in sampled):
        out = apply_top_p(out, per_row([1.0 if p.greedy else p.top_p for p in params], torch.float64))
    if any(p.min_p > 0 for p in sampled):
        out = apply_min_p(out, per_row([0.0 if p.greedy else p.min_p for p in params]))
    return out


def _logprobs(raw: torch.Tensor, chosen: torch.Tensor, ks: Sequence[int | None]) -> list[Logprob | None]:
    """Logprob of each row's chosen token and its top-k alternatives under log_softmax(raw)."""
    want = [i for i, k in enumerate(ks) if k is not None]
    result: list[Logprob | None] = [None] * len(ks)
    if not want:
        return result
    index = torch.tensor(want, device=raw.device)
    lp = raw[index].float().log_softmax(dim=1)
    kmax = min(max(ks[i] for i in want), lp.shape[1])  # type: ignore[type-var]
    top_v, top_i = lp.topk(kmax, dim=1)
    chosen_lp = lp.gather(1, chosen[index][:, None])[:, 0].tolist()
    top_v, top_i, chosen_ids = top_v.tolist(), top_i.tolist(), chosen[index].tolist()
    for j, i in enumerate(want):
        k = ks[i]
        result[i] = Logprob(chosen_ids[j], chosen_lp[j], dict(zip(top_i[j][:k], top_v[j][:k])))
    return result


def sample(logits: torch.Tensor, rows: Sequence[SamplerRow], eos_token_ids: Sequence[int] = ()) -> SampleOutput:
    """One token per row: greedy rows take the argmax of the processed logits (ties -> lowest id), the
    others draw from softmax(processed) with the row's generator (or the global RNG)."""
    processed = process_logits(logits, rows, eos_token_ids)
    tokens = processed.argmax(dim=1)
    draw = [i for i, r in enumerate(rows) if not r.params.greedy]
    if draw:
        probs = processed[draw].softmax(dim=1)
        if not torch.isfinite(probs).all():
            bad = [draw[j] for j in (~torch.isfinite(probs).all(dim=1)).nonzero()[:, 0].tolist()]
            raise ValueError(f"rows {bad} have no token left to sample (every logit is -inf or NaN)")
        shared = [j for j, i in enumerate(draw) if rows[i].generator is None]
        picked = torch.empty(len(draw), dtype=torch.long, device=processed.device)
        if shared:  # rows on the global RNG draw together
            picked[shared] = torch.multinomial(probs[shared], 1)[:, 0]
        for j, i in enumerate(draw):
            if rows[i].generator is not None:  # a seeded row draws alone, so batch neighbours cannot shift it
                picked[j] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        tokens[draw] = picked
    logprobs = _logprobs(logits, tokens, [r.params.logprobs for r in rows])
    return SampleOutput(tokens.tolist(), logprobs)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], k: int) -> list[Logprob | None]:
    """Logprobs of the prompt tokens from a prefill's logits [T, V] (T = len(prompt_ids)): entry 0 is None
    (nothing predicts the first token); entry t is prompt_ids[t] under log_softmax(logits[t - 1]) with the
    top-k alternatives. The last logits row predicts the first new token and is not used."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("prompt logits must be a 2-D tensor [prompt_len, vocab]")
    if logits.shape[0] != len(prompt_ids):
        raise ValueError(f"prompt logits have {logits.shape[0]} rows for {len(prompt_ids)} prompt tokens")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be an integer >= 0")
    if any(not 0 <= t < logits.shape[1] for t in prompt_ids):
        raise ValueError(f"prompt ids must lie in [0, {logits.shape[1]})")
    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids)
    targets = torch.as_tensor(list(prompt_ids[1:]), dtype=torch.long, device=logits.device)
    return [None, *_logprobs(logits[:-1], targets, [k] * len(targets))]
