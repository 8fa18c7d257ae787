"""Preference data for the offline workflows (reward model, DPO family): the `data` recipe section, the pairs
it names, encoded and split, and a resumable batch loader.

    sources: [chat-english]        named chat data: pairs built by data.preference.pairs_from_conversations
    sources: [sentiment-english]   a positive review preferred to a negative one (data.preference.
                                   load_sentiment_pairs, BIG-bench multiemo in ../shared/data)
    sources: [prefs.jsonl, ...]    preference files (prompt/chosen/rejected, conversations, or unpaired KTO rows)

A batch holds B pairs as 2B rows, the chosen completions first: row i is prompt_i + chosen_i, row B + i is
prompt_i + rejected_i, right-padded. `completion_mask` marks the completion tokens (what DPO scores), `index`
the pairs' positions in the dataset, and every `ref_*` number of the encoded items (cached reference log-probs)
becomes a [B] float tensor. Unpaired (KTO) data gives B rows and `label` (1 desirable, 0 undesirable), then B
more rows prompt_i + kl_completion_i when the items carry KTO's mismatched completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.packing import EpochLoader
from ..data.preference import (
    PreferencePair,
    UnpairedExample,
    encode_pairs,
    load_preferences,
    load_sentiment_pairs,
    pairs_from_conversations,
    split_pairs,
)
from ..data.sft import load_conversations

NAMED_CHAT_SOURCES = ("chat-english", "chat-chinese")
NAMED_SENTIMENT_SOURCES = ("sentiment-english", "sentiment-chinese")


@dataclass
class PreferenceData:
    sources: list[str] = field(default_factory=lambda: ["chat-english"])  # named chat sources or preference files
    max_pairs: int = 0  # 0: all; else a seeded subset of this many
    val_fraction: float = 0.1  # pairs held out (whole prompt groups) for validation
    max_len: int = 256  # prompt + longest completion, in tokens; longer pairs are truncated
    batch_size: int = 8  # pairs per batch (2 × rows)
    chat_template: str | None = None  # None: the tokenizer's; or a built-in name or Jinja text

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty; give preference files or a named chat source (chat-english)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.max_len < 4 or self.batch_size < 1:
            raise ValueError(f"data.max_len must be >= 4 and data.batch_size >= 1, got {self.max_len} and "
                             f"{self.batch_size}")


def load_items(data: PreferenceData, seed: int) -> list[PreferencePair] | list[UnpairedExample]:
    """Every item the sources name (named chat sources become pairs), the seeded subset of max_pairs."""
    items: list = []
    for source in data.sources:
        if source in NAMED_CHAT_SOURCES:
            items += pairs_from_conversations(load_conversations(source), seed=seed)
        elif source in NAMED_SENTIMENT_SOURCES:
            items += load_sentiment_pairs(source.split("-", 1)[1], seed=seed)
        else:
            items += load_preferences(source)
    kinds = {type(x).__name__ for x in items}
    if len(kinds) > 1:
        raise ValueError(f"data.sources mix paired and unpaired records ({', '.join(sorted(kinds))}); use one kind")
    if data.max_pairs and len(items) > data.max_pairs:
        keep = sorted(np.random.default_rng(seed).choice(len(items), data.max_pairs, replace=False).tolist())
        items = [items[i] for i in keep]
    return items


def unpair(pairs: Sequence[PreferencePair]) -> list[UnpairedExample]:
    """Pairs as KTO's unpaired examples: each chosen reply desirable, each rejected one undesirable."""
    return [x for p in pairs for x in (UnpairedExample(p.prompt, p.chosen, True), UnpairedExample(p.prompt,
                                                                                                 p.rejected, False))]


def prepare(data: PreferenceData, tokenizer, seed: int, *, unpaired: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, validation) encoded items; unpaired=True turns pairs into KTO examples after the split (both
    replies of a prompt stay on one side)."""
    items = load_items(data, seed)
    if data.val_fraction > 0:
        train, val = split_pairs(items, data.val_fraction, seed)
    else:
        train, val = list(items), []
    if unpaired:
        train, val = [unpair(x) if x and isinstance(x[0], PreferencePair) else x for x in (train, val)]
    elif items and isinstance(items[0], UnpairedExample):
        raise ValueError("this workflow needs paired data (prompt/chosen/rejected); the sources hold unpaired "
                         "(prompt/completion/label) records, which only KTO (loss=kto) trains on")
    encode = dict(max_len=data.max_len, chat_template=data.chat_template)
    return encode_pairs(train, tokenizer, **encode), encode_pairs(val, tokenizer, **encode) if val else []


def completion_rows(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows [prompt | completion | pad]: input_ids, attention_mask, completion_mask (1 from each
    row's prompt length to its end)."""
    T = max(map(len, seqs))
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    completion = np.zeros((len(seqs), T), dtype=np.int64)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[b, :len(s)], mask[b, :len(s)], completion[b, p:len(s)] = s, 1, 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "completion_mask": torch.from_numpy(completion)}


def collate(examples: Sequence[dict], indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs -> 2B rows (chosen first); unpaired -> B rows + label. See the module docstring."""
    if "chosen_ids" in examples[0]:
        seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + \
               [e["prompt_ids"] + e["rejected_ids"] for e in examples]
        lens = [len(e["prompt_ids"]) for e in examples] * 2
        batch = completion_rows(seqs, lens, pad_id)
    else:
        seqs = [e["prompt_ids"] + e["completion_ids"] for e in examples]
        if "kl_completion_ids" in examples[0]:  # KTO's mismatched rows: B more, after the real ones
            seqs += [e["prompt_ids"] + e["kl_completion_ids"] for e in examples]
        batch = completion_rows(seqs, [len(e["prompt_ids"]) for e in examples] * (len(seqs) // len(examples)), pad_id)
        batch["label"] = torch.tensor([int(e["label"]) for e in examples])
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)
    for key in examples[0]:
        if key.startswith("ref_"):  # cached reference log-probs, one row per sequence
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch


class PairLoader(EpochLoader):
    """Endless, resumable epochs (data.packing.EpochLoader) of `batch_size` encoded items, shuffled per epoch
    with the seed (shuffle=False: in order, the last batch may be short, as validation wants)."""

    def __init__(self, examples: Sequence[dict], *, batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(seed)
        if not examples:
            raise ValueError("no preference examples to batch")
        self.examples, self.batch_size, self.pad_id, self.shuffle = list(examples), int(batch_size), pad_id, shuffle
        if shuffle and len(self.examples) < self.batch_size:
            raise ValueError(f"{len(self.examples)} training items make no batch of data.batch_size="
                             f"{batch_size}; lower batch_size or add data")

    def _signature(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "n_examples": len(self.examples),
                "n_tokens": sum(sum(len(v) for k, v in e.items() if k.endswith("_ids")) for e in self.examples)}

    def _plan_epoch(self, epoch: int) -> list:
        n = len(self.examples)
        order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
        stop = n - n % self.batch_size if self.shuffle else n  # training drops the short last batch
        return [order[i:i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]

    def _make_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in indices], indices, self.pad_id)

    def epoch_batches(self) -> list[dict[str, torch.Tensor]]:
        """Every batch of one pass in order (the validation set)."""
        return [self._make_batch(d) for d in self._plan(0)]


def pad_id_of(tokenizer) -> int:
    """Padding never reaches a loss or attention (masks); the tokenizer's pad or EOS token is conventional."""
    for name in (getattr(tokenizer, "pad_token", None), getattr(tokenizer, "eos_token", None)):
        if name and tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name)
    return 0
