"""Beam search over our Transformer and KVCache, with transformers' semantics (its `_beam_search`, 5.x).

All prompts x beams run as one batch ([B * num_beams] rows, left-padded prompts), one forward per step.
Each step, for every prompt:

  1. Every running beam b proposes every token v with the accumulated score s_b + log p(v | beam b)
     (log_softmax in float32). The top K = max(2, 1 + #eos) * num_beams of these num_beams * vocab
     candidates are kept: K > num_beams so that num_beams of them still run when some end in eos.
  2. A candidate "hits a stop" when its token is an eos or when it reaches max_tokens. The best num_beams
     candidates that did not stop become the running beams (the KV cache rows are reordered to follow
     their parents).
  3. Stopped candidates ranked among the first num_beams of the K enter the finished heap (size
     num_beams) with transformers' length-penalized score (GNMT's ((5 + len) / 6)^alpha, Wu et al. 2016,
     simplified to len^alpha)
         score = sum(logprobs) / len^length_penalty,   len = generated tokens, the eos included,
     so length_penalty > 0 favours longer hypotheses and < 0 shorter ones.
  4. A prompt is done when its heap is full and the best running beam cannot beat the worst finished
     hypothesis. The best running beam's score can still rise when divided by a larger len^alpha, so "can
     it beat" is a heuristic (transformers' `_check_early_stop_heuristic`):
         early_stopping=True     stop as soon as the heap is full (every prompt's);
         early_stopping=False    bound = s_best_running / cur_len^alpha (the current length);
         early_stopping="never"  bound = s_best_running / max_tokens^alpha when alpha > 0 (a true upper
                                 bound, as log-prob sums only fall), else the current length.
     Search stops when every prompt is done or every candidate of every prompt stopped (max_tokens).

"Impossible" entries carry transformers' additive -1e9 (not -inf), so ties and orderings match it exactly.

The KV cache is paged by default (`PagedKVCache`): each beam is a block table, the num_beams beams of a prompt
start on the prompt's blocks, and a surviving beam takes its parent's table with the blocks' reference counts
raised, so beams share every block of their common past. A beam copies a block only when it writes into one it
shares (copy on write): at most one block per beam and step, where reordering a growing `KVCache` copies each
beam's whole past every step (still available: pass cache=KVCache()).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import KVCache, Transformer
from .cache import PagedKVCache

DEFAULT_BLOCK_SIZE = 16

NEG = -1.0e9  # transformers' "impossible" score, added rather than assigned


@dataclass
class BeamParams:
    num_beams: int = 4
    max_tokens: int = 16  # new tokens at most
    length_penalty: float = 1.0  # alpha in score = sum logprobs / len^alpha
    early_stopping: bool | str = False  # True, False or "never" (see the module docstring)
    num_return_sequences: int = 1  # <= num_beams
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.eos_token_ids = tuple(self.eos_token_ids)
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"BeamParams.{name}={getattr(self, name)!r} is invalid: {rule}")

        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise bad("num_beams", "it must be an integer >= 1")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "it must be an integer >= 1")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            raise bad("num_return_sequences", f"it must be an integer in [1, num_beams={self.num_beams}]")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise bad("early_stopping", 'it must be True, False or "never"')
        if not isinstance(self.length_penalty, (int, float)) or self.length_penalty != self.length_penalty or \
                abs(self.length_penalty) == float("inf"):
            raise bad("length_penalty", "it must be a finite number")
        if any(not isinstance(t, int) or t < 0 for t in self.eos_token_ids):
            raise bad("eos_token_ids", "it must hold token ids (integers >= 0)")


@dataclass
class BeamHypothesis:
    token_ids: list[int]  # new tokens only; the eos is included when it ended the hypothesis
    score: float  # length-penalized: sum logprobs / len^length_penalty (transformers' sequences_scores)
    text: str = ""  # the decoded tokens, special tokens left out, when LLM.beam_search has a tokenizer


def reorder_cache(cache: KVCache, index: torch.Tensor) -> None:
    """Row i of every cached tensor becomes row index[i] (the beams that survived, their parents repeated)."""
    cache.layers = {layer: tuple(t.index_select(0, index) for t in ts) for layer, ts in cache.layers.items()}
    if cache.key_valid is not None:
        cache.key_valid = cache.key_valid.index_select(0, index)
    if cache.key_pos is not None:
        cache.key_pos = cache.key_pos.index_select(0, index)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, N, ...] -> [B, M, ...]: along dim 1 by index [B, M] (the beams of each prompt)."""
    return t.gather(1, index.view(*index.shape, *(1,) * (t.dim() - 2)).expand(*index.shape, *t.shape[2:]))


def _check_inputs(model: Transformer, prompts: Sequence[Sequence[int]], params: BeamParams) -> list[list[int]]:
    """The prompts as lists of Python ints, after checking everything a bad request could get wrong."""
    params.validate()
    cfg = model.cfg
    if cfg.head != "lm" or not cfg.is_causal:
        raise ValueError(f"beam search needs a causal LM (head='lm'); got kind={cfg.kind!r}, head={cfg.head!r}")
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not len(p):
            raise ValueError(f"prompt {i} is empty (or not a list of token ids); every prompt needs >= 1 token")
        try:
            ids = [operator.index(t) for t in p]  # ints, numpy ints, integer 0-d tensors; never floats
        except TypeError:
            raise ValueError(f"prompt {i} must hold integer token ids, got {list(p)}") from None
        if not all(0 <= t < cfg.vocab_size for t in ids):
            raise ValueError(f"prompt {i} holds a value outside [0, {cfg.vocab_size}) (vocab_size): {ids}")
        out.append(ids)
    if any(t >= cfg.vocab_size for t in params.eos_token_ids):
        raise ValueError(f"eos_token_ids {params.eos_token_ids} must lie in [0, {cfg.vocab_size}) (vocab_size)")
    if max(2, 1 + len(params.eos_token_ids)) * params.num_beams > params.num_beams * cfg.vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is too small for num_beams={params.num_beams} with "
                         f"{len(params.eos_token_ids)} eos tokens")
    return out


class _PagedBeams:
    """The beams' block tables over a PagedKVCache: shared blocks by reference count, copy on write."""

    def __init__(self, model: Transformer, cache: PagedKVCache, prompts: list[list[int]], num_beams: int,
                 max_tokens: int, device) -> None:
        self.model, self.cache, self.blocks, self.device = model, cache, cache.blocks, device
        bs = cache.block_size
        # worst case: no block shared, plus one being copied per beam
        need = sum(-(-(len(p) + max_tokens) // bs) + 1 for p in prompts) * num_beams
        if self.blocks.num_free < need:
            raise ValueError(f"the KV pool has {self.blocks.num_free} free blocks of {bs} tokens; beam search of "
                             f"{len(prompts)} prompts x {num_beams} beams up to {max_tokens} new tokens may need "
                             f"{need}: give a PagedKVCache with more blocks")
        self.tables = [[self.blocks.allocate() for _ in range(-(-len(p) // bs))] for p in prompts]
        self.lengths = [len(p) for p in prompts]

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """All prompts packed into one row, one forward: [B, vocab] logits of each prompt's last token."""
        ids = torch.tensor([t for p in prompts for t in p], device=self.device)[None]
        view = self.cache.packed_view(self.tables, [0] * len(prompts), self.lengths)
        h = self.model(ids, cache=view, return_logits=False).hidden_states[0]
        last = torch.tensor(self.lengths, device=self.device).cumsum(0) - 1
        return self.model.head(h[last])

    def follow(self, rows: list[int]) -> None:
        """Row i becomes a copy of row rows[i] (its parent): the blocks are shared, not copied."""
        tables = [list(self.tables[r]) for r in rows]
        for t in tables:  # take the new references before dropping the old, so no shared block is freed
            for b in t:
                self.blocks.incref(b)
        for t in self.tables:
            self.blocks.free_all(t)
        self.tables, self.lengths = tables, [self.lengths[r] for r in rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: a block for it, copied first when shared. [rows, vocab] logits."""
        bs = self.cache.block_size
        for table, length in zip(self.tables, self.lengths):
            i = length // bs
            if i == len(table):
                table.append(self.blocks.allocate())
            elif self.blocks.ref[table[i]] > 1:
                new = self.blocks.allocate()
                self.cache.copy_block(table[i], new)
                self.blocks.free(table[i])
                table[i] = new
        view = self.cache.batch_view(self.tables, self.lengths, [1] * len(self.tables))
        logits = self.model(tokens[:, None], cache=view).logits[:, -1]
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def close(self) -> None:
        for t in self.tables:
            self.blocks.free_all(t)
        self.tables = []


class _CopiedBeams:
    """The beams as rows of a growing KVCache (left-padded prompts), reordered by copying every step."""

    def __init__(self, model: Transformer, cache: KVCache, device) -> None:
        self.model, self.cache, self.device = model, cache, device

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, L, dtype=torch.long, device=self.device)
        mask = torch.zeros(B, L, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p):] = 1
        return self.model(ids, attention_mask=mask, cache=self.cache).logits[:, -1]

    def follow(self, rows: list[int]) -> None:
        reorder_cache(self.cache, torch.tensor(rows, device=self.device))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, None], cache=self.cache).logits[:, -1]

    def close(self) -> None:
        pass


@torch.no_grad()
def beam_search(model: Transformer, prompts: Sequence[Sequence[int]], params: BeamParams, *,
                cache: PagedKVCache | KVCache | None = None, vocab_limit: int | None = None
                ) -> list[list[BeamHypothesis]]:
    """For each prompt, the num_return_sequences best hypotheses, best first. vocab_limit: only token ids below
    it are chosen (a tokenizer smaller than the model's padded vocabulary).

    cache: None for a fresh paged pool (blocks of DEFAULT_BLOCK_SIZE, as many as the search can need); a
    PagedKVCache to run in (its blocks all return when the search ends); or an empty KVCache to keep every beam's
    past in its own rows, copied as beams are reordered."""
    prompts = _check_inputs(model, prompts, params)
    device = next(model.parameters()).device
    nb, n = params.num_beams, params.max_tokens
    if cache is None:
        per_beam = sum(-(-(len(p) + n) // DEFAULT_BLOCK_SIZE) + 1 for p in prompts)
        cache = PagedKVCache(per_beam * nb, DEFAULT_BLOCK_SIZE, device=device, prefix_caching=False)
    if isinstance(cache, PagedKVCache):
        beams = _PagedBeams(model, cache, prompts, nb, n, device)
    elif isinstance(cache, KVCache) and not cache.layers:
        beams = _CopiedBeams(model, cache, device)
    else:
        raise ValueError(f"cache must be None, a PagedKVCache or an empty KVCache; got {type(cache).__name__}")
    try:
        return _search(beams, prompts, params, device, vocab_limit)
    finally:
        beams.close()


def _search(beams: _PagedBeams | _CopiedBeams, prompts: list[list[int]], params: BeamParams, device,
            vocab_limit: int | None) -> list[list[BeamHypothesis]]:
    B, nb, n = len(prompts), params.num_beams, params.max_tokens
    alpha, early = params.length_penalty, params.early_stopping
    K = max(2, 1 + len(params.eos_token_ids)) * nb  # candidates kept per prompt and step
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)

    # Prefill the B prompts once; each prompt's num_beams beams start from its cache.
    logits = beams.prefill(prompts)
    beams.follow(torch.arange(B).repeat_interleave(nb).tolist())
    logits = logits.repeat_interleave(nb, dim=0)

    # Running beams: tokens so far and accumulated log-probs. Only beam 0 starts live (the others at -1e9), so
    # the first step does not pick the same token num_beams times from identical beams.
    run_tokens = torch.zeros(B, nb, n, dtype=torch.long, device=device)
    run_scores = torch.zeros(B, nb, device=device)
    run_scores[:, 1:] = NEG
    # Finished heap per prompt (kept sorted, best first): tokens, lengths, penalized scores, filled slots.
    fin_tokens = torch.zeros(B, nb, n, dtype=torch.long, device=device)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    fin_scores = torch.full((B, nb), NEG, device=device)
    fin_filled = torch.zeros(B, nb, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)  # the early-stop heuristic is unsatisfied
    in_top_nb = torch.arange(K, device=device) < nb
    batch_offset = torch.arange(B, device=device)[:, None] * nb

    for t in range(n):  # t tokens generated so far; this step makes token t + 1
        # float32 whatever the model's dtype: scores are sums over many steps, and bf16 would reorder beams
        logits = logits.float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        logp = F.log_softmax(logits, dim=-1)
        V = logp.shape[-1]
        total = (logp.view(B, nb, V) + run_scores[:, :, None]).view(B, nb * V)
        top_scores, top_index = total.topk(K, dim=1)  # sorted, best first
        parent, token = top_index // V, top_index % V
        top_tokens = _gather(run_tokens, parent)
        top_tokens[:, :, t] = token
        stops = torch.isin(token, eos) | (t + 1 >= n)  # [B, K]

        # Next running beams: the best num_beams candidates that did not stop.
        live = top_scores + stops.float() * NEG
        keep = live.topk(nb, dim=1).indices
        run_tokens, run_scores, parent = _gather(top_tokens, keep), _gather(live, keep), _gather(parent, keep)

        # Finished heap: penalize by length; add nothing to a prompt that is done (heap full under
        # early_stopping=True, or no improvement possible); only stopped candidates among the top num_beams.
        new = top_scores / (t + 1) ** alpha
        new = new + (fin_filled.all(dim=1, keepdim=True) & (early is True)).float() * NEG
        new = new + (~can_improve).float() * NEG
        just_finished = stops & in_top_nb
        new = new + (~just_finished).float() * NEG
        merged = torch.cat((fin_scores, new), dim=1)
        best = merged.topk(nb, dim=1).indices
        fin_scores = _gather(merged, best)
        fin_tokens = _gather(torch.cat((fin_tokens, top_tokens), dim=1), best)
        fin_len = _gather(torch.cat((fin_len, torch.full_like(new, t + 1, dtype=torch.long)), dim=1), best)
        fin_filled = _gather(torch.cat((fin_filled, just_finished), dim=1), best)

        # Early-stop heuristic (sticky per prompt): can the best running beam still beat the worst finished?
        # bound = s_best_running / length^alpha; an empty heap slot counts as -1e9, so a prompt whose heap is
        # not full always goes on. The heaps-full stop of early_stopping=True only saves steps: full heaps
        # already take no more hypotheses (above).
        length = n if early == "never" and alpha > 0 else t + 1
        bound = run_scores[:, :1] / length ** alpha
        worst = torch.where(fin_filled, fin_scores.min(dim=1, keepdim=True).values, NEG)
        can_improve = can_improve & (bound > worst).any(dim=1, keepdim=True)
        heaps_full = bool(fin_filled.all()) and early is True
        if not bool(can_improve.any()) or heaps_full or bool(stops.all()):
            break

        beams.follow((parent + batch_offset).flatten().tolist())
        logits = beams.step(run_tokens[:, :, t].reshape(B * nb))

    return [[BeamHypothesis(fin_tokens[b, i, : fin_len[b, i]].tolist(), float(fin_scores[b, i]))
             for i in range(params.num_return_sequences)] for b in range(B)]
