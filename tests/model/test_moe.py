"""Mixture of experts: grouped dispatch against a per-token reference, the auxiliary losses on hand-computed
cases, and where MoE layers sit in a Transformer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.model import ModelConfig, Transformer
from llmlab.model.mlp import MLP
from llmlab.model.moe import MoE


def moe_cfg(**overrides) -> ModelConfig:
    base = dict(n_experts=4, moe_top_k=2, n_shared_experts=1)
    return ModelConfig.preset("nano", **{**base, **overrides})


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: score every expert, take the top k, (renormalize,) sum weight·expert(x) over them,
    add the shared experts."""
    cfg = moe.cfg
    rows = []
    for xt in x.reshape(-1, x.shape[-1]):
        logits = xt @ moe.router.weight.T
        scores = torch.softmax(logits, dim=-1) if cfg.router == "softmax" else torch.sigmoid(logits)
        order = scores.detach()
        chosen = sorted(range(cfg.n_experts), key=lambda e: -order[e].item())[: cfg.moe_top_k]
        weights = [scores[e] for e in chosen]
        if cfg.moe_norm_topk:
            total = sum(weights)
            weights = [w / total for w in weights]
        y = torch.zeros_like(xt)
        for e, w in zip(chosen, weights):
            y = y + w * moe.experts[e](xt[None])[0]
        if moe.shared is not None:
            y = y + moe.shared(xt[None])[0]
        rows.append(y)
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("extra,shape", [
    (dict(n_shared_experts=1), (2, 7)),
    (dict(n_shared_experts=1), (1, 1)),  # one token: two experts get nothing
    (dict(n_shared_experts=2, moe_hidden_dim=32), (2, 7)),
    (dict(n_shared_experts=0, moe_top_k=1, activation="gelu", mlp_bias=True), (3, 5)),
    (dict(n_experts=6, moe_top_k=3, n_shared_experts=1), (2, 7)),
])
def test_dispatch_matches_per_token_reference(router, norm_topk, extra, shape):
    torch.manual_seed(0)
    cfg = moe_cfg(router=router, moe_norm_topk=norm_topk, **extra)
    moe = MoE(cfg)
    with torch.no_grad():  # unit-scale activations (the 0.02 init makes every expert output tiny)
        for m in moe.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(std=m.in_features**-0.5)
                if m.bias is not None:
                    m.bias.normal_(std=0.1)
    if cfg.n_shared_experts:
        assert moe.shared.down.in_features == cfg.moe_hidden_dim * cfg.n_shared_experts
    x = torch.randn(*shape, cfg.dim, requires_grad=True)
    probe = torch.randn(*shape, cfg.dim)
    params = [x, *moe.parameters()]

    out, _ = moe(x)
    ref = reference_moe(moe, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad((out * probe).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * probe).sum(), params, allow_unused=True)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, p, g, rg in zip(names, params, grads, ref_grads):
        # an expert no token chose gets no gradient (None) in either
        g = torch.zeros_like(p) if g is None else g
        rg = torch.zeros_like(p) if rg is None else rg
        torch.testing.assert_close(g, rg, msg=lambda m: f"{name}: {m}")
    assert grads[0] is not None and torch.count_nonzero(grads[0]) > 0


def test_unrouted_experts_are_not_run():
    torch.manual_seed(0)
    cfg = moe_cfg(n_experts=8, moe_top_k=1, n_shared_experts=0)
    moe = MoE(cfg)
    calls = [0] * cfg.n_experts
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.__setitem__(e, calls[e] + i[0].shape[0]))
    x = torch.randn(1, 3, cfg.dim)
    weights, experts, _, _ = moe.route(x.reshape(-1, cfg.dim))
    moe(x)
    expected = torch.bincount(experts.flatten(), minlength=cfg.n_experts).tolist()
    assert calls == expected and sum(calls) == 3  # each expert once, on exactly its tokens


# ---------------------------------------------------------------------------------------------- aux loss
def hand_routed_moe(router: str, aux: float, z: float) -> tuple[MoE, torch.Tensor]:
    """2 experts, top-1, 4 tokens with router logits (ln 3, 0), (ln 3, 0), (ln 3, 0), (-ln 3, 0)."""
    cfg = ModelConfig.preset("nano", n_experts=2, moe_top_k=1, router=router, moe_aux_loss_coef=aux,
                             moe_z_loss_coef=z)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.randn(1, 4, cfg.dim)
    x[0, :, 0] = torch.tensor([math.log(3), math.log(3), math.log(3), -math.log(3)])
    return moe, x


def test_aux_loss_softmax_by_hand():
    # softmax probabilities of expert 0: 3/4, 3/4, 3/4, 1/4 -> tokens 0-2 go to expert 0, token 3 to expert 1
    # f = (3/4, 1/4); P = ((3·3/4 + 1/4)/4, (3·1/4 + 3/4)/4) = (0.625, 0.375)
    # E·Σ f·P = 2·(0.75·0.625 + 0.25·0.375) = 1.125
    moe, x = hand_routed_moe("softmax", aux=1.0, z=0.0)
    _, _, _, scores = moe.route(x[0])
    torch.testing.assert_close(scores[:, 0], torch.tensor([0.75, 0.75, 0.75, 0.25]))
    _, loss = moe(x)
    torch.testing.assert_close(loss, torch.tensor(1.125))


def test_aux_loss_sigmoid_by_hand():
    # sigmoid scores: (3/4, 1/2) three times and (1/4, 1/2); top-1: expert 0 ×3, expert 1 ×1 -> f = (3/4, 1/4)
    # normalized per token: (0.6, 0.4) ×3 and (1/3, 2/3) -> P = ((1.8 + 1/3)/4, (1.2 + 2/3)/4) = (8/15, 7/15)
    # E·Σ f·P = 2·(0.75·8/15 + 0.25·7/15) = 31/30
    moe, x = hand_routed_moe("sigmoid", aux=1.0, z=0.0)
    _, loss = moe(x)
    torch.testing.assert_close(loss, torch.tensor(31 / 30))


def test_z_loss_by_hand():
    # logsumexp(ln 3, 0) = ln 4, logsumexp(-ln 3, 0) = ln(4/3); mean of squares:
    # (3·1.921812 + 0.082761) / 4 = 1.462049
    expected = (3 * math.log(4) ** 2 + math.log(4 / 3) ** 2) / 4
    assert expected == pytest.approx(1.462049, abs=1e-6)
    moe, x = hand_routed_moe("softmax", aux=0.0, z=1.0)
    _, loss = moe(x)
    torch.testing.assert_close(loss, torch.tensor(expected))
    # the coefficients weight the two terms
    moe, x = hand_routed_moe("softmax", aux=0.01, z=0.001)
    _, loss = moe(x)
    torch.testing.assert_close(loss, torch.tensor(0.01 * 1.125 + 0.001 * expected))
    moe, x = hand_routed_moe("softmax", aux=0.0, z=0.0)
    _, loss = moe(x)
    assert loss.item() == 0.0


def test_aux_loss_counts_all_top_k_assignments():
    # 3 experts, top-2, 2 tokens with logits (2, 1, 0) and (0, 1, 2):
    # assignments {0, 1} and {2, 1} -> f = (1/4, 2/4, 1/4); P is the mean softmax over the 2 tokens
    cfg = ModelConfig.preset("nano", n_experts=3, moe_top_k=2, moe_aux_loss_coef=1.0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([1.0, 0.0, -1.0])
        moe.router.weight[:, 1] = torch.tensor([-1.0, 0.0, 1.0])
    x = torch.zeros(1, 2, cfg.dim)
    x[0, 0, 0] = 2.0  # logits (2, 0, -2)
    x[0, 1, 1] = 2.0  # logits (-2, 0, 2)
    e2, e0 = math.exp(2), 1.0
    z = e2 + 1 + math.exp(-2)
    p_hi, p_mid, p_lo = e2 / z, e0 / z, math.exp(-2) / z
    P = [(p_hi + p_lo) / 2, p_mid, (p_lo + p_hi) / 2]
    f = [0.25, 0.5, 0.25]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, P))
    _, loss = moe(x)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_uniform_routing_gives_aux_loss_one():
    cfg = ModelConfig.preset("nano", n_experts=4, moe_top_k=2, moe_aux_loss_coef=1.0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()  # every score equal: P = 1/E; topk of ties still yields E·Σ f/E = 1
    _, loss = moe(torch.randn(2, 8, cfg.dim))
    torch.testing.assert_close(loss, torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------- in a model
@pytest.mark.parametrize("n_layers,every,expected", [
    (4, 1, [True, True, True, True]),
    (4, 2, [False, True, False, True]),
    (4, 3, [False, False, True, False]),
    (2, 4, [False, False]),
])
def test_moe_every_places_moe_layers(n_layers, every, expected):
    cfg = moe_cfg(n_layers=n_layers, moe_every=every)
    model = Transformer(cfg)
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == expected
    assert [cfg.is_moe_layer(i) for i in range(n_layers)] == expected
    assert all(isinstance(b.mlp, MLP) for b in model.blocks if not isinstance(b.mlp, MoE))


def test_aux_loss_is_summed_over_layers_and_added_to_the_loss():
    torch.manual_seed(0)
    cfg = moe_cfg(n_layers=4, moe_every=2, moe_aux_loss_coef=0.3, moe_z_loss_coef=0.05)
    model = Transformer(cfg).eval()
    per_layer = []
    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            block.mlp.register_forward_hook(lambda m, i, o: per_layer.append(o[1]))
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    assert len(per_layer) == 2
    torch.testing.assert_close(out.aux_loss, per_layer[0] + per_layer[1])
    assert out.aux_loss.item() > 0.3  # each Switch term is >= coef, so the sum is visible in the loss
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    # the aux loss reaches the routers through backward
    out.loss.backward()
    assert all(b.mlp.router.weight.grad is not None and b.mlp.router.weight.grad.abs().sum() > 0
               for b in model.blocks if isinstance(b.mlp, MoE))


def test_dense_model_has_no_aux_loss():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano")
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    out = Transformer(cfg)(ids, labels=ids)
    assert out.aux_loss is None
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)
