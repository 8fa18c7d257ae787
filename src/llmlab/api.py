"""The three calls most users start with: load a model and its tokenizer from anywhere, save them, embed text.

    model, tok = llmlab.load("smollm2-135m-instruct")   # a named asset, an HF directory, a .gguf, an llmlab checkpoint
    llmlab.save(model, tok, "out/dir", format="llmlab" | "hf")
    emb = llmlab.embed(model, tok, ["a sentence", ...])  # encoder models: [n, dim], L2-normalized
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .io import load_checkpoint, load_hf, save_checkpoint, save_hf
from .io.checkpoint import CheckpointError, build_model, read_json
from .io.hf import config_from_hf, state_dict_from_hf
from .model import Transformer
from .tokenizer import Tokenizer
from .tokenizer import load as load_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")


def _tokenizer_in(directory: Path) -> Tokenizer | None:
    return load_tokenizer(directory) if any((directory / f).is_file() for f in _TOKENIZER_FILES) else None


class _ReadOnce(dict):
    """A state dict that lets go of each tensor when it is read: fusing q/k/v and gate/up then never holds
    the parts and the fused copy of every layer at once."""

    def __getitem__(self, key):
        return self.pop(key)


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu") -> tuple[Transformer, Tokenizer]:
    """A llama-architecture GGUF: weights dequantized, rotary rows un-permuted, tokenizer and chat template
    rebuilt from the metadata."""
    from .io.gguf import read_gguf

    g = read_gguf(path, dtype=dtype or torch.float32)
    cfg = config_from_hf(g.hf_config)
    hf_sd = _ReadOnce(g.state_dict)
    g.state_dict.clear()
    model = build_model(cfg, state_dict_from_hf(hf_sd, cfg, g.hf_config), source=Path(path), device=device)
    config = {**g.tokenizer_config, "chat_template": g.chat_template}
    return model, Tokenizer.from_hf_dict(g.tokenizer_json, config)


def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None,
         device="cpu") -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) from a named asset ("smollm2-135m-instruct", "minilm-l6"), a .gguf file, a Hugging
    Face model directory or an llmlab checkpoint directory. The tokenizer is None when the directory has none."""
    from .io.assets import ASSETS, asset_path

    source = str(name_or_path)
    path = asset_path(source) if source in ASSETS else Path(source)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype, device=device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory, a .gguf file or a named asset "
                                f"({', '.join(ASSETS)})")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: expected a Hugging Face model directory or an llmlab "
                              "checkpoint")
    if "model_type" in read_json(config_file) or "architectures" in read_json(config_file):
        return load_hf(path, dtype=dtype, device=device), _tokenizer_in(path)
    return load_checkpoint(path, dtype=dtype, device=device)


def save(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike, *, format: str = "llmlab") -> None:
    """Write model (and tokenizer) to a directory: format="llmlab" (our checkpoint) or "hf" (a directory that
    transformers' from_pretrained loads with identical outputs)."""
    if format == "llmlab":
        save_checkpoint(model, path, tokenizer=tokenizer)
    elif format == "hf":
        save_hf(model, path, tokenizer=tokenizer)
    else:
        raise ValueError(f"unknown format {format!r}: use 'llmlab' or 'hf'")


@torch.no_grad()
def embed(model: Transformer, tok: Tokenizer, texts: Sequence[str], *, pooling: str = "mean", normalize: bool = True,
          batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
    """Sentence embeddings from an encoder, as sentence-transformers computes them: the final hidden states
    pooled over real tokens (mean, or the first token for "cls"), then L2-normalized. [len(texts), dim]."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"unknown pooling {pooling!r}: use 'mean' or 'cls'")
    if isinstance(texts, str):
        texts = [texts]
    max_length = max_length or model.cfg.max_seq_len
    pad = tok.token_to_id(tok.pad_token) if tok.pad_token else 0
    device = next(model.parameters()).device
    out = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        ids = [tok.encode(t)[:max_length] for t in texts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        hidden = model(input_ids, mask).hidden_states
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(out)
