"""Inference: the LLM front end, the continuously batching engine over paged KV memory, sampling, beam
search and speculative decoding."""

from .cache import BlockManager, PagedKVCache, StaticCache
from .engine import Engine
from .llm import LLM
from .params import CompletionOutput, Logprob, RequestOutput, SamplingParams

__all__ = ["LLM", "BlockManager", "CompletionOutput", "Engine", "Logprob", "PagedKVCache", "RequestOutput",
           "SamplingParams", "StaticCache"]
