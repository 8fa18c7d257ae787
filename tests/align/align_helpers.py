"""What the alignment workflow tests share: a nano base model saved with a small ChatML BPE tokenizer, and a
toy preference file whose preferred replies are learnable in a few steps (chosen: a colour, rejected: a
number)."""

import json
import random
from pathlib import Path

import torch

from llmlab.io import save_checkpoint
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train
from llmlab.tokenizer.chat import get_template

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
SUBJECTS = ["the sky", "a leaf", "the sea", "a rose", "the sun", "a car", "the wall", "a cat", "my hat", "a door"]


def toy_pairs(n: int = 120, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"What colour is {rng.choice(SUBJECTS)} number {i}?",
             "chosen": f"It is {rng.choice(COLOURS)}.", "rejected": f"It is {rng.choice(NUMBERS)}."} for i in range(n)]


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_base(root: Path, seed: int = 0) -> Path:
    """A random nano model + ChatML tokenizer trained on the toy text, saved as an llmlab checkpoint."""
    text = " ".join(json.dumps(r) for r in toy_pairs(200)) + " user assistant system"
    tok = train([text] * 2, kind="bpe", vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"])
    tok.chat_template = get_template("chatml")
    tok.eos_token = "<|im_end|>"
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("nano", vocab_size=tok.vocab_size, max_seq_len=128))
    return save_checkpoint(model, root / "base", tokenizer=tok)


def completion_sft_step(model, opt, rows) -> None:
    """One AdamW step of completion-only NLL (mean per completion token) on rows of (prompt ids, completion
    ids): the quick SFT the online-RL tests start from."""
    from llmlab.align.logprobs import token_logprobs
    from llmlab.align.pairs import completion_rows

    b = completion_rows([p + c for p, c in rows], [len(p) for p, _ in rows], pad_id=0)
    lp = token_logprobs(model.train(), b["input_ids"], b["attention_mask"], completion_mask=b["completion_mask"])
    (-lp.sum() / b["completion_mask"][:, 1:].sum()).backward()
    opt.step()
    opt.zero_grad()
