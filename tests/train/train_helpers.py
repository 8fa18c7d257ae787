"""Shared pieces of the trainer tests: a tiny resumable loader, a tiny corpus, fast settings (imported by the
tests as `train_helpers`; the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import random

import torch

FAST = dict(precision="fp32", progress=False, plot=False, peak_flops=1e11)  # no peak measurement, no bar


class ToyLoader:
    """Endless batches from a fixed random token table, with the state_dict()/load_state_dict() contract of
    the data loaders: the state is the position, so a restored loader continues with the same batches."""

    def __init__(self, n_rows: int = 32, seq_len: int = 32, batch_size: int = 4, vocab: int = 512, seed: int = 0,
                 mask_some: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n_rows, seq_len), generator=g)
        self.labels = self.ids.clone()
        if mask_some:  # rows with different numbers of labelled tokens: micro-batch weights then differ
            for r in range(n_rows):
                self.labels[r, : (r * 7) % (seq_len - 4)] = -100
        self.batch_size, self.pos = batch_size, 0

    def __iter__(self):
        while True:
            n = len(self.ids) // self.batch_size
            i = self.pos % n
            self.pos += 1
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield {"input_ids": self.ids[rows], "labels": self.labels[rows]}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


WORDS = ("the whale ship sea captain sailor harpoon deck ocean wind storm boat crew oil night morning "
         "white great old young long dark").split()


def write_corpus(path, n_docs: int = 80, seed: int = 0):
    """A small corpus with structure a nano model learns within a few dozen steps (a tiny grammar)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            sents = []
            for _ in range(rng.randint(4, 10)):
                a, b, c = rng.sample(WORDS, 3)
                sents.append(f"The {a} saw the {b} near the {c}.")
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")
    return path


def nano_overrides(corpus, out_dir, **extra) -> list[str]:
    """key=value overrides that make recipes/pretrain/nano.yaml a seconds-long run on the tiny corpus."""
    base = {"out_dir": str(out_dir), "data.sources": f"[{corpus}]", "data.seq_len": 32, "data.batch_size": 4,
            "data.val_fraction": 0.1, "tokenizer.vocab_size": 300, "tokenizer.train_chars": 100000,
            "train.max_steps": 16, "train.warmup_steps": 2, "train.lr": 3e-3, "train.log_every": 1,
            "train.eval_every": 4, "train.checkpoint_every": 3, "train.keep_last": 100, "train.sample_prompts": "[]",
            "train.threads": 1, **{f"train.{k}": v for k, v in FAST.items()}}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
