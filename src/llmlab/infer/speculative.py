"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023), batch size 1.

Each round the small draft proposes γ tokens autoregressively from q; the target scores all of them in one
forward, giving p at each of the γ + 1 positions. Token x_i is accepted with probability min(1, p(x_i)/q(x_i));
at the first rejection we sample from the residual norm(max(0, p − q)) and the round ends; when all γ are
accepted we sample one bonus token from p at the next position. Every emitted token is then distributed
exactly as the target alone would sample it:
    P(x) = q(x)·min(1, p(x)/q(x)) + (1 − Σ_y min(p(y), q(y)))·max(0, p(x) − q(x)) / Σ_y max(0, p(y) − q(y))
         = min(p(x), q(x)) + max(0, p(x) − q(x)) = p(x).
Greedy (temperature 0) is the limit of one-hot p and q: accept while the draft's token is the target's argmax,
then emit the target's argmax, so the output equals the target's own greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model import KVCache
from .params import SamplingParams
from .sampling import SamplerRow, process_logits

# Per-sequence transforms (penalties over the history, stop strings, logprobs) are the full sampler's job
# (infer/sampling.py); refuse them here rather than silently ignore them. Name -> value meaning "off".
_UNSUPPORTED = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                "no_repeat_ngram_size": 0, "min_tokens": 0, "n": 1, "logprobs": None, "prompt_logprobs": None,
                "stop": []}


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted by the target (before any cut at a stop token)
    target_forwards: int = 0
    draft_forwards: int = 0
    generated: int = 0  # tokens returned

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        # With i.i.d. acceptance rate α this tends to (1 − α^(γ+1)) / (1 − α) (Leviathan et al., eq. 1).
        return self.generated / self.target_forwards if self.target_forwards else 0.0


def crop_cache(cache: KVCache, length: int) -> KVCache:
    """Roll `cache` back to its first `length` positions (in place): every cached tensor along the sequence
    axis (dim −2), key_pos / key_valid along dim 1."""
    if not 0 <= length <= cache.length:
        raise ValueError(f"crop_cache: length must lie in [0, {cache.length}] (the cached length), got {length}")
    cache.layers = {i: tuple(t[..., :length, :] for t in ts) for i, ts in cache.layers.items()}
    if cache.key_pos is not None:
        cache.key_pos = cache.key_pos[:, :length]
    if cache.key_valid is not None:
        cache.key_valid = cache.key_valid[:, :length]
    cache.length = length
    return cache


def _probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities through the engine's own transform (logit bias, temperature,
    top-k, top-p, min-p: sampling.process_logits), so speculative sampling draws from exactly the
    distribution LLM.generate samples. Draft and target go through the same transform."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = [SamplerRow(params, (), ())] * flat.shape[0]
    return process_logits(flat, rows).softmax(dim=-1).reshape(logits.shape)


def _check(target: nn.Module, draft: nn.Module, prompt: list[int], params: SamplingParams, k: int) -> None:
    for name, model in (("target", target), ("draft", draft)):
        cfg = getattr(model, "cfg", None)
        if cfg is None or cfg.kind != "decoder" or cfg.head != "lm":
            raise ValueError(f"the {name} must be an llmlab Transformer with kind='decoder' and head='lm'")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft and target must share the vocabulary: target vocab_size={target.cfg.vocab_size}, "
                         f"draft vocab_size={draft.cfg.vocab_size}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_draft_tokens must be an integer >= 1, got {k!r}")
    if not prompt:
        raise ValueError("prompt_ids is empty; speculative decoding needs at least one token (a BOS, say)")
    if len(prompt) >= target.cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens: no room left under the target's "
                         f"max_seq_len={target.cfg.max_seq_len}")
    bad = [f"{n}={getattr(params, n)!r}" for n, off in _UNSUPPORTED.items() if getattr(params, n) != off]
    if bad:
        raise ValueError(f"speculative_generate does not support {', '.join(bad)} yet; use the engine's sampler")


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt_ids: Sequence[int], params: SamplingParams,
                         *, num_draft_tokens: int = 4, eos_token_ids: Sequence[int] = (),
                         generator: torch.Generator | None = None) -> tuple[list[int], SpeculativeStats]:
    """Generate up to params.max_tokens tokens after `prompt_ids` from `target`, proposed by `draft`.

    Stops at an eos id (kept in the output; not a stop with params.ignore_eos), at a params.stop_token_ids id
    (kept too), at max_tokens, or when prompt + output reach the target's max_seq_len. All randomness comes from
    `generator`, else from one seeded with params.seed, else from one seeded off torch's global generator."""
    prompt = [int(t) for t in prompt_ids]
    _check(target, draft, prompt, params, num_draft_tokens)
    t_dev, d_dev = next(target.parameters()).device, next(draft.parameters()).device
    if generator is None:
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
        generator = torch.Generator(t_dev).manual_seed(seed)
    g_dev = generator.device
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {int(t) for t in eos_token_ids})

    def sample(probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.to(g_dev), 1, generator=generator))

    def uniform() -> float:
        return float(torch.rand((), generator=generator, device=g_dev))

    # Invariant between rounds: each cache holds a prefix of `tokens` that misses at least the last token,
    # so the next forward always has the pending token(s) to feed; the first forward is the prefill.
    tokens, out = list(prompt), []
    t_cache, d_cache = KVCache(), KVCache()
    stats = SpeculativeStats()
    while True:
        L = len(tokens)
        # Draft γ tokens, leaving room for the one token the target always adds (correction or bonus) under
        # both max_tokens and max_seq_len; the draft's positions run up to L − 2 + γ.
        gamma = min(num_draft_tokens, params.max_tokens - len(out) - 1, target.cfg.max_seq_len - L - 1,
                    draft.cfg.max_seq_len - L + 1)
        drafted: list[int] = []
        q_rows: list[torch.Tensor] = []
        for _ in range(max(gamma, 0)):
            feed = (tokens + drafted)[d_cache.length:]  # the prefill, the tokens it lags behind, or the last draft
            logits = draft(torch.tensor([feed], device=d_dev), cache=d_cache).logits[0, -1]
            stats.draft_forwards += 1
            if params.greedy:
                drafted.append(int(logits.argmax()))
            else:
                q_rows.append(_probs(logits, params).to(t_dev))
                drafted.append(sample(q_rows[-1]))
            if drafted[-1] in stops:  # anything after a stop token would be thrown away
                break
        gamma = len(drafted)
        stats.proposed += gamma

        # One target forward scores the pending tokens and every draft: its last γ + 1 rows are p for the γ
        # drafted positions and for the position after them.
        feed = (tokens + drafted)[t_cache.length:]
        logits = target(torch.tensor([feed], device=t_dev), cache=t_cache).logits[0, -(gamma + 1):]
        stats.target_forwards += 1
        p_rows = None if params.greedy else _probs(logits, params)
        n_acc, last = 0, None
        for i, x in enumerate(drafted):
            if params.greedy:
                best = int(logits[i].argmax())
                if x != best:
                    last = best  # the target's own choice replaces the first mismatch
                    break
            else:
                p, q = p_rows[i], q_rows[i]
                # Accept with probability min(1, p(x)/q(x)); q(x) > 0 because x was sampled from q.
                if uniform() * float(q[x]) >= float(p[x]):
                    # Rejected: the remaining mass is norm(max(0, p − q)). It is all zero only when p == q up
                    # to rounding, and then a rejection has probability ~0; p itself is the right fallback.
                    residual = (p - q).clamp_min(0)
                    last = sample(residual if float(residual.sum()) > 0 else p)
                    break
            n_acc += 1
        if last is None:  # every draft accepted: one bonus token from the target's next position
            last = int(logits[gamma].argmax()) if params.greedy else sample(p_rows[gamma])
        stats.accepted += n_acc

        # Roll both caches back to what the accepted tokens justify: the target holds tokens + all drafts, the
        # draft holds tokens + all drafts but the last; the rejected draft and everything after it goes.
        emitted = drafted[:n_acc] + [last]
        crop_cache(t_cache, L + n_acc)
        crop_cache(d_cache, min(d_cache.length, L + n_acc))
        for tok in emitted:
            tokens.append(tok)
            out.append(tok)
            if tok in stops or len(out) >= params.max_tokens or len(tokens) >= target.cfg.max_seq_len:
                stats.generated = len(out)
                return out, stats
