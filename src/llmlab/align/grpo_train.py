"""GRPO training (Shao et al. 2024, "DeepSeekMath", sec. 4): online RL with a group baseline and no critic.

    from llmlab.align.grpo_train import GRPOConfig, grpo
    result = grpo(load_recipe(GRPOConfig, "recipes/grpo/smollm2_arithmetic.yaml", ["train.steps=50"]))

Each step: draw train.prompts_per_step prompts, sample group_size completions of each with the inference
engine (align.rollout), score them with the configured reward functions (weighted sum), turn the scores into
group-relative advantages Â_i = (r_i - mean_group) / (std_group + 1e-4), compute the rollout policy's
log-probs (when they are needed: several passes or minibatches) and the reference's (for the KL penalty and
the KL the loop watches), then make num_iterations (μ) passes over the completions in `minibatches` AdamW
steps each, minimising align.grpo.grpo_loss (the clipped surrogate + β·KL, aggregated per loss_type).

Defaults are TRL 1.16's GRPOConfig: loss_type dapo, beta 0, epsilon 0.2 (epsilon_high = epsilon), scale_rewards
group, one pass (μ = 1), log-probs at the sampling temperature. Held-out prompts are decoded greedily before
training, every train.eval_every steps and at the end: exact-answer accuracy (for tasks with answers) and mean
reward go to metrics.jsonl ("eval" records) and eval.json. The rest of out_dir is align/online.py's.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field

import torch

from ..train.supervised import SFTPeft
from .grpo import IS_LEVELS, LOSS_TYPES, REWARD_SCALES, group_advantages, grpo_loss
from .online import (OnlineLoop, OnlineResult, OnlineTrain, Policy, RolloutConfig, check_peft, importance_kl, k3,
                     logprobs, masked_mean, rollout_mask, start_online)
from .rollout import Rollouts
from .tasks import PromptData, PromptSampler, RewardConfig, Scorer, columns


def _grpo_train_defaults() -> OnlineTrain:
    return OnlineTrain(steps=200, prompts_per_step=8, lr=1e-6)


@dataclass
class GRPOConfig:
    out_dir: str = "runs/grpo"
    seed: int = 0
    model: str = "smollm2-135m-instruct"  # the policy (anything llmlab.load reads)
    data: PromptData = field(default_factory=PromptData)
    train: OnlineTrain = field(default_factory=_grpo_train_defaults)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_tokens=256))
    reward: RewardConfig = field(default_factory=RewardConfig)
    peft: SFTPeft = field(default_factory=SFTPeft)
    group_size: int = 8  # completions per prompt (TRL's num_generations)
    num_iterations: int = 1  # μ: passes over each step's completions
    minibatches: int = 1  # AdamW steps per pass (the completions split into this many shuffled minibatches)
    micro_batch_size: int = 0  # rows per forward/backward (gradient accumulation); 0: a whole minibatch
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo (align/grpo.py)
    beta: float = 0.0  # KL penalty coefficient (DeepSeekMath used 0.04; TRL's default is 0)
    epsilon: float = 0.2  # clip range ε_low
    epsilon_high: float | None = None  # ε_high (DAPO's clip-higher, e.g. 0.28); None: epsilon
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    max_completion_length: int = 0  # dr_grpo's constant normaliser; 0: rollout.max_tokens
    mask_truncated_completions: bool = False  # completions cut at max_tokens get no loss (DAPO)
    log_kl: bool = True  # compute the reference log-probs even at beta 0 (KL in the metrics; kl_stop needs them)

    def __post_init__(self) -> None:
        self.train.validate()
        self.rollout.validate()
        self.reward.validate()
        self.data.validate()
        check_peft(self.peft)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (got {self.group_size}): GRPO's baseline is the mean reward of "
                             "the group of completions of one prompt; set group_size=8 as TRL's num_generations")
        if self.loss_type not in LOSS_TYPES:
            close = difflib.get_close_matches(self.loss_type, LOSS_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown loss_type {self.loss_type!r}{hint}; choose one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in REWARD_SCALES:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: choose one of {', '.join(REWARD_SCALES)}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}: choose one of "
                             f"{', '.join(IS_LEVELS)}")
        if self.num_iterations < 1 or self.minibatches < 1 or self.micro_batch_size < 0:
            raise ValueError("num_iterations and minibatches must be >= 1 and micro_batch_size >= 0 (0: a whole "
                             f"minibatch); got {self.num_iterations}, {self.minibatches}, {self.micro_batch_size}")
        rows = self.train.prompts_per_step * self.group_size
        if self.minibatches > rows:
            raise ValueError(f"minibatches={self.minibatches} is more than the {rows} completions of a step "
                             "(train.prompts_per_step × group_size)")
        if self.beta < 0 or not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ValueError(f"beta must be >= 0 and epsilon, epsilon_high > 0; got {self.beta}, {self.epsilon}, "
                             f"{self.epsilon_high}")


class _GRPOStep:
    """One GRPO step on the loop's policy; keeps the last batch for the checkpoint check."""

    def __init__(self, cfg: GRPOConfig, loop: OnlineLoop, policy: Policy, train: list[dict], scorer: Scorer,
                 sampler: PromptSampler):
        self.cfg, self.loop, self.policy, self.train, self.scorer = cfg, loop, policy, train, scorer
        self.sampler = sampler
        r = cfg.rollout
        self.roll = Rollouts(policy.model, policy.tokenizer, max_tokens=r.max_tokens, temperature=r.temperature,
                             top_p=r.top_p, top_k=r.top_k, stop=r.stop, chat_template=cfg.data.chat_template,
                             max_num_seqs=r.max_num_seqs)
        self.with_ref = cfg.beta > 0 or cfg.log_kl or cfg.train.kl_stop > 0
        self.last = None

    def lp(self, model, tensors, entropy=False):
        return logprobs(model, tensors, temperature=self.cfg.rollout.temperature, entropy=entropy)

    def verify(self) -> float:
        """KL of the current weights to the reference on the last batch (NaN if their log-probs are not finite)."""
        tensors, old, ref, mask = self.last
        if ref is None:  # no reference kept: only check that the weights still give finite log-probs
            with torch.no_grad(), self.loop.autocast():
                now = self.lp(self.policy.model, tensors)
            return 0.0 if bool(torch.isfinite(now[mask]).all()) else float("nan")
        with self.loop.autocast():
            return importance_kl(self.policy.model, tensors, old, ref, mask, self.cfg.rollout.temperature)

    def __call__(self, step: int) -> dict:
        cfg, loop, model = self.cfg, self.loop, self.policy.model
        G = cfg.group_size
        items = [self.train[i] for i in self.sampler.next(cfg.train.prompts_per_step)]
        t0 = time.perf_counter()
        batch = loop.sample(lambda: self.roll.sample([x["prompt"] for x in items], n=G,
                                                     seed=cfg.seed * 1_000_003 + step))
        rollout_s = time.perf_counter() - t0
        rewards, parts = self.scorer(batch.prompts, batch.texts, finish_reasons=batch.finish_reasons,
                                     prompt_ids=batch.prompt_ids, completion_ids=batch.completion_ids,
                                     cols=columns(items, repeat=G))
        adv = group_advantages(rewards, G, scale=cfg.scale_rewards).to(batch.input_ids.device)
        mask = rollout_mask(batch)
        truncated = torch.tensor([r == "length" for r in batch.finish_reasons], device=mask.device)
        if cfg.mask_truncated_completions:
            mask = mask & ~truncated[:, None]
        tensors = batch.tensors()
        N = len(batch)
        need_old = cfg.num_iterations > 1 or cfg.minibatches > 1
        with torch.no_grad(), loop.autocast():
            old = self.lp(model, tensors) if need_old else None
            ref = None
            if self.with_ref:
                with self.policy.reference() as reference:
                    ref = self.lp(reference, tensors)
        if old is not None and ref is not None:
            loop.check_kl(masked_mean(k3(old, ref), mask))
        first = torch.zeros_like(mask, dtype=torch.float32) if old is None else None  # pass-1 log-probs (= old)

        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        L = cfg.max_completion_length or cfg.rollout.max_tokens
        acc: dict[str, float] = {}
        losses, norms, ent_sum, ent_n = [], [], 0.0, 0
        for it in range(cfg.num_iterations):
            order = torch.randperm(N, generator=gen) if cfg.minibatches > 1 else torch.arange(N)
            for mb in order.tensor_split(cfg.minibatches):
                mb = mb.to(mask.device)
                mb_tokens = mask[mb].sum().clamp(min=1)
                step_loss = 0.0
                micro = cfg.micro_batch_size or len(mb)
                for rows in mb.split(micro):
                    sub = {k: v[rows] for k, v in tensors.items()}
                    with loop.autocast():
                        lp, ent = self.lp(model, sub, entropy=True)
                    loss, stats = grpo_loss(
                        lp, None if old is None else old[rows], None if ref is None else ref[rows], adv[rows],
                        mask[rows], beta=cfg.beta, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                        loss_type=cfg.loss_type, max_completion_length=L,
                        importance_sampling_level=cfg.importance_sampling_level, num_items_in_batch=mb_tokens)
                    # micro-batches add up to the minibatch's loss (see the normalisations in grpo_loss)
                    if cfg.loss_type in ("dapo", "cispo", "vespo"):
                        w = 1.0
                    elif cfg.loss_type == "bnpo":
                        w = float(mask[rows].sum() / mb_tokens)
                    else:
                        w = len(rows) / len(mb)
                    (loss * w).backward()
                    step_loss += float(loss.detach()) * w
                    n_tok = int(mask[rows].sum())
                    for k, v in stats.items():
                        acc[k] = acc.get(k, 0.0) + float(v) * n_tok
                    acc["_tokens"] = acc.get("_tokens", 0.0) + n_tok
                    if it == 0:
                        ent_sum += float((ent.detach() * mask[rows]).sum())
                        ent_n += n_tok
                        if first is not None:
                            first[rows] = lp.detach().float()
                if first is not None and ref is not None and len(losses) == 0:  # before the first update
                    loop.check_kl(masked_mean(k3(first, ref), mask))
                norms.append(loop.optimizer_step(step_loss))
                losses.append(step_loss)
        old_or_first = old if old is not None else first
        self.last = (tensors, old_or_first, ref, mask)

        group_std = rewards.view(-1, G).std(dim=1)
        lengths = torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float32)
        record = {
            "reward": float(rewards.mean()), "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((group_std < 1e-6).float().mean()),
            **{f"rewards/{k}/mean": float(torch.nanmean(v)) for k, v in parts.items()},
            "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
            "entropy": ent_sum / max(ent_n, 1),
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float(truncated.float().mean()),
            "rollout_s": rollout_s, "tokens": int(batch.attention_mask.sum()),
        }
        if ref is not None:
            record["kl"] = masked_mean(k3(old_or_first, ref), mask)
        n_tok = acc.pop("_tokens", 1.0)
        record.update({k: v / max(n_tok, 1.0) for k, v in acc.items() if k != "kl"})
        return record


def grpo(cfg: GRPOConfig) -> OnlineResult:
    run = start_online(cfg)
    train, held, policy = run.train, run.held, run.policy
    loop = OnlineLoop(cfg.train, run.out, policy, name="GRPO", state={"prompts": run.sampler})
    step = _GRPOStep(cfg, loop, policy, train, run.scorer, run.sampler)
    if cfg.train.progress:
        from ..train.pretraining import trainer_note

        trainer_note(f"GRPO of {cfg.model}: {len(train):,} training prompts, {len(held):,} held out; "
                     f"{cfg.train.prompts_per_step} prompts × {cfg.group_size} completions a step; "
                     f"loss {cfg.loss_type}, beta {cfg.beta}; rewards {', '.join(cfg.reward.functions)}; "
                     f"out_dir {run.out}")
        if cfg.peft.method != "none":
            trainer_note(policy.peft.describe())
    return loop.run(step, run.evaluator(cfg), step.verify)


__all__ = ["GRPOConfig", "grpo"]
