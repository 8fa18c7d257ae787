"""What a request asks for (SamplingParams) and what it gets back (RequestOutput, CompletionOutput).

The names follow vLLM and the OpenAI API so users can move between them: temperature 0 is greedy;
repetition_penalty is multiplicative over prompt and output tokens as transformers applies it (CTRL, Keskar
et al. 2019); frequency and presence penalties are additive over output tokens as the OpenAI API defines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 16  # a longer list is almost always a bug (a string split into characters, for one)


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens at most
    min_tokens: int = 0  # stop tokens and stop strings are ignored until this many tokens are out
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens with p < min_p · p_max
    repetition_penalty: float = 1.0  # logit / r if logit > 0 else logit · r, for tokens seen in prompt or output
    frequency_penalty: float = 0.0  # logit -= f · count(token in output)
    presence_penalty: float = 0.0  # logit -= p · [token in output]
    no_repeat_ngram_size: int = 0  # forbid any n-gram from occurring twice (prompt included, as transformers)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    stop: list[str] = field(default_factory=list)  # stop strings, never part of the returned text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids (kept out of the text too)
    ignore_eos: bool = False
    n: int = 1  # samples per prompt
    seed: int | None = None  # per-request seed: the same seed reproduces the same sample
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top-k alternatives
    prompt_logprobs: int | None = None  # same for every prompt token (from the second on)
    skip_special_tokens: bool = True
    guided_json: bool | dict | None = None  # constrained decoding: True = any JSON object, a dict = a JSON schema

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {rule}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "it must be an integer >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"it must lie in [0, max_tokens={self.max_tokens}]")
        # each rule is written so that NaN fails it too
        if not 0 <= self.temperature < math.inf:
            raise bad("temperature", "it must be a finite number >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise bad("top_k", "it must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "it must lie in (0, 1] (1 turns it off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "it must lie in [0, 1] (0 turns it off)")
        if not 0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "it must be a finite number > 0 (1 turns it off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "it must lie in [-2, 2] as in the OpenAI API")
        if any(math.isnan(b) for b in self.logit_bias.values()):
            raise bad("logit_bias", "a bias must be a number, not NaN")
        if self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "it must be >= 0 (0 turns it off)")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "it must be an integer >= 1")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed; got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if self.guided_json is not None and not isinstance(self.guided_json, (bool, dict)):
            raise bad("guided_json", "it must be None, True (any JSON object) or a JSON schema dict")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(name, "it must be None or an integer >= 0 (the number of alternatives)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Logprob:
    """One position: the chosen token's log-probability and the top alternatives (token id -> logprob), from
    the model's distribution before any sampling transform (as vLLM reports them)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos, stop id or stop string), "length", or None while running
    logprobs: list[Logprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    cumulative_logprob: float = 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[Logprob | None] | None = None

    # The single-sample case reads like the interface: outs[0].text, outs[0].token_ids, ...
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[Logprob] | None:
        return self.outputs[0].logprobs
