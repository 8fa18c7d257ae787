"""Data: real corpora found on disk (sources), documents from files (corpus), memory-mapped token shards
(shards), packed pretraining batches (packing) and SFT conversations (sft). Imports the tokenizer only."""

from .corpus import read_documents, split_documents
from .packing import PackedLoader, validation_batches
from .sft import SFTLoader, encode_conversations, load_conversations, to_conversation
from .shards import TokenShards, find_eos, tokenize_to_shards
from .sources import MissingDataError

__all__ = ["MissingDataError", "PackedLoader", "SFTLoader", "TokenShards", "encode_conversations", "find_eos",
           "load_conversations", "read_documents", "split_documents", "to_conversation", "tokenize_to_shards",
           "validation_batches"]
