"""What the online RL workflows (GRPO: align/grpo_train.py, PPO: align/ppo_train.py) share: the config
sections, the policy and its reference, held-out evaluation, and the loop around a step (AdamW, schedule,
metrics, progress, plot, checkpoints with exact resume, divergence handling). Prompt sets and reward functions
by name are in align/tasks.py.

A workflow writes only its step: `step_fn(step) -> metrics`, which samples rollouts, scores them and calls
`loop.optimizer_step(loss)` after each backward. The loop does the rest:

    out_dir/config.yaml       the resolved recipe
    out_dir/metrics.jsonl     {"kind": "train", "step", "reward", "reward_std", "kl", "entropy", "loss", "lr",
                              "grad_norm", "tokens_per_s", ...} per step; {"kind": "eval", ...} per evaluation
    out_dir/eval.json         held-out evaluation: before, history, after
    out_dir/rewards.png       reward (mean ± std) and KL to the reference against steps
    out_dir/checkpoints/step-N/   policy + optimizer + RNG + prompt sampler + value head (train/state.py)
    out_dir/final/, adapter/  the trained policy (LoRA merged into final/; adapter/ in PEFT's format)

The reference is the policy as it starts: with LoRA/DoRA the same model with the adapter switched off (no
second copy), otherwise a frozen copy taken before anything trains. The KL the loop watches is the per-token
mean of k3 = (r - 1) - log r, r = π_ref/π (Schulman 2020), over the completion tokens of the step's rollouts.

Divergence: a non-finite loss or gradient norm, NaN logits while sampling, or a mean KL above train.kl_stop
(0: off), stops the run with TrainingDiverged before the optimizer applies it. A checkpoint is written only
after the weights about to be saved pass a check (finite log-probs, and with kl_stop their KL estimated on the
last batch with importance weights ρ = π_now/π_old is within the bound), so the newest checkpoint on disk is
always a good one and a resumed run starts from it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train.metrics import MetricsLog, Progress, read_metrics, resolve_precision
from ..train.optim import SCHEDULES, Schedule, build_optimizer
from ..train.recipe import save_recipe
from ..train.state import (checkpoint_path, clean_temporaries, list_checkpoints, load_training_checkpoint,
                           prune_checkpoints, save_training_checkpoint, unique_state_dict)
from ..train.trainer import TrainingDiverged, precision_context
from .logprobs import target_mask, token_logprobs
from .reward import EXTRACTORS, answers_match
from .tasks import PromptSampler, Scorer, check_answers, columns, load_prompts

ONLINE_PEFT = ("none", "lora", "dora")


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class OnlineTrain:
    steps: int = 200  # RL steps: each samples rollouts, then updates the policy on them
    prompts_per_step: int = 8
    lr: float = 1e-6
    schedule: str = "constant"  # constant | cosine | linear | wsd (train/optim.py)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0: off
    kl_stop: float = 0.0  # stop when the mean per-token KL to the reference exceeds this (nats); 0: off
    log_every: int = 1
    eval_every: int = 0  # steps between held-out evaluations; 0: before and after training only
    checkpoint_every: int = 50  # also at the end
    keep_last: int = 1
    resume: bool = True
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | auto (the forward passes of the loss; sampling runs in fp32)
    threads: int = 0
    progress: bool = True
    plot: bool = True

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"train.{msg}")

        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.prompts_per_step >= 1, f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        need(self.kl_stop >= 0, f"kl_stop must be >= 0 (0: off), got {self.kl_stop}")
        need(self.log_every >= 1 and self.checkpoint_every >= 1 and self.keep_last >= 1,
             "log_every, checkpoint_every and keep_last must be >= 1")
        need(self.eval_every >= 0, f"eval_every must be >= 0 (0: before and after only), got {self.eval_every}")
        need(self.precision in ("auto", "fp32", "bf16"), f"precision={self.precision!r}: use fp32, bf16 or auto")


@dataclass
class RolloutConfig:
    max_tokens: int = 64  # TRL's max_completion_length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    max_num_seqs: int = 64  # sequences the engine decodes at once
    eval_temperature: float = 0.0  # held-out evaluation: 0 = greedy
    eval_prompts: int = 0  # held-out prompts per evaluation; 0: all

    def validate(self) -> None:
        if self.max_tokens < 1 or not self.temperature > 0 or self.eval_temperature < 0:
            raise ValueError(f"rollout.max_tokens must be >= 1, rollout.temperature > 0 (sampling) and "
                             f"rollout.eval_temperature >= 0 (0: greedy); got {self.max_tokens}, "
                             f"{self.temperature}, {self.eval_temperature}")


def check_peft(peft) -> None:
    peft.validate()
    if peft.method not in ONLINE_PEFT:
        raise ValueError(f"peft.method={peft.method} is not supported by online RL: the reference is the policy "
                         "with its LoRA adapter switched off (or a frozen copy), and the inference engine samples "
                         "from the model's own modules; use peft.method=lora, dora or none")


# ------------------------------------------------------------------------------------------------ the policy
class Policy:
    """The model being trained (eval mode throughout: no dropout, so the importance ratio is exactly 1 on the
    first pass over a batch), its tokenizer, its PEFT setup and the reference (the policy as it starts)."""

    def __init__(self, model_name: str, peft_cfg, *, device: str, steps: int, seed: int):
        from llmlab.api import load

        from ..train.supervised import PeftSetup

        model, tok = load(model_name, device=device)
        if tok is None:
            raise ValueError(f"{model_name} has no tokenizer; save the policy with its tokenizer")
        self.model, self.tokenizer, self.name = model.float().eval(), tok, model_name
        # a frozen copy is taken before anything trains (or a checkpoint is loaded into the policy)
        self.frozen = copy.deepcopy(self.model).requires_grad_(False) if peft_cfg.method == "none" else None
        self.peft = PeftSetup(self.model, peft_cfg, tok, max_steps=steps, seed=seed)
        self.device = torch.device(device)

    @contextlib.contextmanager
    def reference(self):
        """The reference model to run under torch.no_grad: the frozen copy, or the policy with its adapter off."""
        if self.frozen is not None:
            yield self.frozen
            return
        from llmlab.peft import active_adapter, set_adapter

        name = active_adapter(self.model)
        set_adapter(self.model, None)
        try:
            yield self.model
        finally:
            set_adapter(self.model, name)

    def save(self, out: Path) -> str:
        from ..io import save_checkpoint
        from ..train.supervised import plain_model

        if self.peft.cfg.method == "none":
            return str(save_checkpoint(self.model, out / "final", tokenizer=self.tokenizer))
        self.peft.save_adapter(out / "adapter", base_model_name_or_path=self.name)
        return str(save_checkpoint(plain_model(self.model), out / "final", tokenizer=self.tokenizer))


def logprobs(model, tensors: dict, *, temperature: float = 1.0, entropy: bool = False):
    """Completion-token log-probs [N, T-1] (and entropies) of a rollout batch under model (align.logprobs)."""
    return token_logprobs(model, tensors["input_ids"], tensors["attention_mask"],
                          completion_mask=tensors["completion_mask"], temperature=temperature,
                          return_entropy=entropy)


def k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (r - 1) - log r with r = π_ref/π: ≥ 0, unbiased for KL(π‖π_ref) (Schulman 2020)."""
    log_r = ref - logp
    return torch.expm1(log_r) - log_r


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1))


@torch.no_grad()
def importance_kl(policy: nn.Module, tensors: dict, old: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> float:
    """KL(π_now‖π_ref) estimated on a batch sampled from π_old: mean of ρ·k3 with ρ = π_now/π_old per token
    (the importance-weighted KL of DeepSeek-V3.2). NaN when the current log-probs are not finite."""
    now = logprobs(policy, tensors, temperature=temperature)
    if not bool(torch.isfinite(now[mask]).all()):
        return math.nan
    return masked_mean(torch.exp(now - old) * k3(now, ref), mask)


def rollout_mask(batch) -> torch.Tensor:
    """bool [N, T-1]: the completion tokens of a RolloutBatch on the log-prob grid (input_ids[:, 1:])."""
    return target_mask(batch.input_ids, batch.attention_mask, batch.completion_mask)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(policy: Policy, items: list[dict], rollout: RolloutConfig, scorer: Scorer | None, *, extract: str = "auto",
             chat_template: str | None = None, seed: int = 0) -> dict:
    """Held-out evaluation with one completion per prompt (greedy at eval_temperature 0): mean reward and, when
    the items have answers, exact-answer accuracy (answers_match on the extracted answer)."""
    from ..infer import LLM, SamplingParams
    from .rollout import Rollouts

    items = items[:rollout.eval_prompts or None]
    if not items:
        return {}
    roll = Rollouts(policy.model, policy.tokenizer, max_tokens=rollout.max_tokens, chat_template=chat_template)
    ids = [roll.encode_prompt(x["prompt"]) for x in items]
    greedy = rollout.eval_temperature == 0
    params = [SamplingParams(max_tokens=rollout.max_tokens, temperature=rollout.eval_temperature, stop=rollout.stop,
                             top_p=1.0 if greedy else rollout.top_p, top_k=0 if greedy else rollout.top_k,
                             seed=None if greedy else seed * 100_003 + i) for i in range(len(ids))]
    was = policy.model.training
    try:
        outs = LLM(policy.model, policy.tokenizer, prefix_caching=False, max_num_seqs=rollout.max_num_seqs
                   ).generate(ids, params)
    finally:
        policy.model.train(was)
    texts = [o.outputs[0].text for o in outs]
    prompts = [x["prompt"] for x in items]
    result: dict[str, Any] = {"n": len(items)}
    if scorer is not None:
        total, parts = scorer(prompts, texts, finish_reasons=[o.outputs[0].finish_reason for o in outs],
                              prompt_ids=ids, completion_ids=[list(o.outputs[0].token_ids) for o in outs],
                              cols=columns(items))
        result["reward"] = float(total.mean())
        result.update({f"rewards/{k}": float(torch.nanmean(v)) for k, v in parts.items()})
    if all("answer" in x for x in items):
        get = EXTRACTORS[extract]
        result["accuracy"] = sum(answers_match(get(t), x["answer"]) for t, x in zip(texts, items)) / len(items)
    result["samples"] = [{"prompt": p, "completion": t, **({"answer": x["answer"]} if "answer" in x else {})}
                         for p, t, x in list(zip(prompts, texts, items))[:4]]
    return result


# ------------------------------------------------------------------------------------------------ the loop
class _Extras:
    """The checkpoint's loader slot: state_dicts of the prompt sampler, the value head or critic, the KL
    controller... Modules are stored without aliases (a tied LM head is its embedding; safetensors stores no
    shared tensors) and an alias comes back through the tensor it shares."""

    def __init__(self, parts: dict[str, Any]):
        self.parts = parts

    def state_dict(self) -> dict:
        return {k: unique_state_dict(v) if isinstance(v, nn.Module) else v.state_dict() for k, v in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.parts.items():
            if not isinstance(v, nn.Module):
                v.load_state_dict(state[k])
                continue
            missing, unexpected = v.load_state_dict(state[k], strict=False)
            loaded = {t.data_ptr() for name, t in v.state_dict().items() if name in state[k]}
            missing = [m for m in missing if v.state_dict()[m].data_ptr() not in loaded]
            if missing or unexpected:
                raise ValueError(f"the checkpoint's {k} does not fit this run (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]}); resume with the settings the run used")


class _Bar(Progress):
    def update(self, step: int, record: dict | None = None) -> None:
        if self._bar is None:
            return
        kw: dict[str, Any] = {"completed": step}
        if record is not None:
            kl = f"  kl {record['kl']:.4f}" if "kl" in record else ""
            kw["stats"] = f"reward {record['reward']:.3f}{kl}  {record['tokens_per_s']:,.0f} tok/s"
        self._bar.update(self._task, **kw)


@dataclass
class OnlineStart:
    """What PPO and GRPO set up the same way before their own parts (see start_online)."""

    out: Path
    train: list[dict]  # training prompts (with answers when the task has them)
    held: list[dict]  # held-out prompts, never trained on
    policy: Policy
    scorer: Scorer
    sampler: PromptSampler  # resumable: rides in the checkpoint

    def evaluator(self, cfg) -> Callable[[], dict] | None:
        """Held-out evaluation for OnlineLoop.run (None without held-out prompts)."""
        if not self.held:
            return None
        return lambda: evaluate(self.policy, self.held, cfg.rollout, self.scorer, extract=cfg.reward.extract,
                                chat_template=cfg.data.chat_template, seed=cfg.seed)


def start_online(cfg) -> OnlineStart:
    """out_dir with the resolved config.yaml, the seeds, the device, the prompts (split, answers checked against
    the reward functions), the policy with its PEFT adapter and reference, the reward scorer, the prompt sampler."""
    from ..train.config import resolve_device
    from ..train.state import seed_everything

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device, cfg.train.threads)
    train, held = load_prompts(cfg.data, cfg.seed)
    check_answers(cfg.reward, train + held, cfg.data.source)
    policy = Policy(cfg.model, cfg.peft, device=device, steps=cfg.train.steps, seed=cfg.seed)
    return OnlineStart(out, train, held, policy, Scorer(cfg.reward, policy.tokenizer, device),
                       PromptSampler(len(train), cfg.seed))


@dataclass
class OnlineResult:
    steps: int
    resumed_from: int | None
    eval: dict  # eval.json: before, history, after
    final: str
    metrics_path: str
    plot_path: str | None
    seconds: float


class OnlineLoop:
    """AdamW over the policy's trainable parameters (and `modules`, e.g. a value head), the schedule, and the
    run around the workflow's step function (see the module docstring)."""

    def __init__(self, cfg: OnlineTrain, out_dir: Path, policy: Policy, *, name: str,
                 modules: dict[str, nn.Module] | None = None, state: dict[str, Any] | None = None):
        self.cfg, self.out, self.policy, self.name = cfg, Path(out_dir), policy, name
        self.modules = modules or {}
        container = nn.ModuleDict({"policy": policy.model, **self.modules})
        self.optimizer = build_optimizer(container, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         betas=(cfg.beta1, cfg.beta2))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = Schedule(cfg.schedule, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.extras = _Extras({**(state or {}), **self.modules})
        self.ckpt_dir, self.metrics_path = self.out / "checkpoints", self.out / "metrics.jsonl"
        self.precision = resolve_precision(cfg.precision, policy.device.type)
        self.step, self.updates, self.log = 0, 0, None

    def autocast(self):
        return precision_context(self.precision, self.policy.device.type)

    # --- called by the step function
    def check_kl(self, kl: float, step: int | None = None) -> None:
        """The rollout policy's mean KL to the reference, before the step's first update: stop above kl_stop."""
        if not math.isfinite(kl):
            self._diverged(f"the KL to the reference is {kl} (non-finite log-probs)", "nan", step)
        if self.cfg.kl_stop and kl > self.cfg.kl_stop:
            self._diverged(f"the mean KL to the reference is {kl:.4g} nats/token, above train.kl_stop="
                           f"{self.cfg.kl_stop}", "kl", step)

    def sample(self, fn: Callable[[], Any]) -> Any:
        """Run the step's rollout: weights that give NaN logits make the sampler fail, which is divergence."""
        try:
            return fn()
        except ValueError as e:
            if "NaN" in str(e):
                self._diverged(f"the policy's logits are not finite while sampling ({e})", "nan")
            raise

    def optimizer_step(self, loss: float) -> float:
        """After the backward pass(es) of one minibatch: refuse a non-finite loss or gradient, clip, AdamW.
        Returns the gradient norm before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._diverged(f"loss = {loss}, gradient norm = {norm}", "nan")
        if self.cfg.grad_clip > 0 and grads:
            torch._foreach_mul_(grads, min(1.0, self.cfg.grad_clip / (norm + 1e-6)))  # clip_grad_norm_'s coefficient
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return norm

    def _diverged(self, what: str, kind: str, step: int | None = None) -> None:
        step = self.step + 1 if step is None else step
        self.optimizer.zero_grad(set_to_none=True)
        found = list_checkpoints(self.ckpt_dir)
        if self.log is not None:
            self.log.write({"kind": "diverged", "step": step, "reason": what})
        where = (f"the last good checkpoint is {found[-1][1]} (step {found[-1][0]}); rerunning resumes from it"
                 if found else "no checkpoint had been written yet")
        fix = ("Try a lower train.lr, a KL penalty (beta / kl_coef), or a larger train.kl_stop." if kind == "kl" else
               "Try a lower train.lr, train.grad_clip=1.0 or train.precision=fp32.")
        raise TrainingDiverged(f"{self.name} diverged at step {step}: {what}. Stopped; nothing of this step was "
                               f"saved; {where}. {fix}")

    # --- checkpoints
    def _resume(self) -> int | None:
        clean_temporaries(self.ckpt_dir)
        found = list_checkpoints(self.ckpt_dir)
        if found and not self.cfg.resume:
            raise ValueError(f"{self.out} already holds checkpoints (up to step {found[-1][0]}); set "
                             "train.resume=true to continue that run, or choose another out_dir")
        if not found:
            MetricsLog.truncate(self.metrics_path, -1)
            return None
        step, path = found[-1]
        state = load_training_checkpoint(path, model=self.policy.model, optimizer=self.optimizer, loader=self.extras)
        self.step, self.updates = int(state["step"]), int(state["updates"])
        MetricsLog.truncate(self.metrics_path, self.step)
        return self.step

    def _save(self, verify: Callable[[], float] | None) -> None:
        # the weights about to be saved came out of step self.step: check them before they replace a good one
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            self._diverged("the updated weights are not finite", "nan", self.step)
        if verify is not None:
            self.check_kl(verify(), self.step)
        save_training_checkpoint(checkpoint_path(self.ckpt_dir, self.step), model=self.policy.model,
                                 optimizer=self.optimizer, loader=self.extras,
                                 state={"step": self.step, "updates": self.updates}, tokenizer=self.policy.tokenizer)
        prune_checkpoints(self.ckpt_dir, self.cfg.keep_last)

    # --- the run
    def run(self, step_fn: Callable[[int], dict], evaluate_fn: Callable[[], dict] | None,
            verify: Callable[[], float] | None = None) -> OnlineResult:
        """step_fn(step) -> metrics (with "tokens": tokens processed); evaluate_fn() -> held-out metrics;
        verify() -> the current policy's KL to the reference (importance_kl on the last batch), checked
        before each save."""
        cfg, t_start = self.cfg, time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self._resume()
        eval_path = self.out / "eval.json"
        report = json.loads(eval_path.read_text()) if resumed is not None and eval_path.is_file() else {}
        report["history"] = [r for r in report.get("history", []) if r["step"] <= self.step]
        self.log = MetricsLog(self.metrics_path)
        bar = _Bar(cfg.steps, self.step, cfg.progress)

        def do_eval() -> None:
            if evaluate_fn is None:
                return
            rec = {"step": self.step, **evaluate_fn()}
            report.setdefault("before", rec)
            report["history"] = [r for r in report["history"] if r["step"] != self.step] + [rec]
            self.log.write({"kind": "eval", **{k: v for k, v in rec.items() if k != "samples"}})
            _write_json(eval_path, report)
            bar.print(f"step {self.step}  held-out " + "  ".join(f"{k} {v:.4f}" for k, v in rec.items()
                                                                  if isinstance(v, float)))
        try:
            if "before" not in report:
                do_eval()
            while self.step < cfg.steps:
                self.schedule.apply(self.optimizer, self.step)
                t = time.perf_counter()
                record = step_fn(self.step)
                self.step += 1
                seconds = time.perf_counter() - t
                record = {"kind": "train", "step": self.step, **record, "lr": self.optimizer.param_groups[0]["lr"],
                          "updates": self.updates, "step_time_s": seconds,
                          "tokens_per_s": record.get("tokens", 0) / max(seconds, 1e-9)}
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.log.write(record)
                bar.update(self.step, record)
                last = self.step == cfg.steps
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    do_eval()
                if self.step % cfg.checkpoint_every == 0 or last:
                    self._save(verify)
            final = self.policy.save(self.out)
            if evaluate_fn is not None:
                do_eval()
                report["after"] = report["history"][-1]
                _write_json(eval_path, report)
        finally:
            bar.close()
            self.log.close()
        plot = str(plot_online(self.metrics_path, self.out / "rewards.png", self.name)) if cfg.plot else None
        return OnlineResult(self.step, resumed, report, final, str(self.metrics_path), plot,
                            time.perf_counter() - t_start)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def plot_online(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """PNG: reward (mean ± std over the step's completions, held-out evaluations as points) and the KL to the
    reference against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path, "train"), read_metrics(metrics_path, "eval")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    if train:
        s = [r["step"] for r in train]
        m = [r["reward"] for r in train]
        sd = [r.get("reward_std", 0.0) for r in train]
        ax1.plot(s, m, color="tab:blue", lw=1.2, label="rollout reward")
        ax1.fill_between(s, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color="tab:blue",
                         alpha=0.15)
        if any("kl" in r for r in train):
            ax2.plot([r["step"] for r in train if "kl" in r], [r["kl"] for r in train if "kl" in r],
                     color="tab:red", lw=1.2)
    for key, style in (("reward", "o-"), ("accuracy", "s--")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax1.plot(*zip(*pts), style, lw=1.2, label=f"held-out {key}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("KL to the reference (nats/token, k3)")
    ax2.grid(alpha=0.3)
    fig.suptitle(title or Path(metrics_path).parent.name)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


__all__ = ["ONLINE_PEFT", "OnlineLoop", "OnlineResult", "OnlineTrain", "Policy", "RolloutConfig", "check_peft",
           "evaluate", "importance_kl", "k3", "logprobs", "masked_mean", "plot_online", "rollout_mask"]
