"""Supervised fine-tuning: a model and its tokenizer → conversations encoded with the chat template (loss on
assistant tokens only) → padded or packed batches → the same trainer as pretraining.

    from llmlab.train import SFTConfig, load_recipe, sft
    result = sft(load_recipe(SFTConfig, "recipes/sft/smollm2.yaml", ["data.max_conversations=200"]))

`model` is anything llmlab.load reads: a named asset ("smollm2-135m-instruct"), a .gguf file, a Hugging Face
directory or an llmlab checkpoint (e.g. a pretraining run's out_dir/final). out_dir gets config.yaml,
checkpoints/, metrics.jsonl, loss.png, result.json and final/ (model + tokenizer).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig, resolve_device
from .pretraining import trainer_note
from .recipe import save_recipe
from .state import seed_everything
from .trainer import Trainer, TrainResult, lm_loss


@dataclass
class SFTData:
    sources: list[str] = field(default_factory=lambda: ["chat-english"])  # files, directories or named sources
    format: str = "auto"  # auto | alpaca | sharegpt | messages
    max_conversations: int = 0  # 0: all; else a seeded random subset of this many (quick runs)
    val_fraction: float = 0.1  # conversations held out for validation
    max_len: int = 512  # tokens per conversation; longer ones are truncated
    batch_size: int = 8
    pack: bool = False  # pack conversations into rows of seq_len tokens (document_ids keep them apart)
    seq_len: int = 0  # row length when packing; 0: max_len
    chat_template: str | None = None  # None: the tokenizer's; or a built-in name (chatml, llama3) or Jinja text


def _sft_train_defaults() -> TrainConfig:
    # fine-tuning moves a trained model a little: a small lr, short warm-up, no decay on top of the pretrained
    # weights' own scale, evaluation before the first step as the baseline
    return TrainConfig(max_steps=200, lr=5e-5, warmup_steps=10, weight_decay=0.0, eval_every=50,
                       checkpoint_every=100, keep_last=1, eval_at_start=True)


@dataclass
class SFTConfig:
    out_dir: str = "runs/sft"
    seed: int = 0
    model: str = "smollm2-135m-instruct"
    data: SFTData = field(default_factory=SFTData)
    train: TrainConfig = field(default_factory=_sft_train_defaults)

    def __post_init__(self) -> None:
        self.train.validate()
        if not self.data.sources:
            raise ValueError("data.sources is empty; give conversation files or named sources (chat-english)")
        if self.data.max_len < 2 or self.data.batch_size < 1:
            raise ValueError(f"data.max_len must be >= 2 and data.batch_size >= 1, got {self.data.max_len} and "
                             f"{self.data.batch_size}")


def sft(cfg: SFTConfig) -> TrainResult:
    from llmlab.api import load
    from llmlab.data import SFTLoader, encode_conversations, load_conversations
    from llmlab.io import save_checkpoint

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    progress = cfg.train.progress

    device = resolve_device(cfg.train.device, cfg.train.threads)
    model, tok = load(cfg.model, device=device)
    if tok is None:
        raise ValueError(f"{cfg.model} has no tokenizer; SFT needs one to apply the chat template (save the model "
                         "with its tokenizer)")
    if tok.chat_template is None and cfg.data.chat_template is None:
        raise ValueError(f"the tokenizer of {cfg.model} has no chat template; set data.chat_template (a built-in: "
                         "chatml, llama3; or Jinja text)")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # fp32 master weights: AdamW updates vanish in bf16; autocast handles speed
    data = cfg.data
    if data.max_len > model.cfg.max_seq_len or (data.pack and data.seq_len > model.cfg.max_seq_len):
        raise ValueError(f"data.max_len={data.max_len} (or data.seq_len={data.seq_len}) is above the model's "
                         f"max_seq_len={model.cfg.max_seq_len}; lower it")

    convs = load_conversations(list(data.sources), format=data.format)
    rng = random.Random(cfg.seed)
    order = rng.sample(range(len(convs)), len(convs))  # a seeded shuffle, then the subset and the split
    if data.max_conversations:
        order = order[: data.max_conversations]
    n_val = min(max(1, round(len(order) * data.val_fraction)), len(order) - 1) if data.val_fraction > 0 and \
        len(order) >= 2 else 0
    val_convs = [convs[i] for i in order[:n_val]]
    train_convs = [convs[i] for i in order[n_val:]]
    encode = dict(max_len=data.max_len, chat_template=data.chat_template, progress=progress)
    train_examples = encode_conversations(train_convs, tok, **encode)
    pad_id = _pad_id(tok)
    seq_len = data.seq_len or data.max_len
    loader = SFTLoader(train_examples, batch_size=data.batch_size, seed=cfg.seed, pack=data.pack,
                       seq_len=seq_len if data.pack else None, pad_id=pad_id)
    val_batches = []
    if val_convs:
        val_loader = SFTLoader(encode_conversations(val_convs, tok, **encode), batch_size=data.batch_size,
                               shuffle=False, pack=data.pack, seq_len=seq_len if data.pack else None, pad_id=pad_id,
                               drop_last=False)
        val_batches = list(itertools.islice(iter(val_loader), val_loader.batches_in_epoch(0)))

    template = data.chat_template

    def encode_prompt(text: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       chat_template=template)

    model.train()
    trainer = Trainer(model, loader, cfg.train, out_dir=out, loss_fn=lm_loss, val_batches=val_batches, tokenizer=tok,
                      encode_prompt=encode_prompt)
    if progress:
        trainer_note(f"SFT of {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
                     f"{len(train_examples):,} conversations, {len(val_convs):,} held out; {trainer.precision} on "
                     f"{device}; out_dir {out}")
    result = trainer.fit()
    save_checkpoint(model, out / "final", tokenizer=tok)
    return result


def _pad_id(tok) -> int:
    """Padding never reaches the loss (labels -100) or attention (attention_mask 0); any valid id works, the
    tokenizer's pad (or EOS) token is the conventional one."""
    for name in (tok.pad_token, tok.eos_token):
        if name and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return 0
