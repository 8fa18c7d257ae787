"""GRPO math: group advantages equal a hand loop and TRL's formula, k3 is the formula (and estimates the KL),
and for every loss type our loss, its gradient and its statistics equal TRL 1.16's own
GRPOTrainer._compute_loss, called unbound on a stand-in trainer whose log-prob method returns our tensors."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from llmlab.align.grpo import LOSS_TYPES, group_advantages, grpo_loss, k3_kl
from llmlab.align.ppo import ppo_policy_loss


# ------------------------------------------------------------------ group advantages
def hand_advantages(rewards, group_size, scale, eps=1e-4):
    out, everything = [], list(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        if scale == "group":
            std = statistics.stdev(group) if len(group) > 1 else 0.0  # unbiased (n - 1)
        elif scale == "batch":
            std = statistics.stdev(everything)
        out += [(r - mean) / (std + eps) if scale != "none" else r - mean for r in group]
    return torch.tensor(out, dtype=torch.float64)


def trl_advantages(rewards, group_size, scale):
    """The lines of GRPOTrainer._generate_and_score_completions (sum_then_normalize) with TRL's own nanstd."""
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_hand_loop_and_trl(scale, group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(16, generator=g, dtype=torch.float64)
    rewards[group_size:2 * group_size] = 0.5  # a group whose completions all tie: advantage 0
    ours = group_advantages(rewards, group_size, scale=scale)
    torch.testing.assert_close(ours, hand_advantages(rewards.tolist(), group_size, scale), atol=1e-12, rtol=0)
    # TRL's rewards are float32 (its nanstd takes the Bessel factor n/(n-1) in float32 even for float64 input).
    r32 = rewards.float()
    torch.testing.assert_close(group_advantages(r32, group_size, scale=scale), trl_advantages(r32, group_size, scale),
                               atol=1e-6, rtol=1e-6)
    assert torch.all(ours[group_size:2 * group_size] == 0)


def test_group_advantages_nan_aliases_and_group_of_one():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.0, 2.0, 4.0])  # one unscorable completion
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(group_advantages(rewards, 3, scale=scale), trl_advantages(rewards, 3, scale))
    assert group_advantages(rewards, 3)[1] == 0.0
    torch.testing.assert_close(group_advantages(rewards, 3, scale=True), group_advantages(rewards, 3))
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False), group_advantages(rewards, 3, scale="none"))
    assert torch.all(group_advantages(torch.tensor([1.0, 5.0]), 1) == 0)
    assert group_advantages(torch.tensor([1, 0, 0, 1]), 2).dtype == torch.float32  # integer rewards work


# ------------------------------------------------------------------ k3
def test_k3_is_the_formula_and_estimates_kl():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 4
    k3 = k3_kl(lp, ref)
    for a, b, k in zip(lp.flatten().tolist(), ref.flatten().tolist(), k3.flatten().tolist()):
        assert k == pytest.approx(math.exp(b - a) - (b - a) - 1, abs=1e-12)
    assert torch.all(k3 >= 0) and torch.all(k3_kl(lp, lp) == 0)
    # Unbiased: sampling x ~ p, the mean of k3 is KL(p‖q).
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    kl = (p * (p / q).log()).sum().item()
    assert k3_kl(p.log()[x], q.log()[x]).mean().item() == pytest.approx(kl, abs=5e-3)


# ------------------------------------------------------------------ parity with TRL's GRPOTrainer._compute_loss
class _OneProcess:
    num_processes = 1

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather


def trl_compute_loss(logprobs, old, ref, advantages, mask, *, beta, epsilon_low, epsilon_high, loss_type,
                     max_completion_length, importance_sampling_level, delta, kl_bias_correction, num_items):
    """TRL 1.16's GRPOTrainer._compute_loss on a stand-in trainer: only the attributes the method reads, and a
    _get_per_token_logps_and_entropies that returns our log-probs (TRL never sees a model)."""
    cfg = GRPOConfig  # dataclass defaults for the parameters we do not vary
    args = SimpleNamespace(
        delta=delta, use_bias_correction_kl=kl_bias_correction, steps_per_generation=1,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg, vespo_lambda_neg=cfg.vespo_lambda_neg)
    trainer = SimpleNamespace(
        args=args, beta=beta, loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, aux_loss_enabled=False, use_vllm=False,
        _entropy_bonus_enabled=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_OneProcess(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None))
    B, T = logprobs.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "num_items_in_batch": torch.tensor(float(num_items))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _case(**kw):
    base = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level="token", delta=None,
                kl_bias_correction=True, on_policy=False, global_items=False)
    return {**base, **kw}


CASES = {f"{lt}": _case(loss_type=lt) for lt in LOSS_TYPES}
CASES["cispo"]["epsilon_high"] = 1.3  # CISPO's ε_max caps the ratio itself
CASES.update({
    "grpo_sequence": _case(loss_type="grpo", importance_sampling_level="sequence"),
    "dapo_sequence": _case(loss_type="dapo", importance_sampling_level="sequence"),
    "luspo_sequence": _case(loss_type="luspo", importance_sampling_level="sequence"),
    "dr_grpo_sequence": _case(loss_type="dr_grpo", importance_sampling_level="sequence", beta=0.0),
    "grpo_no_kl": _case(loss_type="grpo", beta=0.0),
    "grpo_symmetric_plain_kl": _case(loss_type="grpo", epsilon_high=0.2, kl_bias_correction=False),
    "dapo_two_sided_delta": _case(loss_type="dapo", delta=1.25),
    "dapo_on_policy": _case(loss_type="dapo", on_policy=True),
    "dapo_global_tokens": _case(loss_type="dapo", global_items=True),
    "sapo_sequence": _case(loss_type="sapo", importance_sampling_level="sequence"),
})


@pytest.mark.parametrize("name", list(CASES))
def test_loss_equals_trl(name):
    c = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    B, T = 6, 7
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in (7, 5, 2, 7, 4, 1)], dtype=torch.float32)
    lp0 = -torch.rand(B, T, generator=g) * 3
    old = None if c["on_policy"] else lp0 + 0.3 * torch.randn(B, T, generator=g)
    ref = lp0 + 0.3 * torch.randn(B, T, generator=g) if c["beta"] else None
    adv = group_advantages(torch.randn(B, generator=g), 3)
    num_items = 23.0 if c["global_items"] else mask.sum().item()
    kw = dict(beta=c["beta"], epsilon_low=c["epsilon_low"], epsilon_high=c["epsilon_high"], loss_type=c["loss_type"],
              max_completion_length=10, importance_sampling_level=c["importance_sampling_level"], delta=c["delta"])

    lp_trl = lp0.clone().requires_grad_()
    want, metrics = trl_compute_loss(lp_trl, old, ref, adv, mask, **kw, kl_bias_correction=c["kl_bias_correction"],
                                     num_items=num_items)
    want.backward()
    lp = lp0.clone().requires_grad_()
    got, stats = grpo_loss(lp, old, ref, adv, mask, **kw, kl_bias_correction=c["kl_bias_correction"],
                           num_items_in_batch=num_items if c["global_items"] else None)
    got.backward()

    assert abs(got.item() - want.item()) < 1e-6, (got.item(), want.item())
    assert want.abs().item() > 1e-3  # a loss that is really there
    torch.testing.assert_close(lp.grad, lp_trl.grad, atol=1e-6, rtol=1e-5)
    shared = {k for k in metrics if k in stats}
    expected = {"kl"} if c["beta"] else set()
    expected |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"} \
        if c["loss_type"] in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") else set()
    expected |= {"cispo": {"cispo_clip_ratio"}, "vespo": {"vespo/phi_seq_mean"}}.get(c["loss_type"], set())
    assert expected <= shared, (expected, shared)
    for k in shared:
        assert stats[k].item() == pytest.approx(metrics[k], abs=1e-6), k


def test_trl_defaults_are_ours():
    import inspect

    cfg = GRPOConfig.__dataclass_fields__
    assert (cfg["loss_type"].default, cfg["beta"].default, cfg["epsilon"].default, cfg["scale_rewards"].default,
            cfg["importance_sampling_level"].default, cfg["use_bias_correction_kl"].default) == \
        ("dapo", 0.0, 0.2, "group", "token", True)
    ours = inspect.signature(grpo_loss).parameters
    assert (ours["loss_type"].default, ours["beta"].default, ours["epsilon_low"].default,
            ours["importance_sampling_level"].default, ours["kl_bias_correction"].default) == \
        ("dapo", 0.0, 0.2, "token", True)
    assert inspect.signature(group_advantages).parameters["scale"].default == "group"


# ------------------------------------------------------------------ formulas, independent of TRL
def test_asymmetric_clip_by_hand():
    ratios = torch.tensor([[1.25, 1.35, 0.75, 0.85]], dtype=torch.float64)
    lp = torch.log(ratios).requires_grad_()
    for adv, low, high in [(1.0, [0, 0, 0, 0], [0, 1, 0, 0]), (-1.0, [0, 0, 1, 0], [0, 0, 0, 0])]:
        loss, stats = grpo_loss(lp, torch.zeros_like(ratios), None, torch.tensor([adv], dtype=torch.float64),
                                torch.ones(1, 4), epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo")
        clipped = ratios.clamp(0.8, 1.28)
        want = torch.maximum(-adv * ratios, -adv * clipped).mean()
        assert loss.item() == pytest.approx(want.item(), abs=1e-12)
        assert stats["clip_ratio/low_mean"].item() == pytest.approx(sum(low) / 4)
        assert stats["clip_ratio/high_mean"].item() == pytest.approx(sum(high) / 4)
        assert stats["clip_ratio/region_mean"].item() == pytest.approx((sum(low) + sum(high)) / 4)


def test_aggregations_relate_as_documented():
    g = torch.Generator().manual_seed(9)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in (6, 2, 4)], dtype=torch.bool)
    lp, old = -torch.rand(3, 6, generator=g), -torch.rand(3, 6, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0])
    bnpo, _ = grpo_loss(lp, old, None, adv, mask, loss_type="bnpo")
    # bnpo with a symmetric clip and no KL is PPO's token-mean clipped surrogate.
    torch.testing.assert_close(bnpo, ppo_policy_loss(lp, old, adv, mask, clip_range=0.2)[0])
    dapo, _ = grpo_loss(lp, old, None, adv, mask, loss_type="dapo")
    torch.testing.assert_close(dapo, bnpo)  # one local batch = the whole batch
    dr, _ = grpo_loss(lp, old, None, adv, mask, loss_type="dr_grpo", max_completion_length=8)
    torch.testing.assert_close(dr * 3 * 8, bnpo * 12)
    grpo, _ = grpo_loss(lp, old, None, adv, mask, loss_type="grpo")
    rows = [grpo_loss(lp[i:i + 1], old[i:i + 1], None, adv[i:i + 1], mask[i:i + 1], loss_type="bnpo")[0]
            for i in range(3)]
    torch.testing.assert_close(grpo, torch.stack(rows).mean())
    luspo, _ = grpo_loss(lp, old, None, adv, mask, loss_type="luspo")
    torch.testing.assert_close(luspo, sum(r * n for r, n in zip(rows, (6, 2, 4))) / 3)


def test_bad_input_is_refused():
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    adv = torch.zeros(2)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        grpo_loss(x, x, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="epsilon_low"):
        grpo_loss(x, x, None, adv, mask, epsilon_low=0.0)
    with pytest.raises(ValueError, match="epsilon_high"):
        grpo_loss(x, x, None, adv, mask, epsilon_high=-0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(x, x, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(x, x, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(x, torch.zeros(2, 4), None, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, None, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="token, sequence"):
        grpo_loss(x, x, None, adv, mask, importance_sampling_level="row")
    with pytest.raises(ValueError, match="delta"):
        grpo_loss(x, x, None, adv, mask, delta=0.5)
    with pytest.raises(ValueError, match="dividing"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(6), 3, scale="std")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3)
