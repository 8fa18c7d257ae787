"""Pretraining: documents → tokenizer → token shards → packed batches → a model from a preset → the trainer.

    from llmlab.train import PretrainConfig, load_recipe, pretrain
    result = pretrain(load_recipe(PretrainConfig, "recipes/pretrain/micro.yaml", ["train.max_steps=200"]))

Everything lands in out_dir: config.yaml (the resolved recipe), tokenizer/ (trained here unless a path is
given), data/ (token shards, reused while documents and tokenizer are unchanged), checkpoints/, metrics.jsonl,
loss.png, result.json and final/ (model + tokenizer, loadable with llmlab.load). Running it again with the
same out_dir resumes from the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.model import ModelConfig, Transformer

from .config import TrainConfig, resolve_device
from .recipe import save_recipe
from .state import seed_everything
from .trainer import Trainer, TrainResult, lm_loss

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # EOS first; the ChatML pair makes SFT easy later


def _model_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


@dataclass
class PretrainData:
    sources: list[str] = field(default_factory=lambda: ["english", "chinese"])  # paths or named corpora
    text_key: str = "text"  # the text field of .jsonl/.json/.parquet records
    max_documents: int = 0  # 0: all; else a seeded random subset of this many documents (quick runs)
    val_fraction: float = 0.02  # documents held out for validation
    seq_len: int = 256
    batch_size: int = 8
    mask_documents: bool = False  # attention stays inside each packed document
    val_tokens: int = 0  # 0: all validation tokens; else at most this many (evaluation cost)


@dataclass
class TokenizerSpec:
    path: str | None = None  # a tokenizer to load (tokenizer.json or a directory); None: train one
    kind: str = "bpe"  # bpe | wordpiece | unigram, when training
    vocab_size: int = 8192
    train_chars: int = 3_000_000  # train on at most this many characters of training documents (seeded sample)
    special_tokens: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    seed: int = 0
    preset: str = "micro"  # a ModelConfig preset; `model` overrides its fields
    model: dict[str, Any] = field(default_factory=dict, metadata={"keys": _model_keys})
    data: PretrainData = field(default_factory=PretrainData)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.train.validate()
        if self.data.seq_len < 2 or self.data.batch_size < 1:
            raise ValueError(f"data.seq_len must be >= 2 and data.batch_size >= 1, got {self.data.seq_len} and "
                             f"{self.data.batch_size}")
        if not self.data.sources:
            raise ValueError("data.sources is empty; name corpora (english, chinese) or give paths")


def pretrain(cfg: PretrainConfig) -> TrainResult:
    from llmlab.data import PackedLoader, tokenize_to_shards
    from llmlab.io import save_checkpoint

    _check_model(cfg)  # before any data work: a wrong size should fail in a second, not after tokenizing
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    progress = cfg.train.progress

    train_docs, val_docs = split_corpus(cfg)
    tokenizer = prepare_tokenizer(cfg, train_docs, out)

    train_shards = tokenize_to_shards(train_docs, tokenizer, out / "data" / "train", progress=progress)
    model_cfg = build_model_config(cfg, len(tokenizer))
    if len(train_shards) < cfg.data.seq_len * cfg.data.batch_size:
        raise ValueError(f"the training documents make {len(train_shards)} tokens, fewer than one batch of "
                         f"data.batch_size={cfg.data.batch_size} × data.seq_len={cfg.data.seq_len}; add data or "
                         "lower them")
    val_batches, bytes_per_token = _validation(cfg, val_docs, tokenizer, out)
    loader = PackedLoader(train_shards, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=cfg.seed,
                          mask_documents=cfg.data.mask_documents)
    device = resolve_device(cfg.train.device, cfg.train.threads)
    seed_everything(cfg.seed)  # again: whether the tokenizer was trained or loaded, the init is the same
    model = Transformer(model_cfg).to(device)
    trainer = Trainer(model, loader, cfg.train, out_dir=out, loss_fn=lm_loss, val_batches=val_batches,
                      val_bytes_per_token=bytes_per_token, tokenizer=tokenizer)
    if progress:
        trainer_note(f"pretraining {model_cfg.num_parameters() / 1e6:.2f}M parameters on {len(train_shards):,} "
                     f"tokens ({len(train_docs):,} documents); validation {len(val_docs):,} documents; "
                     f"{trainer.precision} on {device}; out_dir {out}")
    result = trainer.fit()
    save_checkpoint(model, out / "final", tokenizer=tokenizer)
    return result


def _check_model(cfg: PretrainConfig) -> None:
    probe = ModelConfig.preset(cfg.preset, **cfg.model)  # validates the overrides too
    if cfg.data.seq_len > probe.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} is above the model's max_seq_len={probe.max_seq_len}; "
                         f"lower data.seq_len or set model.max_seq_len={cfg.data.seq_len}")


def build_model_config(cfg: PretrainConfig, n_tokens: int) -> ModelConfig:
    """The preset with the recipe's overrides; vocab_size fits the tokenizer (rounded up to a multiple of 64
    for matmul-friendly shapes) unless the recipe sets a larger one."""
    fitted = -(-n_tokens // 64) * 64
    vocab = cfg.model.get("vocab_size", fitted)
    if vocab < n_tokens:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {n_tokens} tokens; remove the "
                         "override (it is set from the tokenizer) or raise it")
    return ModelConfig.preset(cfg.preset, **{**cfg.model, "vocab_size": vocab})


def split_corpus(cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    """(training, validation) documents: the sources read, the seeded subset of max_documents, the seeded split."""
    from llmlab.data import read_documents, split_documents

    docs = read_documents(list(cfg.data.sources), text_key=cfg.data.text_key)
    if cfg.data.max_documents and len(docs) > cfg.data.max_documents:
        keep = sorted(random.Random(cfg.seed).sample(range(len(docs)), cfg.data.max_documents))
        docs = [docs[i] for i in keep]
    return split_documents(docs, cfg.data.val_fraction, cfg.seed)


def prepare_tokenizer(cfg: PretrainConfig, train_docs: list[str], out: Path):
    """The tokenizer of a run: cfg.tokenizer.path, else the one out/tokenizer holds, else one trained on
    train_docs and saved there."""
    from llmlab import tokenizer as tokenizers

    spec = cfg.tokenizer
    if spec.path:
        return tokenizers.load(spec.path)
    saved = out / "tokenizer"
    if (saved / "tokenizer.json").exists():  # trained by an earlier (or the interrupted) run of this out_dir
        return tokenizers.load(saved)
    texts, chars = [], 0
    for i in random.Random(cfg.seed).sample(range(len(train_docs)), len(train_docs)):
        texts.append(train_docs[i])
        chars += len(train_docs[i])
        if chars >= spec.train_chars:
            break
    if cfg.train.progress:
        trainer_note(f"training a {spec.kind} tokenizer of {spec.vocab_size} tokens on {chars / 1e6:.1f}M characters")
    tok = tokenizers.train(texts, spec.kind, vocab_size=spec.vocab_size, special_tokens=spec.special_tokens,
                           progress=cfg.train.progress)
    if spec.special_tokens:
        tok.eos_token = spec.special_tokens[0]
    if "<|im_start|>" in spec.special_tokens and "<|im_end|>" in spec.special_tokens and tok.chat_template is None:
        from llmlab.tokenizer.chat import CHATML

        tok.chat_template = CHATML  # the Jinja text, so tokenizer_config.json works in transformers too
    # into a temporary directory renamed into place: a kill never leaves tokenizer.json without its config
    tmp = out / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok.save(tmp)
    shutil.rmtree(saved, ignore_errors=True)
    os.rename(tmp, saved)
    # use what was written: a resumed run loads it from there, and both must tokenize (and fingerprint) alike
    return tokenizers.load(saved)


def _validation(cfg: PretrainConfig, val_docs: list[str], tokenizer, out: Path) -> tuple[list[dict], float | None]:
    """Validation batches and bytes per token of the validation text (for bits per byte):
    bytes_per_token = UTF-8 bytes of the validation documents / tokens they encode to (EOS included)."""
    from llmlab.data import tokenize_to_shards, validation_batches

    if not val_docs:
        return [], None
    shards = tokenize_to_shards(val_docs, tokenizer, out / "data" / "val", progress=cfg.train.progress)
    batches = validation_batches(shards, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                 mask_documents=cfg.data.mask_documents)
    bytes_per_token = sum(len(d.encode("utf-8")) for d in val_docs) / max(1, len(shards))
    if cfg.data.val_tokens:
        keep = max(1, -(-cfg.data.val_tokens // (cfg.data.seq_len * cfg.data.batch_size)))
        if keep < len(batches):  # a seeded choice of batches spread over the whole validation set
            picked = sorted(random.Random(cfg.seed).sample(range(len(batches)), keep))
            batches = [batches[i] for i in picked]
    return batches, bytes_per_token


def trainer_note(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)
