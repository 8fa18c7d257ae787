"""BitFit on llmlab's Transformer: train only the bias terms.

BitFit (Ben Zaken, Ravfogel & Goldberg 2021, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", arXiv:2106.10199) freezes every weight matrix and trains only the
additive biases, y = W x + b with W frozen and b learned: about 0.1% of a BERT's parameters, competitive with
full fine-tuning on small/medium data. Trained biases here are every parameter called `bias`: Linear biases
(qkv, attention output, MLP up/down, LM head) and LayerNorm biases.

Modern decoders (Llama, Mistral, ...) have no biases at all, so BitFit would train nothing. `add_bias` names
Linear layers that get a NEW bias where they have none, initialized to ZERO, so the model's outputs are unchanged
until training moves it (y = W x + 0). Names are the same as LoRA's targets: Hugging Face vocabulary (q k v o
gate up down) or regexes over our module names. Our fused layers have one bias for the whole layer, so asking
for any part of `attn.qkv` (say "v") adds and trains the bias of all of its q, k and v rows (likewise gate/up).
The added biases are NOT reflected in `model.cfg` (qkv_bias, mlp_bias, ...): they are recorded in
`model.bitfit_added`; a checkpoint of such a model needs the config flags set by the caller to reload.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import resolve_targets


def add_zero_biases(model: nn.Module, patterns: tuple[str, ...] | str) -> list[str]:
    """Give each Linear that the patterns select a zero bias if it has none; returns the modules changed."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    modules = dict(model.named_modules())
    added = []
    for name in resolve_targets(model, tuple(patterns)):
        layer = modules[name]
        if name == "head.proj":
            raise ValueError("a bias on the LM head is not added by BitFit (set ModelConfig.lm_head_bias)")
        if not isinstance(layer, nn.Linear):  # e.g. a LoRA-wrapped layer
            raise ValueError(f"{name} is a {type(layer).__name__}, not a plain nn.Linear; add biases first")
        if layer.bias is None:
            w = layer.weight
            layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=w.dtype, device=w.device))
            added.append(name)
    model.bitfit_added = sorted(set(getattr(model, "bitfit_added", [])) | set(added))
    return added


def apply_bitfit(model: nn.Module, add_bias: tuple[str, ...] | str = ()) -> int:
    """Freeze every parameter except the biases (after adding zero biases to the layers `add_bias` selects);
    returns the number of trainable parameters (a shared tensor counts once)."""
    if add_bias:
        add_zero_biases(model, add_bias)
    trainable = 0
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        is_bias = name.rsplit(".", 1)[-1] == "bias"
        p.requires_grad_(is_bias)
        trainable += p.numel() if is_bias else 0
    if trainable == 0:
        raise ValueError("the model has no bias parameters: pass add_bias=(...) (e.g. ('q', 'o', 'up', 'down')) "
                         "to add zero-initialized biases for BitFit to train")
    return trainable
