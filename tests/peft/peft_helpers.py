"""What the PEFT tests share: a seeded nano model, a batch of ids, no-grad logits."""

import torch

from llmlab.model import ModelConfig, Transformer


def model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("nano", **overrides)).eval()


def ids(seed: int = 1, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(m, x):
    with torch.no_grad():
        return m(x).logits
