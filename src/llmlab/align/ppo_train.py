"""PPO for RLHF (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022,
InstructGPT): a policy, a value function, a reward (a reward model or reward functions) and a KL penalty to the
policy as it starts.

    from llmlab.align.ppo_train import PPOConfig, ppo
    result = ppo(load_recipe(PPOConfig, "recipes/ppo/smollm2_sentiment.yaml", ["train.steps=50"]))

Each step: sample one completion for each of train.prompts_per_step prompts (align.rollout); score them
(reward.functions, e.g. lexicon_sentiment, or `model` with reward.model=PATH); compute, without gradients, the
policy's log-probs and values and the reference's log-probs; fold the KL into per-token rewards
(r_t = -β·KL_t, plus the score at the last token; align.ppo.kl_penalized_rewards); GAE advantages and returns
(γ, λ), advantages whitened; then ppo_epochs passes over the rollouts in `minibatches` AdamW steps each,
minimising  L = L_clip(policy) + vf_coef · L_value(clipped)  (align.ppo). β is fixed, or adapted towards
kl_target after each step (Ziegler et al. sec. 2.2) from the mean summed KL per completion.

The value function: value_model=shared puts a ValueHead on the policy's final hidden states (one forward gives
log-probs and values; the value loss trains the shared body too), value_model=separate trains a critic: a copy
of the starting policy (all its weights) with its own head, as TRL's PPOTrainer keeps a separate value model.
Defaults follow TRL's PPOConfig (0.x): 4 epochs, clip 0.2, value clip 0.2, vf_coef 0.1, γ 1, λ 0.95,
kl_coef 0.05 with the k1 estimator. Logged: reward, kl (per-token k3, what kl_stop watches), kl_seq (summed
per completion, the controller's), kl_coef, entropy, policy/clip_frac, value/clip_frac, loss/policy,
loss/value, value/explained_variance (the rollout's values against its returns). out_dir as align/online.py,
plus value_head.safetensors (and critic/ for a separate critic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..train.supervised import SFTPeft, plain_model
from .online import (OnlineLoop, OnlineResult, OnlineTrain, Policy, RolloutConfig, check_peft, importance_kl, k3,
                     logprobs, masked_mean, rollout_mask, start_online)
from .ppo import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, ValueHead, gae, kl_penalized_rewards,
                  masked_var, masked_whiten, ppo_policy_loss, ppo_value_loss)
from .rollout import Rollouts
from .tasks import PromptData, PromptSampler, RewardConfig, Scorer, columns


def _ppo_train_defaults() -> OnlineTrain:
    return OnlineTrain(steps=200, prompts_per_step=16, lr=3e-6)


@dataclass
class PPOConfig:
    out_dir: str = "runs/ppo"
    seed: int = 0
    model: str = "smollm2-135m-instruct"
    data: PromptData = field(default_factory=lambda: PromptData(source="sentiment", n_eval=8))
    train: OnlineTrain = field(default_factory=_ppo_train_defaults)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_tokens=48))
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(functions=["lexicon_sentiment"]))
    peft: SFTPeft = field(default_factory=SFTPeft)
    value_model: str = "shared"  # shared | separate
    ppo_epochs: int = 4  # passes over each step's rollouts
    minibatches: int = 1  # AdamW steps per pass
    micro_batch_size: int = 0  # rows per forward/backward; 0: a whole minibatch
    clip_range: float = 0.2  # ε of the policy ratio
    clip_range_value: float = 0.2  # value clipping around the rollout's values; 0: off
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # β (the initial one when adaptive)
    kl_estimator: str = "k1"  # k1 | k2 | k3 (of the per-token KL folded into the rewards)
    adaptive_kl: bool = False
    kl_target: float = 6.0  # adaptive: target summed KL per completion (nats)
    kl_horizon: float = 10000.0  # adaptive: samples over which β moves by at most ±20%
    whiten_advantages: bool = True
    whiten_rewards: bool = False  # scale the per-token rewards by their std before GAE (TRL's option)

    def __post_init__(self) -> None:
        self.train.validate()
        self.rollout.validate()
        self.reward.validate()
        self.data.validate()
        check_peft(self.peft)
        if self.value_model not in ("shared", "separate"):
            raise ValueError(f"value_model={self.value_model!r}: use shared (a value head on the policy) or separate "
                             "(a critic copied from the starting policy)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: choose one of {', '.join(KL_ESTIMATORS)}")
        if self.ppo_epochs < 1 or self.minibatches < 1 or self.micro_batch_size < 0:
            raise ValueError("ppo_epochs and minibatches must be >= 1 and micro_batch_size >= 0; got "
                             f"{self.ppo_epochs}, {self.minibatches}, {self.micro_batch_size}")
        if self.minibatches > self.train.prompts_per_step:
            raise ValueError(f"minibatches={self.minibatches} is more than the {self.train.prompts_per_step} "
                             "rollouts of a step (train.prompts_per_step)")
        if not self.clip_range > 0 or self.clip_range_value < 0 or self.vf_coef < 0 or self.kl_coef < 0:
            raise ValueError("clip_range must be > 0 and clip_range_value, vf_coef, kl_coef >= 0; got "
                             f"{self.clip_range}, {self.clip_range_value}, {self.vf_coef}, {self.kl_coef}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must lie in [0, 1], got {self.gamma} and {self.lam}")
        if self.adaptive_kl and not (self.kl_coef > 0 and self.kl_target > 0 and self.kl_horizon > 0):
            raise ValueError("adaptive_kl needs kl_coef, kl_target and kl_horizon > 0")


class _Critic(nn.Module):
    """V(s_t): a value head on hidden states, of the policy's body (shared) or of its own body (separate)."""

    def __init__(self, dim: int, body: nn.Module | None = None):
        super().__init__()
        self.head = ValueHead(dim)
        self.body = body

    def values(self, tensors: dict, policy_states: torch.Tensor | None) -> torch.Tensor:
        """[N, T-1]: the value of the state before each token of input_ids[:, 1:] (the log-prob grid)."""
        if self.body is not None:
            out = self.body(tensors["input_ids"], tensors["attention_mask"], return_logits=False)
            policy_states = out.hidden_states
        return self.head(policy_states[:, :-1]).float()


class _KLState:
    def __init__(self, ctl):
        self.ctl = ctl

    def state_dict(self) -> dict:
        return {"value": self.ctl.value}

    def load_state_dict(self, state: dict) -> None:
        self.ctl.value = float(state["value"])


class _PPOStep:
    def __init__(self, cfg: PPOConfig, loop: OnlineLoop, policy: Policy, train: list[dict], scorer: Scorer,
                 critic: _Critic, sampler: PromptSampler, kl_ctl):
        self.cfg, self.loop, self.policy, self.train, self.scorer = cfg, loop, policy, train, scorer
        self.critic, self.sampler, self.kl_ctl = critic, sampler, kl_ctl
        r = cfg.rollout
        self.roll = Rollouts(policy.model, policy.tokenizer, max_tokens=r.max_tokens, temperature=r.temperature,
                             top_p=r.top_p, top_k=r.top_k, stop=r.stop, chat_template=cfg.data.chat_template,
                             max_num_seqs=r.max_num_seqs)
        self.last = None

    def forward(self, tensors: dict, entropy: bool = False):
        """(log-probs, entropies or None, values), [N, T-1] each; one policy forward feeds the shared value head
        (a forward hook catches the final hidden states token_logprobs computes)."""
        states = []
        hook = None
        if self.critic.body is None:
            hook = self.policy.model.register_forward_hook(lambda m, a, out: states.append(out.hidden_states))
        try:
            out = logprobs(self.policy.model, tensors, temperature=self.cfg.rollout.temperature, entropy=entropy)
        finally:
            if hook is not None:
                hook.remove()
        lp, ent = out if entropy else (out, None)
        return lp, ent, self.critic.values(tensors, states[0] if states else None)

    def verify(self) -> float:
        tensors, old, ref, mask = self.last
        with self.loop.autocast():
            return importance_kl(self.policy.model, tensors, old, ref, mask, self.cfg.rollout.temperature)

    def __call__(self, step: int) -> dict:
        cfg, loop = self.cfg, self.loop
        items = [self.train[i] for i in self.sampler.next(cfg.train.prompts_per_step)]
        t0 = time.perf_counter()
        batch = loop.sample(lambda: self.roll.sample([x["prompt"] for x in items], n=1,
                                                     seed=cfg.seed * 1_000_003 + step))
        rollout_s = time.perf_counter() - t0
        scores, parts = self.scorer(batch.prompts, batch.texts, finish_reasons=batch.finish_reasons,
                                    prompt_ids=batch.prompt_ids, completion_ids=batch.completion_ids,
                                    cols=columns(items))
        tensors, mask, N = batch.tensors(), rollout_mask(batch), len(batch)
        with torch.no_grad(), loop.autocast():
            old, _, old_values = self.forward(tensors)
            with self.policy.reference() as reference:
                ref = logprobs(reference, tensors, temperature=cfg.rollout.temperature)
        kl_tok = masked_mean(k3(old, ref), mask)
        loop.check_kl(kl_tok)
        beta = self.kl_ctl.value
        scores = scores.to(old.device)
        rewards, kl = kl_penalized_rewards(scores, old, ref, mask, kl_coef=beta, kl_estimator=cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        adv, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask) * mask
        explained = 1 - float(masked_var(returns - old_values, mask) / masked_var(returns, mask).clamp(min=1e-12))

        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        clip_v = cfg.clip_range_value or None
        acc: dict[str, float] = {}
        n_acc, norms, losses = 0, [], []
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(N, generator=gen) if cfg.minibatches > 1 else torch.arange(N)
            for mb in order.tensor_split(cfg.minibatches):
                mb = mb.to(mask.device)
                mb_tokens = int(mask[mb].sum())
                step_loss = 0.0
                for rows in mb.split(cfg.micro_batch_size or len(mb)):
                    sub = {k: v[rows] for k, v in tensors.items()}
                    with loop.autocast():
                        lp, ent, values = self.forward(sub, entropy=True)
                    m = mask[rows]
                    pg, ps = ppo_policy_loss(lp, old[rows], adv[rows], m, clip_range=cfg.clip_range)
                    vl, vs = ppo_value_loss(values, old_values[rows], returns[rows], m, clip_range_value=clip_v)
                    loss = pg + cfg.vf_coef * vl
                    w = int(m.sum()) / max(mb_tokens, 1)  # masked means: micro-batches weighted by their tokens
                    (loss * w).backward()
                    step_loss += float(loss.detach()) * w
                    n_tok = int(m.sum())
                    stats = {"loss/policy": pg.detach(), "loss/value": vl.detach(), "policy/clip_frac": ps["clip_frac"],
                             "policy/approx_kl": ps["approx_kl"], "value/clip_frac": vs["clip_frac"],
                             "entropy": masked_mean(ent.detach(), m) if epoch == 0 else None}
                    for k, v in stats.items():
                        if v is not None:
                            acc[k] = acc.get(k, 0.0) + float(v) * n_tok
                            acc[f"_n/{k}"] = acc.get(f"_n/{k}", 0) + n_tok
                n_acc += 1
                norms.append(loop.optimizer_step(step_loss))
                losses.append(step_loss)
        self.last = (tensors, old, ref, mask)

        kl_seq = float(kl.sum(dim=1).mean())
        self.kl_ctl.update(kl_seq, N)
        lengths = torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float32)
        record = {
            "reward": float(scores.mean()), "reward_std": float(scores.std()) if N > 1 else 0.0,
            **{f"rewards/{k}/mean": float(torch.nanmean(v)) for k, v in parts.items()},
            "kl": kl_tok, "kl_seq": kl_seq, "kl_coef": beta,
            "non_score_reward": float((-beta * kl).sum(dim=1).mean()),
            "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
            "value/explained_variance": explained, "value/mean": masked_mean(old_values, mask),
            "returns/mean": masked_mean(returns, mask),
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": sum(r == "length" for r in batch.finish_reasons) / N,
            "rollout_s": rollout_s, "tokens": int(batch.attention_mask.sum()),
        }
        record.update({k: v / max(acc[f"_n/{k}"], 1) for k, v in acc.items() if not k.startswith("_n/")})
        return record


def ppo(cfg: PPOConfig) -> OnlineResult:
    from safetensors.torch import save_file

    from ..io import save_checkpoint

    run = start_online(cfg)
    train, held, policy, out = run.train, run.held, run.policy, run.out
    body = plain_model(policy.model).train(False) if cfg.value_model == "separate" else None  # the starting weights
    critic = _Critic(policy.model.cfg.dim, body).to(policy.device)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else \
        FixedKLController(cfg.kl_coef)
    loop = OnlineLoop(cfg.train, out, policy, name="PPO", modules={"critic": critic},
                      state={"prompts": run.sampler, "kl_coef": _KLState(kl_ctl)})
    step = _PPOStep(cfg, loop, policy, train, run.scorer, critic, run.sampler, kl_ctl)
    if cfg.train.progress:
        from ..train.pretraining import trainer_note

        trainer_note(f"PPO of {cfg.model}: {len(train):,} training prompts, {len(held):,} held out; "
                     f"{cfg.train.prompts_per_step} rollouts a step, {cfg.ppo_epochs} epochs; value model "
                     f"{cfg.value_model}; kl_coef {cfg.kl_coef}{' (adaptive)' if cfg.adaptive_kl else ''}; rewards "
                     f"{', '.join(cfg.reward.functions)}; out_dir {out}")
        if cfg.peft.method != "none":
            trainer_note(policy.peft.describe())
    result = loop.run(step, run.evaluator(cfg), step.verify)
    save_file({k: v.detach().contiguous().cpu() for k, v in critic.head.state_dict().items()},
              str(out / "value_head.safetensors"))
    if critic.body is not None:
        save_checkpoint(critic.body, out / "critic", tokenizer=policy.tokenizer)
    return result


__all__ = ["PPOConfig", "ppo"]
