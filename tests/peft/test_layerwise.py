"""Layer-wise lr decay groups: every trainable parameter in exactly one group with lr = base · decay^e
(embeddings e = L+1, block i e = L-i, head/final norm e = 0), weight decay on linear matrices only (the same
split as train/optim.py's parameter_groups), frozen parameters left out, and an AdamW step runs."""

from __future__ import annotations

import pytest
import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.peft.adapters import AdapterConfig, add_adapter
from llmlab.peft.layerwise import layerwise_lr_groups
from llmlab.train.optim import Schedule, parameter_groups

BASE, DECAY, WD = 1e-3, 0.8, 0.1


def model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", n_layers=3, **overrides))


def expected_lr(name: str, L: int) -> float:
    """Written out from the rule, independently of the implementation's name matching."""
    top = name.split(".")[0]
    if top in ("tok_emb", "type_emb", "pos_emb", "emb_norm"):
        return BASE * DECAY ** (L + 1)
    if top == "blocks":
        return BASE * DECAY ** (L - int(name.split(".")[1]))
    assert top in ("norm", "head"), name
    return BASE


def check_groups(m, groups):
    """Each trainable parameter exactly once, at its expected lr; returns {id: group}."""
    L = m.cfg.n_layers
    where = {}
    for g in groups:
        assert g["params"] and g["lr"] == g["initial_lr"]
        for p in g["params"]:
            assert id(p) not in where, "a parameter in two groups"
            where[id(p)] = g
    trainable = {id(p): n for n, p in m.named_parameters() if p.requires_grad}  # a tied tensor once
    assert set(where) == set(trainable)
    for pid, n in trainable.items():
        assert where[pid]["lr"] == pytest.approx(expected_lr(n, L), rel=1e-12), n
    # weight decay exactly where train/optim.py puts it
    ref = parameter_groups(m, WD)
    decayed = {id(p) for g in ref if g["weight_decay"] > 0 for p in g["params"]}
    assert {pid for pid, g in where.items() if g["weight_decay"] == WD} == decayed
    assert all(g["weight_decay"] in (0.0, WD) for g in groups)
    return where


def adamw_step(m, groups):
    opt = torch.optim.AdamW(groups, lr=123.0)  # the per-group lr wins over the default
    Schedule("cosine", total_steps=10, warmup_steps=2).apply(opt, 0)  # uses each group's initial_lr
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    m(x, labels=x).loss.backward()
    opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # exactly the trainable ones moved
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.5)  # warm-up step 0 of 2


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_embeddings=True),
    dict(norm_placement="post", norm="layernorm", norm_bias=True, position="learned", n_token_types=2,
         embed_norm=True, kind="encoder", head="mlm", mlp_bias=True, qkv_bias=True),
], ids=["llama", "tied", "bert"])
def test_full_finetuning_groups(overrides):
    m = model(**overrides)
    groups = layerwise_lr_groups(m, BASE, DECAY, weight_decay=WD)
    where = check_groups(m, groups)
    L = m.cfg.n_layers
    assert where[id(m.tok_emb.weight)]["layer"] == "embeddings"  # tied: the table counts as the embedding
    assert where[id(m.blocks[0].attn.qkv.weight)]["lr"] == pytest.approx(BASE * DECAY ** L)
    assert where[id(m.blocks[L - 1].mlp.down.weight)]["lr"] == pytest.approx(BASE * DECAY)
    if "position" in overrides:
        assert where[id(m.pos_emb.weight)]["lr"] == where[id(m.emb_norm.weight)]["lr"] == \
            pytest.approx(BASE * DECAY ** (L + 1))
    # ordered bottom to top, lr non-decreasing
    lrs = [g["lr"] for g in groups]
    assert lrs == sorted(lrs) and groups[0]["layer"] == "embeddings" and groups[-1]["layer"] == "head"
    adamw_step(m, groups)


def test_partial_setup_frozen_base_with_adapters_and_head():
    m = model()
    add_adapter(m, AdapterConfig(bottleneck=4, activation="gelu"), "task")  # freezes the base
    with torch.no_grad():  # a trained adapter (W_up != 0), so every adapter parameter gets a gradient
        for n, p in m.named_parameters():
            if n.endswith("up.weight") and ".adapters." in n:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    m.head.proj.weight.requires_grad_(True)
    groups = layerwise_lr_groups(m, BASE, DECAY, weight_decay=WD)
    where = check_groups(m, groups)
    L = m.cfg.n_layers
    for i in range(L):  # adapters inside block i get block i's lr, even though the block itself is frozen
        ad = m.blocks[i].mlp.adapters.adapters["task"]
        assert where[id(ad.up.weight)]["lr"] == pytest.approx(BASE * DECAY ** (L - i))
        assert where[id(ad.up.weight)]["weight_decay"] == WD and where[id(ad.up.bias)]["weight_decay"] == 0.0
    assert where[id(m.head.proj.weight)]["lr"] == BASE
    assert id(m.tok_emb.weight) not in where and not any(g["layer"] == "embeddings" for g in groups)
    adamw_step(m, groups)


def test_decay_one_is_one_lr_and_validation():
    m = model()
    assert {g["lr"] for g in layerwise_lr_groups(m, BASE, 1.0)} == {BASE}
    assert all(g["weight_decay"] == 0.0 for g in layerwise_lr_groups(m, BASE, 0.5))
    with pytest.raises(ValueError, match="decay"):
        layerwise_lr_groups(m, BASE, 0.0)
    with pytest.raises(ValueError, match="base_lr"):
        layerwise_lr_groups(m, -1.0, 0.9)
