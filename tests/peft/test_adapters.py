"""Houlsby/Pfeiffer bottleneck adapters and AdapterFusion on our Transformer, checked against the papers'
formulas computed by hand on hook-captured activations (the adapter-hub `adapters` library would downgrade
transformers, so it is not an oracle here): identity at init, closed-form trainable counts, only the method's
parameters train, exact fusion reductions (one adapter; a one-hot softmax)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.model import Transformer
from llmlab.peft import trainable_parameters
from llmlab.peft.adapters import (
    AdapterConfig,
    active_adapters,
    adapter_modules,
    adapter_parameter_count,
    adapter_state_dict,
    add_adapter,
    add_fusion,
    fusion_modules,
    load_bottleneck_adapter,
    save_bottleneck_adapter,
    set_adapters,
    set_fusion,
)
from peft_helpers import ids, logits, model

TOL = dict(atol=1e-5, rtol=1e-5)
EXACT = dict(atol=0, rtol=0)
POST = dict(norm_placement="post", norm="layernorm", position="learned", kind="encoder", head="mlm")
CONFIGS = {"pre": {}, "post": POST, "moe": dict(n_experts=4, moe_top_k=2)}


@torch.no_grad()
def randomize_(modules, seed=3, std=0.1):
    """Random values in every parameter of `modules` (a trained adapter / fusion, not an identity one)."""
    g = torch.Generator().manual_seed(seed)
    for mod in modules:
        for p in mod.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def act(name, u):  # the activations written out, not through the module's table
    return {"relu": u.clamp_min(0), "tanh": torch.tanh(u),
            "gelu": 0.5 * u * (1 + torch.erf(u / math.sqrt(2))), "silu": u / (1 + torch.exp(-u))}[name]


def by_hand(ad, h, activation):
    """Houlsby: h + W_up act(W_down h + b_down) + b_up."""
    return h + act(activation, h @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias


def first(out):
    return out[0] if isinstance(out, tuple) else out


def train_step(m, x):
    """One SGD step on the LM/MLM loss over the trainable parameters; returns the parameters before it."""
    m.train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m(x, labels=x).loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad
    m.eval()
    return before


# ============================================================================================ adapters
@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("placement", ["both", "mlp"])
def test_fresh_adapter_is_identity_and_counts(kind, placement):
    m = model(**CONFIGS[kind])
    x = ids()
    base = logits(m, x)
    total_before = m.num_parameters()
    cfg = AdapterConfig(bottleneck=8, placement=placement, activation="gelu")
    add_adapter(m, cfg, "task")
    torch.testing.assert_close(logits(m, x), base, **EXACT)  # W_up = 0, b_up = 0
    d, b, L = m.cfg.dim, 8, m.cfg.n_layers
    per = 2 * d * b + b + d  # W_down, b_down, W_up, b_up
    sites = 2 if placement == "both" else 1
    trainable, total = trainable_parameters(m)
    assert trainable == L * sites * per == adapter_parameter_count(d, cfg, L)
    assert total == total_before + trainable
    assert sorted(adapter_modules(m, "task")) == sorted(
        f"blocks.{i}.{s}" for i in range(L) for s in (("attn", "mlp") if placement == "both" else ("mlp",)))
    # base module names and state-dict keys are untouched; the adapter's keys are new ones
    keys = set(m.state_dict())
    assert set(Transformer(m.cfg).state_dict()) <= keys
    assert set(adapter_state_dict(m, "task")) == keys - set(Transformer(m.cfg).state_dict())


def test_reduction_factor_and_second_adapter_counts():
    m = model()
    add_adapter(m, AdapterConfig(reduction_factor=16), "a")  # b = 64 // 16 = 4
    assert m.blocks[0].attn.adapters.adapters["a"].down.out_features == 4
    n_a = trainable_parameters(m)[0]
    add_adapter(m, AdapterConfig(bottleneck=6, placement="mlp"), "b")
    d, L = m.cfg.dim, m.cfg.n_layers
    assert n_a == L * 2 * (2 * d * 4 + 4 + d)
    assert trainable_parameters(m)[0] == L * (2 * d * 6 + 6 + d)  # only the newest, active adapter trains
    set_adapters(m, ["a", "b"])
    assert trainable_parameters(m)[0] == n_a + L * (2 * d * 6 + 6 + d)
    assert active_adapters(m) == ("stack", ("a", "b"))


def test_save_and_load_round_trip_and_shape_mismatch(tmp_path):
    m = model()
    add_adapter(m, AdapterConfig(bottleneck=6, placement="mlp", activation="gelu"), "task")
    randomize_(adapter_modules(m, "task").values())
    x = ids()
    save_bottleneck_adapter(m, tmp_path / "a", "task")
    fresh = model()
    assert load_bottleneck_adapter(fresh, tmp_path / "a") == "task"
    torch.testing.assert_close(logits(fresh, x), logits(m, x), **EXACT)
    assert fresh.adapter_configs["task"] == m.adapter_configs["task"]
    wider = model(dim=96, n_heads=4, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.adapters\.adapters\.task\.down\.weight .*another shape"):
        load_bottleneck_adapter(wider, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="bottleneck_adapter.json"):
        load_bottleneck_adapter(model(), tmp_path)


@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_adapter_matches_formula_on_block_activations(kind, activation):
    """Capture block 1's input, the raw attention and MLP outputs (hooks registered before the adapter's
    run first) and the block output; rebuild the output by hand from the formula and the residual structure."""
    m = model(1, **CONFIGS[kind])
    block = m.blocks[1]
    seen = {}
    block.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    block.attn.register_forward_hook(lambda mod, a, out: seen.__setitem__("a", first(out)))
    block.mlp.register_forward_hook(lambda mod, a, out: seen.__setitem__("m", first(out)))
    block.register_forward_hook(lambda mod, a, out: seen.__setitem__("y", first(out)))
    add_adapter(m, AdapterConfig(bottleneck=5, activation=activation), "t")
    ads = adapter_modules(m, "t")
    randomize_(ads.values(), std=0.2)
    logits(m, ids(4))
    at, mt = ads["blocks.1.attn"], ads["blocks.1.mlp"]
    with torch.no_grad():
        a2 = by_hand(at, seen["a"], activation)  # adapter on the sublayer output, before the residual add
        m2 = by_hand(mt, seen["m"], activation)
        if kind == "pre":   # x + a';  (x + a') + m'
            ref = seen["x"] + a2 + m2
        else:               # norm(norm(x + a') + m')
            ref = block.mlp_norm(block.attn_norm(seen["x"] + a2) + m2)
    assert not torch.allclose(a2, seen["a"])  # the adapter does something
    torch.testing.assert_close(seen["y"], ref, **TOL)


def test_stack_and_switching():
    m = model(2)
    x = ids()
    base = logits(m, x)
    add_adapter(m, AdapterConfig(bottleneck=4), "a")
    add_adapter(m, AdapterConfig(bottleneck=4), "b")
    randomize_(list(adapter_modules(m, "a").values()) + list(adapter_modules(m, "b").values()))
    set_adapters(m, "a")
    la = logits(m, x)
    set_adapters(m, None)
    torch.testing.assert_close(logits(m, x), base, **EXACT)
    assert trainable_parameters(m)[0] == 0
    set_adapters(m, ["a", "b"])  # a stack: b applied to a's output at every site
    slot = m.blocks[0].mlp.adapters
    h = torch.randn(3, m.cfg.dim)
    with torch.no_grad():
        torch.testing.assert_close(slot(h), slot.adapters["b"](slot.adapters["a"](h)), **EXACT)
    assert not torch.allclose(la, base) and not torch.allclose(logits(m, x), la)
    with pytest.raises(ValueError, match="no adapter named"):
        set_adapters(m, "zzz")
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(m, AdapterConfig(), "a")
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="attn")


@pytest.mark.parametrize("kind", ["pre", "moe"])
def test_only_adapter_parameters_get_gradients(kind):
    m = model(3, **CONFIGS[kind])
    add_adapter(m, AdapterConfig(bottleneck=4, activation="gelu"), "other")
    # active and trainable; "other" frozen. GELU: ReLU units can all be dead on small activations
    add_adapter(m, AdapterConfig(bottleneck=4, activation="gelu"), "task")
    randomize_(adapter_modules(m, "task").values())  # W_up != 0, so W_down gets a gradient too
    before = train_step(m, ids(2))
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".adapters.adapters.task." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0 and changed, n
        else:
            assert p.grad is None and not changed, n


# ============================================================================================ fusion
def two_trained_adapters(seed=4, **overrides):
    m = model(seed, **overrides)
    add_adapter(m, AdapterConfig(bottleneck=4), "a")
    add_adapter(m, AdapterConfig(bottleneck=4, activation="tanh"), "b")
    randomize_(adapter_modules(m, "a").values(), seed=5)
    randomize_(adapter_modules(m, "b").values(), seed=6)
    return m


def test_fusion_of_one_adapter_is_that_adapter():
    """softmax over one adapter = 1 and V = I at init, so fused = z_a exactly, whatever Q and K are."""
    m = two_trained_adapters()
    x = ids()
    set_adapters(m, "a")
    la = logits(m, x)
    add_fusion(m, ["a"])
    assert active_adapters(m) == ("fusion", ("a",))
    torch.testing.assert_close(logits(m, x), la, **EXACT)


def test_fusion_one_hot_softmax_selects_one_adapter_exactly():
    """Make the scores q·k_n = c·z_n[0] with z_a[0] - z_b[0] ≈ 2M, c·2M ≈ 1e5: the float32 softmax is then
    exactly (1, 0), and with V = I the fused model equals adapter `a` alone; flipping the sign picks `b`."""
    m = two_trained_adapters()
    x = ids()
    M, c = 5.0, 1e4
    for sign, pick in ((1.0, "a"), (-1.0, "b")):
        with torch.no_grad():
            for name, s in (("a", sign), ("b", -sign)):
                for ad in adapter_modules(m, name).values():
                    ad.up.bias[0] = s * M
        set_adapters(m, pick)
        want = logits(m, x)
        if pick == "a":
            add_fusion(m, ["a", "b"])
        set_fusion(m, ["a", "b"])
        d = m.cfg.dim
        with torch.no_grad():
            for f in fusion_modules(m, ["a", "b"]).values():
                f.query.weight.zero_()
                f.query.bias.zero_()
                f.query.bias[0] = c  # q = c·e_0
                f.key.weight.copy_(torch.eye(d))  # k_n = z_n, so q·k_n = c·z_n[0]
        slot = m.blocks[0].mlp.adapters
        h = torch.randn(7, d)
        with torch.no_grad():
            z = torch.stack([slot.adapters[n](h) for n in ("a", "b")], dim=-2)
            w = slot.fusions["a,b"].weights(h, z)
        assert torch.equal(w, torch.tensor([1.0, 0.0] if pick == "a" else [0.0, 1.0]).expand(7, 2))
        torch.testing.assert_close(logits(m, x), want, **EXACT)


def test_fusion_matches_formula_by_hand():
    """q = Q h + b_Q, k_n = K z_n, v_n = V z_n + b_V, s = softmax_n(q·k_n), fused = Σ s_n v_n, on the
    raw MLP output of block 0 captured by a hook (V perturbed away from the identity)."""
    m = two_trained_adapters(7)
    seen = {}
    mlp = m.blocks[0].mlp
    mlp.register_forward_hook(lambda mod, a, out: seen.setdefault("fused", first(out)))  # after the adapter hook
    add_fusion(m, ["a", "b"])
    f = fusion_modules(m, ["a", "b"])["blocks.0.mlp"]
    randomize_([f], seed=8, std=0.3)
    raw = {}
    handle = mlp.register_forward_pre_hook(lambda mod, args: raw.setdefault("in", args[0]))
    logits(m, ids(5))
    handle.remove()
    with torch.no_grad():
        h = F.linear(F.silu(F.linear(raw["in"], mlp.up.weight).chunk(2, -1)[0])
                     * F.linear(raw["in"], mlp.up.weight).chunk(2, -1)[1], mlp.down.weight)  # SwiGLU by hand
        ad = mlp.adapters.adapters
        z = [by_hand(ad["a"], h, "relu"), by_hand(ad["b"], h, "tanh")]
        q = h @ f.query.weight.T + f.query.bias
        k = [zn @ f.key.weight.T for zn in z]
        v = [zn @ f.value.weight.T + f.value.bias for zn in z]
        scores = torch.stack([(q * kn).sum(-1) for kn in k], -1)
        s = scores.exp() / scores.exp().sum(-1, keepdim=True)
        ref = s[..., :1] * v[0] + s[..., 1:] * v[1]
    assert 0.01 < float(s.min()) and float(s.max()) < 0.99  # a genuine mixture, not a one-hot case
    torch.testing.assert_close(seen["fused"], ref, **TOL)


def test_fusion_trains_only_fusion_parameters_and_counts():
    m = two_trained_adapters(9)
    add_fusion(m, ["a", "b"])
    d, L = m.cfg.dim, m.cfg.n_layers
    assert trainable_parameters(m)[0] == L * 2 * (3 * d * d + 2 * d)  # Q, K, V; biases on Q, V; both sites
    assert f_key_has_no_bias(m)
    fus = fusion_modules(m, ["a", "b"])
    randomize_(fus.values(), seed=10, std=0.05)
    before = train_step(m, ids(3))
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".adapters.fusions." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0 and changed, n
        else:  # base model and the fused adapters stay frozen
            assert p.grad is None and not changed, n


def f_key_has_no_bias(m):
    return all(f.key.bias is None for f in fusion_modules(m, ["a", "b"]).values())


def test_fusion_requires_same_placement():
    m = model()
    add_adapter(m, AdapterConfig(bottleneck=4, placement="both"), "a")
    add_adapter(m, AdapterConfig(bottleneck=4, placement="mlp"), "b")
    with pytest.raises(ValueError, match="same placement"):
        add_fusion(m, ["a", "b"])
    with pytest.raises(ValueError, match="no fusion"):
        set_fusion(m, ["a"])


def test_fused_model_decodes_with_kv_cache_and_checkpointing():
    """The hooks act per token, so prefill + one-token decode over a KVCache gives the full forward's logits,
    and activation checkpointing gives the same gradients."""
    from llmlab.model import KVCache

    m = two_trained_adapters(11)
    add_fusion(m, ["a", "b"])
    randomize_(fusion_modules(m, ["a", "b"]).values(), seed=12, std=0.05)
    x = ids(6)
    full = logits(m, x)
    cache = KVCache()
    with torch.no_grad():
        head = m(x[:, :-1], cache=cache).logits
        last = m(x[:, -1:], cache=cache).logits
    torch.testing.assert_close(torch.cat((head, last), 1), full, **TOL)
    grads = []
    for ckpt in (False, True):
        m.cfg.gradient_checkpointing = ckpt
        m.zero_grad()
        m.train()
        m(x, labels=x).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    m.cfg.gradient_checkpointing = False
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, **TOL)
