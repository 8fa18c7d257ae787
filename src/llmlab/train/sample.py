"""Sample generations during training: a short greedy or top-k loop over llmlab's KVCache.

The inference engine has the full sampler; this is the few lines a training run needs to show what the model
writes. It draws from its own torch.Generator, so sampling never moves the RNG that training (and an exact
resume) depends on.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.model import KVCache


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int = 48, top_k: int = 0,
             temperature: float = 1.0, stop_ids: tuple[int, ...] = (), seed: int = 0) -> list[int]:
    """The new token ids after prompt_ids. top_k=0 or temperature=0: greedy; else sample among the top_k
    logits / temperature. Stops at a stop id (kept in the output) or at the model's max_seq_len."""
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt (at least one token id)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None) or len(prompt_ids) + max_new_tokens
    ids = list(prompt_ids)[-limit:]
    cache = KVCache()
    step_input = torch.tensor([ids], device=device)
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            if len(ids) >= limit:
                break
            logits = model(step_input, cache=cache).logits[0, -1].float()
            if top_k > 0 and temperature > 0:
                vals, idx = logits.topk(min(top_k, logits.numel()))
                probs = torch.softmax(vals / temperature, dim=-1)
                nxt = int(idx[torch.multinomial(probs, 1, generator=g)])
            else:
                nxt = int(logits.argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in stop_ids:
                break
            step_input = torch.tensor([[nxt]], device=device)
    finally:
        model.train(was_training)
    return out
