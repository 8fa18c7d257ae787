"""`LLM`: the front end most users need.

    llm = LLM(model, tok)                       # or LLM.load("smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].logprobs
    for piece in llm.stream("Once upon a time", params): print(piece, end="")
    out = llm.chat([{"role": "user", "content": "Hi"}], params)
    best = llm.beam_search(["Hello"], BeamParams(num_beams=4, max_tokens=32))[0][0].text

All requests of a generate() call go through one continuously batched engine; outputs come back in the
order of the prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import replace

from ..progress import Bar
from .beam import BeamHypothesis, BeamParams, beam_search
from .engine import Engine
from .params import RequestOutput, SamplingParams

Prompt = str | Seq[int]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    def __init__(self, model, tokenizer=None, **engine_options) -> None:
        """engine_options: kv_layout, block_size, num_blocks or kv_memory (bytes), max_num_seqs,
        max_num_batched_tokens, prefix_caching, eos_token_ids, compile (see Engine)."""
        self.engine = Engine(model, tokenizer, **engine_options)
        self.model, self.tokenizer = model, tokenizer
        self._ids = itertools.count()

    @classmethod
    def load(cls, name_or_path: str, *, dtype=None, device="cpu", **engine_options) -> LLM:
        from ..api import load

        model, tok = load(name_or_path, dtype=dtype, device=device)
        return cls(model, tok, **engine_options)

    def _add(self, prompt: Prompt, params: SamplingParams, truncate: bool) -> str:
        rid = f"req-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params, truncate=truncate)
        return rid

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, truncate: bool = False, progress: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt (strings or token-id lists), in order. params: one for all prompts or
        one per prompt. truncate=True keeps the last tokens of a prompt longer than the context window."""
        prompts = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self._add(prompt, p, truncate))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        bar = Bar(len(ids), "generate", enabled=progress)
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [done[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, truncate: bool = False) -> Iterator[str]:
        """Yield the text of one completion as it grows (only text that can no longer change)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() follows one completion; use generate() for n > 1")
        rid = self._add(prompt, params, truncate)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: BeamParams | None = None, *,
                    truncate: bool = False) -> list[list[BeamHypothesis]]:
        """Beam search with transformers' num_beams semantics (infer.beam_search, on a paged pool of its own):
        for each prompt, its params.num_return_sequences best hypotheses, best first, with their text. A
        BeamParams without eos_token_ids ends hypotheses at the engine's end-of-sequence ids. truncate=True keeps
        the last tokens of a prompt that leaves no room for max_tokens in the context window."""
        params = params or BeamParams()
        if not params.eos_token_ids:
            params = replace(params, eos_token_ids=tuple(self.engine.eos_token_ids))
        ids = [self.engine.prompt_ids(p, params.max_tokens, truncate) for p in _as_prompt_list(prompts)]
        results = beam_search(self.model, ids, params, vocab_limit=self.engine.vocab_limit)
        if self.tokenizer is not None:
            for hyp in (h for hs in results for h in hs):
                hyp.text = self.tokenizer.decode(hyp.token_ids, skip_special_tokens=True)
        return results

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None, *,
             chat_template: str | None = None, truncate: bool = False):
        """One conversation (a list of messages) -> RequestOutput; a list of conversations -> a list."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer with a chat template")
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, chat_template=chat_template)
                   for c in convs]
        outs = self.generate(prompts, params, truncate=truncate)
        return outs[0] if single else outs
