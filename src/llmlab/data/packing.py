"""Pretraining batches: the token stream of a TokenShards cut into rows of seq_len tokens.

Documents are concatenated (EOS-separated by tokenize_to_shards) and row r holds tokens
[r * seq_len, (r + 1) * seq_len). labels equal input_ids (the model shifts them: position t learns labels[t+1]),
so each row trains seq_len - 1 predictions. Each epoch visits the rows in a permutation drawn from
(seed, epoch); the loader is an endless iterator over epochs whose position (epoch, batch) is its whole state,
so a restored loader yields exactly the batches an uninterrupted one would have.

With mask_documents, rows also carry document_ids (the documents in a row numbered 0, 1, 2, ...): the model
then keeps attention inside each document and restarts positions at its start, and the label of each
document's first token in the row (except the row's first) is -100, so no document learns to predict the
next one's first token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from .shards import TokenShards

IGNORE = -100  # the label the model's loss ignores


class EpochLoader:
    """Endless epochs of batches; the subclass plans an epoch (a list of batch descriptions fixed by seed and
    epoch) and builds a batch from a description. State = (epoch, next batch in it) + a signature of the
    configuration, checked on load so a state is never applied to a different loader."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.epoch = 0
        self.batch = 0
        self._plan_cache: tuple[int, list] | None = None

    # subclasses implement these
    def _plan_epoch(self, epoch: int) -> list:
        raise NotImplementedError

    def _make_batch(self, description) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _signature(self) -> dict:
        raise NotImplementedError

    def _plan(self, epoch: int) -> list:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._plan_epoch(epoch))
        return self._plan_cache[1]

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])  # a fresh, independent stream per (seed, epoch)

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """How many batches epoch (default: the current one) has."""
        return len(self._plan(self.epoch if epoch is None else epoch))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            plan = self._plan(self.epoch)
            if self.batch >= len(plan):
                self.epoch, self.batch = self.epoch + 1, 0
                continue
            batch = self._make_batch(plan[self.batch])
            self.batch += 1  # advanced before the yield: state_dict() taken now points at the next batch
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, **self._signature()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._signature()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            details = ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"this loader state belongs to a different configuration ({details}); build the "
                             "loader with the settings and data of the saved run to resume it")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class PackedLoader(EpochLoader):
    """Batches {"input_ids", "labels"} (long [batch_size, seq_len]; + "document_ids" with mask_documents).

    drop_last=True drops the stream's last partial row and each epoch's last partial batch (every batch has
    tokens_per_batch tokens); drop_last=False keeps both, the short row padded with id 0 and label -100."""

    def __init__(self, shards: TokenShards, *, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 mask_documents: bool = False, drop_last: bool = True):
        super().__init__(seed)
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got seq_len={seq_len}, batch_size={batch_size}")
        self.shards, self.seq_len, self.batch_size = shards, int(seq_len), int(batch_size)
        self.shuffle, self.mask_documents, self.drop_last = shuffle, mask_documents, drop_last
        n = len(shards)
        self.rows_per_epoch = n // self.seq_len if drop_last else math.ceil(n / self.seq_len)
        self.tokens_per_batch = self.batch_size * self.seq_len
        if self.rows_per_epoch < (self.batch_size if drop_last else 1):
            raise ValueError(f"the corpus has {n} tokens = {self.rows_per_epoch} rows of seq_len={self.seq_len}, "
                             f"fewer than batch_size={self.batch_size}; lower batch_size or seq_len, or add data")

    def _signature(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "n_tokens": len(self.shards), "fingerprint": self.shards.fingerprint}

    def _plan_epoch(self, epoch: int) -> list[np.ndarray]:
        rows = self._rng(epoch).permutation(self.rows_per_epoch) if self.shuffle else np.arange(self.rows_per_epoch)
        stop = len(rows) - len(rows) % self.batch_size if self.drop_last else len(rows)
        return [rows[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def _make_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return make_rows(self.shards, rows, self.seq_len, self.mask_documents)


def make_rows(shards: TokenShards, rows, seq_len: int, mask_documents: bool) -> dict[str, torch.Tensor]:
    """The batch of the given row numbers; a row that runs past the stream's end is padded (id 0, label -100)."""
    B, n = len(rows), len(shards)
    ids = np.zeros((B, seq_len), dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE, dtype=np.int64)
    docs = np.zeros((B, seq_len), dtype=np.int64) if mask_documents else None
    for b, r in enumerate(rows):
        start = int(r) * seq_len
        length = min(seq_len, n - start)
        ids[b, :length] = shards.tokens(start, length)
        labels[b, :length] = ids[b, :length]
        if mask_documents:
            d = shards.document_index(np.arange(start, start + length))
            d = d - d[0]  # renumber from 0 inside the row
            docs[b, :length] = d
            docs[b, length:] = d[-1] + 1  # padding is a document of its own: nothing attends across to it
            labels[b, 1:length][d[1:] != d[:-1]] = IGNORE  # a document's first token is not the last one's target
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    if mask_documents:
        batch["document_ids"] = torch.from_numpy(docs)
    return batch


def validation_batches(shards: TokenShards, *, seq_len: int, batch_size: int,
                       mask_documents: bool = False) -> list[dict[str, torch.Tensor]]:
    """Every row of the stream once, in order: the last row keeps the tail (padded with id 0, labels -100)
    and the last batch may have fewer rows, so every token but each row's first is scored exactly once."""
    loader = PackedLoader(shards, seq_len=seq_len, batch_size=batch_size, shuffle=False,
                          mask_documents=mask_documents, drop_last=False)
    return [loader._make_batch(rows) for rows in loader._plan(0)]
