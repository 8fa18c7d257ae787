"""(IA)³ and BitFit on our Transformer: identity at init, only the method's parameters train, closed-form
parameter counts, exact IA3 merge/unmerge, and IA3 interop with the real `peft` both ways (same logits)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from llmlab.peft import (
    IA3Config,
    add_ia3,
    apply_bitfit,
    ia3_state_dict,
    load_adapter,
    merge_ia3,
    save_adapter,
    set_ia3_adapter,
    trainable_parameters,
    unmerge_ia3,
)
from peft_helpers import ids, logits, model

TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def randomize_ia3_(m, name="default", seed=3):
    g = torch.Generator().manual_seed(seed)
    for _, t in sorted(ia3_state_dict(m, name).items()):
        t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))


def train_step(m, x, params):
    """One SGD step on the LM loss; returns {name: grad-is-nonzero} for every parameter and the old values."""
    m.train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    out = m(x, labels=x)
    out.loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad
    m.eval()
    return before


# ============================================================================================ IA3
def test_ia3_fresh_is_identity_counts_and_shapes():
    m = model()
    x = ids()
    base = logits(m, x)
    total_before = m.num_parameters()
    add_ia3(m, IA3Config(target_modules=("k", "v", "down"), feedforward_modules=("down",)))
    torch.testing.assert_close(logits(m, x), base, rtol=0, atol=0)  # every vector is ones
    cfg = m.cfg
    kv = cfg.n_kv_heads * cfg.head_dim
    trainable, total = trainable_parameters(m)
    assert trainable == cfg.n_layers * (2 * kv + cfg.hidden_dim)  # l_k, l_v [kv] and l_ff [hidden] per block
    assert total == total_before + trainable
    qkv = m.blocks[0].attn.qkv.ia3.adapters["default"]
    assert sorted(qkv) == ["k", "v"] and qkv["k"].ia3_l.shape == (kv,) and not qkv["k"].feedforward
    down = m.blocks[0].mlp.down.ia3.adapters["default"]["down"]
    assert down.feedforward and down.ia3_l.shape == (cfg.hidden_dim,)


def test_ia3_matches_explicit_formula():
    """l_k, l_v rescale the k and v rows of the fused qkv output; l_ff the input of down."""
    m = model(1)
    add_ia3(m, IA3Config())
    randomize_ia3_(m)
    attn, mlp = m.blocks[0].attn, m.blocks[0].mlp
    h = torch.randn(3, m.cfg.dim)
    with torch.no_grad():
        got = attn.qkv(h)
        ref = torch.nn.functional.linear(h, attn.qkv.weight, attn.qkv.bias)
        ad = attn.qkv.ia3.adapters["default"]
        for p in ad.values():
            ref[:, p.start:p.stop] *= p.ia3_l
        torch.testing.assert_close(got, ref, **TOL)
        u = torch.randn(3, m.cfg.hidden_dim)
        l_ff = mlp.down.ia3.adapters["default"]["down"].ia3_l
        torch.testing.assert_close(mlp.down(u), torch.nn.functional.linear(u * l_ff, mlp.down.weight,
                                                                           mlp.down.bias), **TOL)


def test_ia3_only_vectors_train():
    m = model(2)
    add_ia3(m, IA3Config())
    randomize_ia3_(m)
    params = [p for p in m.parameters() if p.requires_grad]
    before = train_step(m, ids(2), params)
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".ia3." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0 and changed, n
        else:
            assert p.grad is None and not changed, n


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "qkv_bias"])
def test_ia3_merge_equals_unmerged_and_unmerge_restores(bias):
    m = model(3, qkv_bias=bias, mlp_bias=bias)
    x = ids(3)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    add_ia3(m, IA3Config(target_modules=("k", "v", "down", "o"), feedforward_modules=("down",)))
    randomize_ia3_(m)
    adapted = logits(m, x)
    merge_ia3(m)
    assert not torch.equal(m.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(logits(m, x), adapted, **TOL)
    unmerge_ia3(m)
    torch.testing.assert_close(logits(m, x), adapted, **TOL)
    for k, v in weights.items():
        torch.testing.assert_close(m.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    set_ia3_adapter(m, None)
    m2 = model(3, qkv_bias=bias, mlp_bias=bias)
    torch.testing.assert_close(logits(m, x), logits(m2, x), **TOL)


def test_ia3_config_errors():
    with pytest.raises(ValueError, match="subset of target_modules"):
        IA3Config(target_modules=("k", "v"), feedforward_modules=("down",))
    m = model()
    with pytest.raises(ValueError, match="fused layer has one input"):
        add_ia3(m, IA3Config(target_modules=("gate", "up"), feedforward_modules=("up",)))


# ------------------------------------------------------------------------------------------ PEFT interop
def _interop_helpers():
    """The tiny random HF models and helpers of test_peft_interop (pytest puts this folder on sys.path)."""
    pytest.importorskip("peft")
    import test_peft_interop as h
    return h


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ia3_ours_to_peft_and_back(tmp_path, kind):
    h = _interop_helpers()
    import peft
    hf = h.hf_model(kind, seed=7)
    ours = h.ours_from(hf)
    x = h.ids(6)
    add_ia3(ours, IA3Config(target_modules=("k", "v", "down"), feedforward_modules=("down",)))
    randomize_ia3_(ours)
    expected = h.logits(ours, x)
    assert not torch.allclose(expected, h.logits(hf, x), atol=1e-3)
    save_adapter(ours, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert c["peft_type"] == "IA3" and sorted(c["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    assert c["feedforward_modules"] == ["down_proj"]
    assert not set(c) - set(peft.IA3Config().to_dict()), "a field PEFT does not know"
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    kv = ours.cfg.n_kv_heads * ours.cfg.head_dim
    assert sd["base_model.model.model.layers.1.self_attn.k_proj.ia3_l"].shape == (kv, 1)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, ours.cfg.hidden_dim)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert sum("ia3_l" in n for n, _ in pm.named_parameters()) == 3 * ours.cfg.n_layers
    torch.testing.assert_close(h.logits(pm, x), expected, atol=1e-4, rtol=1e-4)


def test_ia3_peft_to_ours_and_merge(tmp_path):
    h = _interop_helpers()
    import peft
    hf = h.hf_model("llama", seed=8)
    ours = h.ours_from(hf)
    pm = peft.get_peft_model(hf, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(str(tmp_path))
    x = h.ids(7)
    expected = h.logits(pm, x)
    with pm.disable_adapter():
        base = h.logits(pm, x)
    assert not torch.allclose(expected, base, atol=1e-3)
    load_adapter(ours, tmp_path, name="peft")
    torch.testing.assert_close(h.logits(ours, x), expected, atol=1e-4, rtol=1e-4)
    merge_ia3(ours, "peft")
    torch.testing.assert_close(h.logits(ours, x), expected, atol=1e-4, rtol=1e-4)
    unmerge_ia3(ours, "peft")
    set_ia3_adapter(ours, None)
    torch.testing.assert_close(h.logits(ours, x), base, atol=1e-4, rtol=1e-4)


# ============================================================================================ BitFit
def test_bitfit_existing_biases_closed_form_and_only_biases_train():
    m = model(4, norm="layernorm", norm_bias=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True)
    cfg = m.cfg
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    up = 2 * cfg.hidden_dim if cfg.gated else cfg.hidden_dim
    # per block: two LayerNorm biases [dim], qkv [qkv], out [dim], up [up], down [dim]; plus the final norm
    expected = cfg.n_layers * (2 * cfg.dim + qkv + cfg.dim + up + cfg.dim) + cfg.dim
    n = apply_bitfit(m)
    assert n == expected == trainable_parameters(m)[0]
    params = [p for p in m.parameters() if p.requires_grad]
    before = train_step(m, ids(4), params)
    for name, p in m.named_parameters():
        changed = not torch.equal(p, before[name])
        if name.endswith(".bias"):
            assert p.grad is not None and p.grad.abs().sum() > 0 and changed, name
        else:
            assert p.grad is None and not changed, name


def test_bitfit_adds_zero_biases_where_asked():
    m = model(5)  # the nano preset has no biases (Llama-style)
    x = ids(5)
    base = logits(m, x)
    total_before = m.num_parameters()
    with pytest.raises(ValueError, match="no bias parameters"):
        apply_bitfit(m)
    cfg = m.cfg
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    n = apply_bitfit(m, add_bias=("v", "down"))  # "v" -> the whole fused qkv layer gets one bias
    assert n == cfg.n_layers * (qkv + cfg.dim)
    assert m.bitfit_added == sorted(f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in ("attn.qkv", "mlp.down"))
    assert m.num_parameters() == total_before + n
    torch.testing.assert_close(logits(m, x), base, rtol=0, atol=0)  # zero biases: unchanged
    params = [p for p in m.parameters() if p.requires_grad]
    before = train_step(m, x, params)
    for name, p in m.named_parameters():
        assert (not torch.equal(p, before[name])) == name.endswith(".bias"), name
    assert not torch.allclose(logits(m, x), base)
