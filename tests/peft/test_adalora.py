"""AdaLoRA on our Transformer: fresh == base, only P/Λ/Q train, closed-form counts, the cubic budget schedule
reaching exactly target_r per part at T - t_f (counted as non-zero λ), the importance EMA and the orthogonality
regularizer against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.peft import (
    AdaLoraConfig,
    AdaLoraController,
    adalora_parts,
    add_adalora,
    orthogonal_regularization,
    set_adalora_enabled,
    trainable_parameters,
)

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("nano")).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(m, x):
    with torch.no_grad():
        return m(x).logits


def test_fresh_is_identity_and_count_is_closed_form():
    m = model()
    x = ids()
    base = logits(m, x)
    total_before = m.num_parameters()
    add_adalora(m, AdaLoraConfig(init_r=6, target_r=2, target_modules=ALL))
    torch.testing.assert_close(logits(m, x), base, rtol=0, atol=0)  # Λ = 0
    cfg = m.cfg
    q, kv, d, h = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, h), (d, h), (h, d)]
    # r·(in + out) for Q and P, plus r singular values, per part
    expected = cfg.n_layers * sum(6 * (i + o) + 6 for i, o in shapes)
    trainable, total = trainable_parameters(m)
    assert trainable == expected and total == total_before + expected
    assert sorted(adalora_parts(m)["blocks.0.attn.qkv"]) == ["k", "q", "v"]


def test_only_adalora_parameters_train_and_disable_is_base():
    m = model(1)
    x = ids(2)
    base = logits(m, x)
    add_adalora(m, AdaLoraConfig(init_r=4, target_r=2, target_modules=("q", "v", "down")))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m.train()
    for _ in range(2):  # step 1 moves Λ (the grads of P, Q are 0 while Λ = 0); step 2 moves P and Q too
        opt.zero_grad()
        loss = m(x, labels=x).loss + 0.1 * orthogonal_regularization(m)
        loss.backward()
        opt.step()
    m.eval()
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".adalora." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0 and changed, n
        else:
            assert p.grad is None and not changed, n
    assert not torch.allclose(logits(m, x), base)
    set_adalora_enabled(m, False)
    torch.testing.assert_close(logits(m, x), base, rtol=0, atol=0)


def test_orthogonal_regularizer_hand_case():
    m = model(2)
    add_adalora(m, AdaLoraConfig(init_r=2, target_r=1, target_modules=(r"blocks\.0\.attn\.out",)))
    (p,) = adalora_parts(m)["blocks.0.attn.out"].values()
    with torch.no_grad():
        p.lora_A.zero_()
        p.lora_A[0, 0], p.lora_A[1, 1] = 1.0, 2.0   # QQᵀ = diag(1, 4): ||QQᵀ - I||² = 0 + 3² = 9
        p.lora_B.zero_()
        p.lora_B[0, 0] = p.lora_B[0, 1] = 1.0      # PᵀP = [[1, 1], [1, 1]]: ||PᵀP - I||² = 1 + 1 = 2
    assert orthogonal_regularization(m).item() == pytest.approx(11.0)
    with torch.no_grad():  # orthonormal P and Q: R = 0
        p.lora_A.zero_()
        p.lora_A[0, 3] = p.lora_A[1, 7] = 1.0
        p.lora_B.copy_(torch.linalg.qr(torch.randn(p.lora_B.shape))[0])
    assert orthogonal_regularization(m).item() == pytest.approx(0.0, abs=1e-10)


def test_importance_ema_hand_case():
    m = model(3)
    add_adalora(m, AdaLoraConfig(init_r=2, target_r=1, target_modules=(r"blocks\.0\.attn\.out",),
                                 beta1=0.5, beta2=0.25))
    ctl = AdaLoraController(m)
    (p,) = adalora_parts(m)["blocks.0.attn.out"].values()
    with torch.no_grad():
        p.lora_E.fill_(2.0)
    for t in ("lora_A", "lora_B"):
        getattr(p, t).grad = torch.zeros_like(getattr(p, t))
    p.lora_E.grad = torch.full_like(p.lora_E, 3.0)   # I_1 = |2 · 3| = 6
    ctl.update_ipt()
    # Ī_1 = 0.5·0 + 0.5·6 = 3;  Ū_1 = 0.25·0 + 0.75·|6 - 3| = 2.25
    key = ("blocks.0.attn.out", "o", "lora_E")
    torch.testing.assert_close(ctl.exp_avg_ipt[key], torch.full((2, 1), 3.0))
    torch.testing.assert_close(ctl.exp_avg_unc[key], torch.full((2, 1), 2.25))
    p.lora_E.grad = torch.full_like(p.lora_E, -1.0)  # I_2 = |2 · -1| = 2
    ctl.update_ipt()
    # Ī_2 = 0.5·3 + 0.5·2 = 2.5;  Ū_2 = 0.25·2.25 + 0.75·|2 - 2.5| = 0.9375;  s = 2.5 · 0.9375
    torch.testing.assert_close(ctl.exp_avg_ipt[key], torch.full((2, 1), 2.5))
    torch.testing.assert_close(ctl.exp_avg_unc[key], torch.full((2, 1), 0.9375))
    torch.testing.assert_close(ctl.triplet_scores()[("blocks.0.attn.out", "o")], torch.full((2,), 2.34375))


def test_budget_schedule_reaches_target_exactly():
    T, ti, tf, init_r, target_r = 14, 2, 4, 4, 2
    m = model(4)
    add_adalora(m, AdaLoraConfig(init_r=init_r, target_r=target_r, target_modules=("q", "v", "o", "down"),
                                 total_step=T, tinit=ti, tfinal=tf, deltaT=1))
    ctl = AdaLoraController(m)
    n = len(ctl.parts)
    assert n == 4 * m.cfg.n_layers
    # the cubic schedule itself
    budgets = [ctl.budget_schedule(t)[0] for t in range(1, T + 1)]
    assert budgets[:ti] == [init_r * n] * ti
    for t in range(ti + 1, T - tf):
        mul = 1 - (t - ti) / (T - tf - ti)
        assert budgets[t - 1] == int((init_r - target_r) * n * mul ** 3 + target_r * n)
    assert budgets[T - tf - 1:] == [target_r * n] * (tf + 1)
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    # training: the non-zero λ never exceed the budget and equal target_r·n exactly from T - t_f on
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for t in range(1, T + 1):
        x = ids(10 + t)
        opt.zero_grad()
        (m(x, labels=x).loss + 0.1 * orthogonal_regularization(m)).backward()
        opt.step()
        budget = ctl.update_and_allocate(t)
        nonzero = sum(ctl.ranks().values())
        if t <= ti:
            assert nonzero == init_r * n
        else:
            assert nonzero <= budget
        if t >= T - tf:
            assert nonzero == target_r * n, (t, nonzero)
    final = ctl.ranks()
    assert sum(final.values()) == target_r * n and len(set(final.values())) > 1  # ranks were re-allocated
