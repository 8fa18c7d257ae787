"""PPO math: GAE equals the textbook reverse loop under right padding, the clipped objectives clip exactly the
elements the formula says (and pass no gradient there), whitening matches numpy with TRL's unbiased variance,
the KL-penalised rewards put the score on the last real token, the adaptive KL controller follows Ziegler et
al., entropy matches TRL's entropy_from_logits, the value head sits on our Transformer; bad input is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits

from llmlab.align.ppo import (
    AdaptiveKLController,
    FixedKLController,
    ValueHead,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from llmlab.model import ModelConfig, Transformer

LENGTHS = [6, 3, 1, 0, 4]
T = 6


def right_mask(lengths, t=T):
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths], dtype=torch.bool)


def reference_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one row at a time over its real tokens only, in plain Python floats."""
    adv = [[0.0] * T for _ in lengths]
    ret = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[i][t + 1] if t + 1 < n else 0.0  # the episode ends after token n-1
            delta = rewards[i][t] + gamma * next_value - values[i][t]
            last = delta + gamma * lam * last
            adv[i][t] = last
            ret[i][t] = last + values[i][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (0.9, 1.0)])
def test_gae_equals_reverse_loop_with_padding(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)  # garbage after each row's end
    mask = right_mask(LENGTHS)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-12, rtol=0)
    # The padding really is ignored: nan/inf rewards and values there change nothing.
    junk = ~mask
    adv2, ret2 = gae(rewards.masked_fill(junk, float("nan")), values.masked_fill(junk, float("inf")), mask,
                     gamma=gamma, lam=lam)
    torch.testing.assert_close(adv2, adv, atol=0, rtol=0)
    torch.testing.assert_close(ret2, ret, atol=0, rtol=0)


def test_gae_special_cases():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.125, 9.0]])
    mask = right_mask([3], t=4)
    # γ = λ = 1: A_t = Σ_{k≥t} r_k - V_t (Monte Carlo return minus baseline); returns are the rewards-to-go.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.75, 0.875, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # λ = 0: A_t = δ_t, the one-step TD error.
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.25 - 0.5, 0.125 - 0.25, 1.0 - 0.125, 0.0]]))
    # A 0 inside the mask ends the episode: the two pieces are independent episodes.
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(1, 5, generator=g), torch.randn(1, 5, generator=g)
    holed = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)
    adv, _ = gae(r, v, holed, gamma=0.9, lam=0.8)
    first, _ = gae(r[:, :2], v[:, :2], holed[:, :2], gamma=0.9, lam=0.8)
    second, _ = gae(r[:, 3:], v[:, 3:], holed[:, 3:], gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.cat([first, torch.zeros(1, 1), second], dim=1))
    # Targets carry no gradient.
    v = values.clone().requires_grad_()
    assert not gae(rewards, v, mask)[0].requires_grad


def test_policy_loss_clips_exactly_the_formula_elements():
    ratios = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5],
                           [0.5, 0.9, 1.0, 1.1, 1.5],
                           [2.0, 0.7, 1.3, 1.0, 0.1]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    # By hand (ε = 0.2): A > 0 binds above 1.2, A < 0 binds below 0.8; masked elements never count.
    expected_clipped = torch.tensor([[0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    logprobs = torch.log(ratios).requires_grad_()
    old = torch.zeros_like(ratios)
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)

    terms = []
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                a, r = advantages[i].item(), ratios[i, j].item()
                terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert stats["clip_frac"].item() == pytest.approx(3 / 13)
    log_r = torch.log(ratios)[mask]
    assert stats["approx_kl"].item() == pytest.approx((0.5 * log_r ** 2).mean().item())
    assert stats["approx_kl_k3"].item() == pytest.approx((torch.expm1(log_r) - log_r).mean().item())
    assert stats["ratio_mean"].item() == pytest.approx(ratios[mask].mean().item())
    # Clipped (and masked) elements pass no gradient; every other element does: -A·ρ / n.
    loss.backward()
    grad = logprobs.grad
    assert torch.all(grad[expected_clipped | ~mask] == 0)
    live = mask & ~expected_clipped
    torch.testing.assert_close(grad[live], (-advantages[:, None] * ratios / 13).expand(3, 5)[live])


def test_policy_loss_per_token_advantages_and_no_clip_at_ratio_one():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    mask = right_mask([4, 2, 3], t=4)
    loss, stats = ppo_policy_loss(lp, lp.clone(), adv, mask)  # on-policy: ρ = 1, nothing clipped
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-6)
    assert stats["clip_frac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[0.1, 0.5, -0.5, 0.3, 7.0]], requires_grad=True)
    old = torch.zeros(1, 5)
    returns = torch.tensor([[1.0, 1.0, 0.0, -1.0, 0.0]])
    mask = right_mask([4], t=5)
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # V_clip = [0.1, 0.2, -0.2, 0.2]; errors [0.81, 0.25, 0.25, 1.69]; clipped errors [0.81, 0.64, 0.04, 1.44]
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 0.25 + 1.69) / 4, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 4)  # only element 1: its clipped error is larger
    loss.backward()
    # Element 1 takes the clipped branch (V beyond the clip: no gradient); the others ½·2(V-R)/4.
    torch.testing.assert_close(values.grad, torch.tensor([[(0.1 - 1) / 4, 0.0, -0.5 / 4, 1.3 / 4, 0.0]]))
    plain, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=None)
    assert plain.item() == pytest.approx(0.5 * (0.81 + 0.25 + 0.25 + 1.69) / 4, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0


def test_whitening_matches_numpy_unbiased():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 2
    mask = right_mask([7, 5, 2, 6], t=7)
    xm = x.numpy()[mask.numpy()]
    assert masked_mean(x, mask).item() == pytest.approx(xm.mean())
    assert masked_var(x, mask).item() == pytest.approx(xm.var(ddof=1))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(xm.var(ddof=0))
    want = (x.numpy() - xm.mean()) / np.sqrt(xm.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(masked_whiten(x, mask).numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False).numpy(), want + xm.mean(), rtol=1e-10)
    w = masked_whiten(x, mask)[mask]
    assert w.mean().item() == pytest.approx(0.0, abs=1e-12) and w.var().item() == pytest.approx(1.0, abs=1e-6)
    # Per-row means; padding (even inf) is never read; one element: variance 0, not TRL's 0/0.
    row_means = [r[m].mean() for r, m in zip(x.numpy(), mask.numpy())]
    np.testing.assert_allclose(masked_mean(x, mask, dim=1).numpy(), row_means)
    assert torch.isfinite(masked_mean(x.masked_fill(~mask, float("inf")), mask))
    one = right_mask([1], t=3)
    assert masked_var(torch.tensor([[2.0, 5.0, 9.0]]), one).item() == 0.0
    with pytest.raises(ValueError, match="no element"):
        masked_mean(x, torch.zeros_like(mask))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalized_rewards_placement(estimator):
    g = torch.Generator().manual_seed(5)
    lengths = [4, 2, 5]
    mask = right_mask(lengths, t=5)
    logprobs = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    scores = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1, kl_estimator=estimator)
    for i, n in enumerate(lengths):
        for t in range(5):
            lr = ref[i, t].item() - logprobs[i, t].item()
            k = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1 - lr}[estimator] if t < n else 0.0
            assert kl[i, t].item() == pytest.approx(k, abs=1e-12)
            want = -0.1 * k + (scores[i].item() if t == n - 1 else 0.0)
            assert rewards[i, t].item() == pytest.approx(want, abs=1e-12)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    coef = 0.2
    for kl, n in [(12.0, 256), (5.4, 256), (0.0, 512), (6.3, 128)]:
        error = min(max(kl / 6.0 - 1, -0.2), 0.2)
        coef *= 1 + error * n / 10000
        assert ctl.update(kl, n) == pytest.approx(coef, rel=1e-12)
        assert ctl.value == pytest.approx(coef, rel=1e-12)
    assert coef != 0.2
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


def test_entropy_matches_trl_and_the_definition():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    ours = entropy_from_logits(logits, chunk_size=4)  # 15 rows in chunks of 4 (the last one short)
    torch.testing.assert_close(ours, trl_entropy_from_logits(logits), atol=1e-6, rtol=1e-6)
    p = logits.double().softmax(-1)
    torch.testing.assert_close(ours.double(), -(p * p.log()).sum(-1), atol=1e-6, rtol=1e-6)
    # Masked vocabulary entries (-inf) contribute nothing instead of nan.
    masked = logits.clone()
    masked[..., 6:] = float("-inf")
    torch.testing.assert_close(entropy_from_logits(masked), entropy_from_logits(logits[..., :6]))


def test_value_head_on_transformer_hidden_states():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano")).eval()
    head = ValueHead(model.cfg.dim)
    ids = torch.randint(0, 512, (2, 7))
    out = model(ids, torch.ones_like(ids), return_logits=False)
    assert out.logits is None  # the LM head is skipped
    values = head(out.hidden_states)
    assert values.shape == (2, 7)
    torch.testing.assert_close(values, out.hidden_states @ head.proj.weight[0] + head.proj.bias)
    mask = right_mask([7, 4], t=7)
    loss, _ = ppo_value_loss(values, values.detach(), torch.randn(2, 7), mask)
    loss.backward()
    assert head.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="dim"):
        head(torch.randn(2, 7, model.cfg.dim + 1))


def test_bad_input_is_refused():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        gae(x, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, mask, gamma=1.5)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(x, x, x, mask, clip_range=0.0)
    with pytest.raises(ValueError, match="clip_range_value"):
        ppo_value_loss(x, x, x, mask, clip_range_value=-0.1)
    with pytest.raises(ValueError, match="shape"):
        ppo_policy_loss(x, x, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalized_rewards(torch.zeros(2), x, x, mask, kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="scores"):
        kl_penalized_rewards(torch.zeros(3), x, x, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="at least one"):
        kl_penalized_rewards(torch.zeros(2), x, x, right_mask([3, 0], t=3), kl_coef=0.1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
