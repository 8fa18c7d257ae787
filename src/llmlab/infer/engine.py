"""The engine: requests in, one scheduled step at a time, outputs out.

    engine = Engine(model, tok)
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step(): ...          # RequestOutputs of the requests that advanced

A step runs the scheduler's batch through the model over the paged KV pool (decodes in one forward, prompt
chunks packed back to back into one more, so no padding is computed), samples the next token of every
sequence whose tokens are all computed, and checks each for its end: EOS, a stop id, a stop string (found
across token boundaries in the decoded text and cut off), max_tokens or the context window. Text is decoded
incrementally; while a sequence runs, the tail that could still become a stop string is held back, so streamed
text never shows part of one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from ..model.cost import kv_cache_bytes_per_token
from .cache import PagedKVCache
from .params import CompletionOutput, Logprob, RequestOutput, SamplingParams
from .sampling import SamplerRow, prompt_logprobs, sample
from .scheduler import Scheduler, Sequence

DEFAULT_KV_MEMORY = 256 * 2**20
DEFAULT_MAX_NUM_SEQS = 64


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    forked: bool = False

    @property
    def finished(self) -> bool:
        return bool(self.samples) and all(s.finish_reason is not None for s in self.samples)


@dataclass(eq=False)
class _Sample:
    index: int
    seq: Sequence
    generator: torch.Generator | None
    text: str = ""  # decoded output so far (stop string cut off once found)
    searched: int = 0  # text before this index has been searched for stop strings
    sent: int = 0  # characters of text already reported to stream()
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float = 0.0
    constraint: object | None = None  # JSONConstraint when the request asks for guided_json


class Engine:
    def __init__(self, model, tokenizer=None, *, kv_layout: str = "paged", block_size: int = 16,
                 num_blocks: int | None = None, kv_memory: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int = 512, prefix_caching: bool = True,
                 eos_token_ids: Seq[int] | None = None, compile: bool | str | Callable = False) -> None:
        """kv_layout="paged": blocks of block_size tokens from a pool sized by kv_memory (or num_blocks),
        prefix caching, preemption when the pool runs dry. kv_layout="contiguous": one max_seq_len row per
        sequence (max_num_seqs rows, or as many as kv_memory holds; with none of max_num_seqs, num_blocks and
        kv_memory given, as many as DEFAULT_KV_MEMORY holds, at least one); decode steps read keys in place, at
        the price of reserving the whole context for every sequence. max_num_seqs defaults to 64.

        compile=True (contiguous layout) runs decode steps through torch.compile(model, dynamic=True) with
        inductor (a string or callable names another torch.compile backend): no Python and no per-operation
        dispatch between a step's kernels, elementwise work fused. The first compiled step compiles, which takes
        minutes for a real model (1-4 for SmolLM2-135M on 2 cores), and the graph serves every key length after
        that. One-row batches compile once, batches of several rows at most twice. Prompt chunks stay eager:
        their packed shapes change every step."""
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.cfg
        self.max_seq_len = cfg.max_seq_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if kv_layout not in ("paged", "contiguous"):
            raise ValueError(f"kv_layout must be 'paged' or 'contiguous', got {kv_layout!r}")
        if compile and kv_layout != "contiguous":
            raise ValueError("compile=True needs kv_layout='contiguous': the paged layout reads keys in place, "
                             "from a run of blocks or by a gather depending on where its blocks lie, and each "
                             "of those paths would compile anew")
        self.contiguous = kv_layout == "contiguous"
        if self.contiguous:
            block_size, prefix_caching = cfg.max_seq_len, False
            per_row = kv_cache_bytes_per_token(cfg, param.element_size()) * block_size
            if kv_memory is None and num_blocks is None and max_num_seqs is None:
                kv_memory = DEFAULT_KV_MEMORY  # 64 unasked rows of SmolLM2's 8k context would be 24 GB
            rows = DEFAULT_MAX_NUM_SEQS if max_num_seqs is None else max_num_seqs
            fits = (kv_memory // per_row) if kv_memory else rows
            num_blocks = max_num_seqs = max(1, min(rows, num_blocks or fits, fits))
        if max_num_seqs is None:
            max_num_seqs = DEFAULT_MAX_NUM_SEQS
        if num_blocks is None:
            per_block = kv_cache_bytes_per_token(cfg, param.element_size()) * block_size
            wanted = -(-max_num_seqs * cfg.max_seq_len // block_size)  # enough for every sequence at full length
            num_blocks = max(1, min(wanted, (kv_memory or DEFAULT_KV_MEMORY) // per_block))
        self.cache = PagedKVCache(num_blocks, block_size, device=self.device, dtype=self.dtype,
                                  prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        if eos_token_ids is None:
            eos = tokenizer.token_to_id(tokenizer.eos_token) if tokenizer is not None and tokenizer.eos_token else None
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = list(eos_token_ids)
        # Models often pad their embedding past the tokenizer's vocabulary; those ids have no text, so they are
        # never sampled.
        self.vocab_limit = len(tokenizer) if tokenizer is not None and len(tokenizer) < cfg.vocab_size else None
        # the first decode step runs eagerly, so that Linear has measured its products before the trace
        self._compiled = None
        if compile:
            self._compiled = torch.compile(model, dynamic=True, backend="inductor" if compile is True else compile)
        self._decoded_eagerly = False
        self.requests: dict[str, Request] = {}
        self._sample_of: dict[int, tuple[Request, _Sample]] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_steps = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None, *,
                    truncate: bool = False) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.prompt_ids(prompt, 1, truncate)
        blocks = self.cache.blocks
        needed = -(-min(len(ids) + params.max_tokens, self.max_seq_len) // blocks.block_size)
        if needed > blocks.num_blocks:
            raise ValueError(f"one sequence needs {needed} KV blocks of {blocks.block_size} tokens but the pool "
                             f"has {blocks.num_blocks}; raise kv_memory/num_blocks or lower max_tokens")
        req = Request(request_id, text, ids, params)
        arrival = next(self._arrivals)
        seq = Sequence(next(self._seq_ids), arrival, list(ids), len(ids))
        seq.reuse_prefix = params.prompt_logprobs is None  # cached blocks would skip the logits it reports
        self._attach(req, seq, 0)
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def prompt_ids(self, prompt: str | Seq[int], room: int = 1, truncate: bool = False) -> list[int]:
        """The prompt's token ids, checked: a text prompt is encoded, ids lie in the vocabulary, and `room` new
        tokens still fit in the context window (truncate=True keeps the last tokens that leave that room)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: LLM(model, tokenizer) or pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got values in [{min(ids)}, {max(ids)}]")
        if room >= self.max_seq_len:
            raise ValueError(f"{room} new tokens do not fit in the context window of {self.max_seq_len} with any "
                             "prompt; ask for fewer")
        if len(ids) + room > self.max_seq_len:
            if not truncate:
                left = "at least one must be left to generate" if room == 1 else f"{room} new tokens asked"
                raise ValueError(f"the prompt has {len(ids)} tokens but the context window is {self.max_seq_len} "
                                 f"({left}); shorten it or pass truncate=True to keep its last tokens")
            ids = ids[-(self.max_seq_len - room):]
        return ids

    def _attach(self, req: Request, seq: Sequence, index: int) -> None:
        p = req.params
        gen = None
        if p.seed is not None:  # sample i of a seeded request draws from seed + i
            gen = torch.Generator(device=self.device).manual_seed(p.seed + index)
        s = _Sample(index, seq, gen, logprobs=[] if p.logprobs is not None else None)
        if p.guided_json is not None:
            if req.samples:  # a fork: the same constraint state as the sample it forks from
                s.constraint = req.samples[0].constraint.copy()
            else:
                s.constraint = self._constraint(p.guided_json)
        req.samples.append(s)
        self._sample_of[seq.seq_id] = (req, s)

    def _constraint(self, guided_json: bool | dict):
        from .json_constraint import JSONConstraint

        if self.tokenizer is None:
            raise ValueError("guided_json needs a tokenizer (the constraint works on the text of each token)")
        schema = None if guided_json is True else guided_json
        return JSONConstraint(self.tokenizer, schema, eos_token_ids=self.eos_token_ids,
                              vocab_size=self.model.cfg.vocab_size)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s in req.samples:
            if s.finish_reason is None:
                s.finish_reason = "abort"
            self.scheduler.finish(s.seq)
            self._sample_of.pop(s.seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler could not run any sequence; the KV pool is too small")
            return []
        self.num_steps += 1
        # decodes in block order: in the contiguous layout rows 0..B-1 are then a view of the pool
        decode = sorted(((s, n) for s, n in zip(batch.seqs, batch.num_new) if n == 1), key=lambda x: x[0].block_table[0])
        prefill = [(s, n) for s, n in zip(batch.seqs, batch.num_new) if n > 1]
        touched: dict[str, Request] = {}
        if decode:
            self._run(decode, touched)
        if prefill:
            self._run(prefill, touched, packed=True)
        if self.contiguous:
            self.scheduler.compact()
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return outputs

    def _run(self, group: list[tuple[Sequence, int]], touched: dict[str, Request], packed: bool = False) -> None:
        """One forward over the group: a [B, max(new)] batch with padding on the right, or (packed) every
        sequence's new tokens back to back in one row, which computes no padding at all (prompt chunks)."""
        seqs, new = [s for s, _ in group], [n for _, n in group]
        cached = [s.num_computed for s in seqs]
        tables = [s.block_table for s in seqs]
        if packed:
            ids = torch.tensor([t for s, c, n in zip(seqs, cached, new) for t in s.token_ids[c:c + n]])[None]
            view = self.cache.packed_view(tables, cached, new)
            starts = list(itertools.accumulate(new, initial=0))
            where = [(0, a) for a in starts]  # token t of sequence i is h[row, start + t]
        else:
            ids = torch.zeros(len(seqs), max(new), dtype=torch.long)
            for i, (s, c, n) in enumerate(zip(seqs, cached, new)):
                ids[i, :n] = torch.tensor(s.token_ids[c:c + n])
            view = self.cache.batch_view(tables, cached, new)
            where = [(i, 0) for i in range(len(seqs))]
        forward = self.model
        if self._compiled is not None and not packed:
            if self._decoded_eagerly:
                forward = self._compiled
            self._decoded_eagerly = True
        h = forward(ids.to(self.device), cache=view, return_logits=False).hidden_states
        ready = []  # sequences whose every token is now computed: they sample
        for i, (s, n) in enumerate(zip(seqs, new)):
            self.scheduler.computed(s, n)
            req, _ = self._sample_of[s.seq_id]
            if req.params.prompt_logprobs is not None and len(req.prompt_logprobs or ()) < len(req.prompt_ids):
                row, start = where[i]
                self._prompt_logprobs(req, h[row, start:start + n], cached[i])
            if s.num_uncomputed == 0:
                ready.append(i)
        if not ready:
            return
        row_of = torch.tensor([where[i][0] for i in ready], device=h.device)
        last = torch.tensor([where[i][1] + new[i] - 1 for i in ready], device=h.device)
        logits = self.model.head(h[row_of, last]).float()
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        rows, owners = [], []
        for j, i in enumerate(ready):
            req, smp = self._sample_of[seqs[i].seq_id]
            targets = [smp]
            if req.params.n > 1 and not req.forked:  # the prompt is computed once; the n samples fork from it
                req.forked = True
                for k in range(1, req.params.n):
                    child = self.scheduler.fork(seqs[i], next(self._seq_ids))
                    self._attach(req, child, k)
                targets = req.samples
            for t in targets:
                rows.append(SamplerRow(req.params, t.seq.token_ids[:t.seq.num_prompt], t.seq.output_ids, t.generator))
                owners.append((req, t, j))
        logits = logits[[j for _, _, j in owners]]
        for r, (_, smp, _) in enumerate(owners):
            if smp.constraint is not None:  # only tokens that keep the output valid JSON under the schema
                logits[r].masked_fill_(~smp.constraint.allowed().to(logits.device), float("-inf"))
        picked = sample(logits, rows, self.eos_token_ids)
        for (req, smp, _), tok, lp in zip(owners, picked.token_ids, picked.logprobs):
            smp.seq.token_ids.append(tok)
            if smp.constraint is not None and tok not in self.eos_token_ids:
                smp.constraint.advance(tok)
            if lp is not None:
                smp.logprobs.append(lp)
                smp.cumulative_logprob += lp.logprob
            self._check_stop(req, smp)
            touched[req.request_id] = req

    def _prompt_logprobs(self, req: Request, h: torch.Tensor, start: int) -> None:
        """Prompt logprobs for the prompt tokens this chunk predicts (chunked prefill calls it per chunk):
        h[t] is position start+t, which predicts prompt token start+t+1."""
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        done = len(req.prompt_logprobs) - 1 - start  # positions listed before a preemption made them recompute
        if done > 0:
            h, start = h[done:], start + done
        end = min(start + h.shape[0], len(req.prompt_ids) - 1)
        if end > start:
            logits = self.model.head(h[:end - start]).float()
            logits = torch.cat((logits, logits[-1:]))  # a row for the last token, which predicts nothing here
            lps = prompt_logprobs(logits, req.prompt_ids[start:end + 1], req.params.prompt_logprobs)
            req.prompt_logprobs.extend(lps[1:])

    # ------------------------------------------------------------------ ends and text
    def _check_stop(self, req: Request, smp: _Sample) -> None:
        p, seq = req.params, smp.seq
        out = seq.output_ids
        tok = out[-1]
        stop_id = None
        if len(out) > p.min_tokens:  # the sampler kept stop ids away until min_tokens were out
            if tok in p.stop_token_ids or (tok in self.eos_token_ids and not p.ignore_eos):
                stop_id = tok
        shown = out[:-1] if stop_id is not None else out
        smp.text = self._decode(shown, p)
        reason = None
        if stop_id is not None:
            reason, smp.stop_reason = "stop", stop_id
        elif p.stop:
            # search only text that can hold a new occurrence (one that ends in what this token added; 3 more
            # characters since a completed multi-byte character can replace up to 3 U+FFFD), and only once
            # min_tokens are out: an earlier occurrence is part of the answer
            found = []
            if len(out) >= p.min_tokens:
                for s in p.stop:
                    at = smp.text.find(s, max(0, smp.searched - len(s) - 2))
                    while 0 <= at and at + len(s) <= smp.searched:  # seen before: not new
                        at = smp.text.find(s, at + 1)
                    if at >= 0:
                        found.append((at, s))
            smp.searched = len(smp.text)
            if found:
                at, s = min(found)
                smp.text, smp.stop_reason, reason = smp.text[:at], s, "stop"
        if reason is None and (len(out) >= p.max_tokens or len(seq.token_ids) >= self.max_seq_len):
            reason = "length"
        if reason is not None:
            smp.finish_reason = reason
            self.scheduler.finish(seq)
            self._sample_of.pop(seq.seq_id, None)

    def _decode(self, ids: list[int], p: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)

    def _visible(self, smp: _Sample, p: SamplingParams) -> str:
        """The text that is safe to show: while running, without a trailing incomplete character and without
        a tail that may still grow into a stop string."""
        text = smp.text
        if smp.finish_reason is not None:
            return text
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            text = text.rstrip("\ufffd")
        hold = 0
        for s in p.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[:len(text) - hold]

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for s in sorted(req.samples, key=lambda s: s.index):
            outs.append(CompletionOutput(s.index, self._visible(s, req.params), list(s.seq.output_ids),
                                         s.finish_reason, s.logprobs, s.stop_reason, s.cumulative_logprob))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, req.finished, req.prompt_logprobs)
