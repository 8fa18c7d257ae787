"""LoRA / rsLoRA / DoRA on our Transformer: identity at init, only adapters train, closed-form parameter counts,
exact merge/unmerge, adapter switching, fused-layer parts equal separate LoRAs, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.model import ModelConfig
from llmlab.peft import (
    LoraConfig,
    LoraLinear,
    active_adapter,
    add_lora,
    lora_state_dict,
    merge_lora,
    set_adapter,
    trainable_parameters,
    unmerge_lora,
)
from peft_helpers import ids, logits, model

ALL = ("q", "k", "v", "o", "gate", "up", "down")
TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def randomize_adapter_(m, name="default", seed=3):
    g = torch.Generator().manual_seed(seed)
    for k, t in sorted(lora_state_dict(m, name).items()):
        if k.endswith("lora_B"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
        elif k.endswith("lora_magnitude"):
            t.mul_(1 + 0.1 * torch.randn(t.shape, generator=g))


def expected_count(cfg: ModelConfig, r: int, dora: bool, targets=ALL) -> int:
    """Closed form: r·(in + out) per targeted part, plus `out` magnitudes per part with DoRA."""
    q, kv, d, h = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, h), "up": (d, h), "down": (h, d)}
    per_layer = sum(r * (i + o) + (o if dora else 0) for t, (i, o) in shapes.items() if t in targets)
    return cfg.n_layers * per_layer


# ------------------------------------------------------------------------------------------ basics
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapter_is_identity_and_counts_are_closed_form(dora):
    m = model()
    x = ids()
    base = logits(m, x)
    total_before = m.num_parameters()
    add_lora(m, LoraConfig(r=4, target_modules=ALL, use_dora=dora))
    torch.testing.assert_close(logits(m, x), base, rtol=0, atol=0)  # B = 0 (DoRA: m = ||W||, gain 1)
    trainable, total = trainable_parameters(m)
    assert trainable == expected_count(m.cfg, 4, dora)
    assert total == total_before + trainable
    assert isinstance(m.blocks[0].attn.qkv, LoraLinear) and isinstance(m.blocks[1].mlp.up, LoraLinear)
    assert sorted(m.blocks[0].attn.qkv.adapters["default"].parts) == ["k", "q", "v"]
    assert m.blocks[0].attn.qkv.adapters["default"].parts["k"].lora_B.shape == (m.cfg.n_kv_heads * m.cfg.head_dim, 4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_only_adapter_parameters_train(dora):
    m = model().train()
    add_lora(m, LoraConfig(r=2, target_modules=("q", "v", "down"), use_dora=dora))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = ids()
    for _ in range(2):  # B = 0 at first: A gets no gradient in step 1, both move by step 2
        opt.zero_grad()
        m(x, labels=x).loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        is_adapter = ".adapters.default." in n
        assert p.requires_grad == is_adapter, n
        if is_adapter:
            assert p.grad is not None and not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n


def test_chunked_loss_sees_an_adapted_head():
    """`head.proj.weight` of a wrapped layer is the adapted weight: the chunked loss equals the full one."""
    m = model(tie_embeddings=False)
    add_lora(m, LoraConfig(r=2, target_modules=("lm_head", "q")))
    randomize_adapter_(m)
    x = ids()
    full = m(x, labels=x).loss
    chunked = m(x, labels=x, return_logits=False).loss
    torch.testing.assert_close(chunked, full, **TOL)


def test_rslora_scaling():
    for rs, expected in ((False, 16 / 4), (True, 16 / math.sqrt(4))):
        m = model()
        add_lora(m, LoraConfig(r=4, alpha=16, use_rslora=rs))
        assert m.blocks[0].attn.qkv.adapters["default"].parts["q"].scaling == expected
    # and the scaling is what the output uses: delta = s · B A x
    m = model()
    add_lora(m, LoraConfig(r=4, alpha=6, use_rslora=True, target_modules=("o",)))
    layer = m.blocks[0].attn.out
    part = layer.adapters["default"].parts["o"]
    with torch.no_grad():
        part.lora_B.normal_()
    h = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(h), layer.base_layer(h) + 3.0 * (h @ part.lora_A.T @ part.lora_B.T), **TOL)


def test_fused_parts_equal_separate_loras():
    """LoRA on q, k, v of the fused qkv == separate LoRAs on split q/k/v Linears; same for gate/up."""
    m = model(seed=5)
    add_lora(m, LoraConfig(r=3, alpha=6, target_modules=("k", "v", "gate", "up")))
    randomize_adapter_(m)
    cfg = m.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    h = torch.randn(2, 5, cfg.dim)
    qkv = m.blocks[0].attn.qkv
    W = qkv.base_layer.weight
    parts = qkv.adapters["default"].parts
    assert "q" not in parts
    want = torch.cat([F.linear(h, W[:q]),
                      F.linear(h, W[q:q + kv]) + 2.0 * F.linear(F.linear(h, parts["k"].lora_A), parts["k"].lora_B),
                      F.linear(h, W[q + kv:]) + 2.0 * F.linear(F.linear(h, parts["v"].lora_A), parts["v"].lora_B)],
                     dim=-1)
    torch.testing.assert_close(qkv(h), want, **TOL)
    up = m.blocks[1].mlp.up
    Wu, p = up.base_layer.weight, up.adapters["default"].parts
    hid = cfg.hidden_dim
    want = torch.cat([F.linear(h, Wu[:hid]) + 2.0 * F.linear(F.linear(h, p["gate"].lora_A), p["gate"].lora_B),
                      F.linear(h, Wu[hid:]) + 2.0 * F.linear(F.linear(h, p["up"].lora_A), p["up"].lora_B)], dim=-1)
    torch.testing.assert_close(up(h), want, **TOL)


def test_dora_formula():
    """W' = m · (W + s·BA) / ||W + s·BA|| with the norm per output row."""
    m = model(seed=6)
    add_lora(m, LoraConfig(r=2, alpha=4, target_modules=("down",), use_dora=True))
    randomize_adapter_(m)
    layer = m.blocks[0].mlp.down
    p = layer.adapters["default"].parts["down"]
    V = layer.base_layer.weight + 2.0 * p.lora_B @ p.lora_A
    Wp = p.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    h = torch.randn(4, layer.in_features)
    torch.testing.assert_close(layer(h), F.linear(h, Wp), **TOL)
    torch.testing.assert_close(layer.weight, Wp, **TOL)


def test_dora_norm_is_detached():
    """The magnitude's gradient treats ||W + s·BA|| as a constant (DoRA §4.3, as PEFT)."""
    m = model(seed=7)
    add_lora(m, LoraConfig(r=2, target_modules=("o",), use_dora=True))
    randomize_adapter_(m)
    layer = m.blocks[0].attn.out
    p = layer.adapters["default"].parts["o"]
    h = torch.randn(4, layer.in_features)
    layer(h).sum().backward()
    V = (layer.base_layer.weight + p.scaling * p.lora_B @ p.lora_A).detach()
    # d/dm sum(m/||V|| · V h) = sum over batch of (V h) / ||V||
    torch.testing.assert_close(p.lora_magnitude.grad, (h @ V.T).sum(0) / V.norm(dim=1), **TOL)


# ------------------------------------------------------------------------------------------ merge / switch
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_exact(dora):
    m = model(seed=8)
    x = ids()
    base = logits(m, x)
    add_lora(m, LoraConfig(r=4, target_modules=ALL, use_dora=dora))
    randomize_adapter_(m)
    unmerged = logits(m, x)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    W0 = m.blocks[0].attn.qkv.base_layer.weight.detach().clone()
    merge_lora(m)
    assert m.blocks[0].attn.qkv.merged == ["default"]
    torch.testing.assert_close(logits(m, x), unmerged, **TOL)
    unmerge_lora(m)
    torch.testing.assert_close(m.blocks[0].attn.qkv.base_layer.weight, W0, **TOL)
    torch.testing.assert_close(logits(m, x), unmerged, **TOL)
    set_adapter(m, None)
    torch.testing.assert_close(logits(m, x), base, **TOL)


def test_disable_is_the_base_model_and_two_adapters_switch():
    m = model(seed=9)
    x = ids()
    base = logits(m, x)
    add_lora(m, LoraConfig(r=2, target_modules=("q", "v")), name="a")
    randomize_adapter_(m, "a", seed=1)
    out_a = logits(m, x)
    add_lora(m, LoraConfig(r=4, alpha=8, target_modules=("o", "down"), use_dora=True), name="b")
    assert active_adapter(m) == "b"
    randomize_adapter_(m, "b", seed=2)
    out_b = logits(m, x)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    set_adapter(m, "a")
    torch.testing.assert_close(logits(m, x), out_a, rtol=0, atol=0)
    assert trainable_parameters(m)[0] == sum(t.numel() for t in lora_state_dict(m, "a").values())
    set_adapter(m, None)
    torch.testing.assert_close(logits(m, x), base, rtol=0, atol=0)
    assert trainable_parameters(m)[0] == 0
    set_adapter(m, "b")
    torch.testing.assert_close(logits(m, x), out_b, rtol=0, atol=0)
    # a merged adapter must be unmerged before switching away from it
    merge_lora(m, "b")
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        set_adapter(m, "a")
    unmerge_lora(m, "b")
    set_adapter(m, "a")
    torch.testing.assert_close(logits(m, x), out_a, **TOL)


def test_regex_targets_and_state_dict_keys():
    m = model()
    add_lora(m, LoraConfig(r=2, target_modules=(r"blocks\.1\.attn\.qkv", "attn.out")))
    sd = lora_state_dict(m)
    assert sorted(sd) == sorted([
        "blocks.1.attn.qkv.adapters.default.parts.all.lora_A", "blocks.1.attn.qkv.adapters.default.parts.all.lora_B",
        "blocks.0.attn.out.adapters.default.parts.o.lora_A", "blocks.0.attn.out.adapters.default.parts.o.lora_B",
        "blocks.1.attn.out.adapters.default.parts.o.lora_A", "blocks.1.attn.out.adapters.default.parts.o.lora_B"])
    assert not isinstance(m.blocks[0].attn.qkv, LoraLinear)
    assert sd["blocks.1.attn.qkv.adapters.default.parts.all.lora_B"].shape == (m.blocks[1].attn.qkv.out_features, 2)


# ------------------------------------------------------------------------------------------ errors
def test_errors():
    m = model()
    with pytest.raises(ValueError, match=r"\['q_projj', 'nothing'\] matched no Linear.*blocks\.0\.attn\.qkv"):
        add_lora(m, LoraConfig(target_modules=("q", "q_projj", "nothing")))
    with pytest.raises(ValueError, match=r"r=40 is larger than .*blocks\.0\.attn\.qkv part 'k'"):
        add_lora(m, LoraConfig(r=40, target_modules=("k",)))
    assert not any(isinstance(x, LoraLinear) for x in m.modules())  # nothing was changed by a failed call
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        set_adapter(m, "nope")
    add_lora(m, LoraConfig(r=2))
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'.*'default'"):
        merge_lora(m, "other")
    with pytest.raises(ValueError, match="already exists"):
        add_lora(m, LoraConfig(r=2))
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        LoraConfig(bias="all")
    with pytest.raises(ValueError, match="positive"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="both as a whole"):
        add_lora(model(), LoraConfig(target_modules=("q", "attn.qkv")))
