"""Layer-wise learning-rate decay (LLRD) as AdamW parameter groups.

Lower layers of a pretrained Transformer hold general features that fine-tuning should move little; upper
layers are more task-specific. ELECTRA (Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as
Discriminators Rather Than Generators", arXiv:2003.10555) and BEiT (Bao et al. 2021, arXiv:2106.08254)
therefore scale the learning rate geometrically with depth. With L blocks, numbered i = 0 (bottom) .. L-1:

    embeddings (token, token-type, position tables, embedding norm):   base_lr · decay^(L+1)
    block i (everything under blocks.{i}, adapters/LoRA inside it too): base_lr · decay^(L-i)
    the rest (final norm, head, parameters added outside the blocks):  base_lr

so the top block gets base_lr · decay and each step down multiplies by decay once more (BEiT's
`layer_id`: embeddings 0, block i -> i+1, head L+1; scale = decay^(L+1 - layer_id)).

Weight decay follows train/optim.py's rule: only matrices of linear layers decay (p.dim() >= 2 and not an
nn.Embedding table); norm gains, biases and embeddings get weight_decay 0. A tied embedding/LM-head tensor
appears once, as the embedding (as in parameter_groups). Only parameters with requires_grad are included, so
the same call serves full fine-tuning and partial setups (frozen base + adapters, LoRA, a new head ...);
L counts every block of the model, frozen or not, so a block's lr does not depend on what is frozen.

Each group carries "lr" and "initial_lr" (= that lr; train/optim.py's Schedule multiplies "initial_lr"), plus
"lr_scale" and "layer" (embeddings | block.{i} | head) for logging. torch.optim.AdamW keeps the extra keys.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

EMBEDDINGS = ("tok_emb", "type_emb", "pos_emb", "emb_norm")


def _transformer_prefix(model: nn.Module) -> tuple[str, int]:
    """Module path of the Transformer inside `model` ("" for the model itself) and its number of blocks."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(getattr(m, "blocks", None), nn.ModuleList) and hasattr(m, "cfg")]
    if len(found) != 1:
        raise ValueError(f"layerwise_lr_groups needs exactly one Transformer (a module with .blocks and .cfg) in "
                         f"the model; found {len(found)}: {[n for n, _ in found]}")
    name, m = found[0]
    return (name + "." if name else ""), len(m.blocks)


def layer_of(model: nn.Module) -> dict[str, tuple[str, int]]:
    """parameter name -> (layer label, exponent e) with lr = base_lr · decay^e, for every parameter."""
    prefix, L = _transformer_prefix(model)
    out = {}
    for name, _ in model.named_parameters():
        if not name.startswith(prefix):
            out[name] = ("head", 0)
            continue
        rest = name[len(prefix):]
        m = re.match(r"blocks\.(\d+)\.", rest)
        if m is not None:
            i = int(m.group(1))
            out[name] = (f"block.{i}", L - i)
        elif rest.split(".", 1)[0] in EMBEDDINGS:
            out[name] = ("embeddings", L + 1)
        else:
            out[name] = ("head", 0)
    return out


def layerwise_lr_groups(model: nn.Module, base_lr: float, decay: float,
                        weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay (see the module docstring): one group per (layer,
    decayed or not), empty groups left out, ordered embeddings, block 0 .. L-1, head; decayed before not."""
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1] (1 = no decay), got {decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    layers = layer_of(model)
    _, L = _transformer_prefix(model)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    order = ["embeddings"] + [f"block.{i}" for i in range(L)] + ["head"]
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # yields a shared (tied) tensor once, under its first name
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        label, e = layers[name]
        decayed = p.dim() >= 2 and id(p) not in embedding_ids
        if (label, decayed) not in groups:
            lr = base_lr * decay ** e
            groups[(label, decayed)] = {"params": [], "lr": lr, "initial_lr": lr, "lr_scale": decay ** e,
                                        "weight_decay": weight_decay if decayed else 0.0, "layer": label}
        groups[(label, decayed)]["params"].append(p)
    return [groups[(label, d)] for label in order for d in (True, False) if (label, d) in groups]
