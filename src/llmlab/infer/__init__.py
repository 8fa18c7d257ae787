"""Inference: the LLM front end, the continuously batching engine over paged KV memory, sampling, beam
search and speculative decoding."""

from .beam import BeamHypothesis, BeamParams, beam_search
from .cache import BlockManager, PagedKVCache, StaticCache
from .engine import Engine
from .llm import LLM
from .params import CompletionOutput, Logprob, RequestOutput, SamplingParams
from .speculative import SpeculativeStats, speculative_generate

__all__ = ["LLM", "BeamHypothesis", "BeamParams", "BlockManager", "CompletionOutput", "Engine", "Logprob",
           "PagedKVCache", "RequestOutput", "SamplingParams", "SpeculativeStats", "StaticCache", "beam_search",
           "speculative_generate"]
