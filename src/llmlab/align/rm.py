"""Reward-model training: a policy's body with a scalar head (align.reward.RewardModel) trained on preference
pairs with the Bradley-Terry loss, through the same trainer as pretraining and SFT.

    from llmlab.align.rm import RMConfig, train_reward_model
    result = train_reward_model(load_recipe(RMConfig, "recipes/rm/smollm2.yaml", ["train.max_steps=50"]))
    llmlab rm --recipe recipes/rm/smollm2.yaml train.max_steps=50

`model` is anything llmlab.load reads; a causal LM gets a new scalar head on a copy of its body, a saved reward
model (head classification, one label) continues. out_dir gets what SFT writes (config.yaml, checkpoints/,
metrics.jsonl with val_accuracy and val_margin at each evaluation, loss.png), final/ (the reward model + its
tokenizer: RewardModel.load reads it; a `peft` adapter is merged into it) and
eval.json: preference accuracy and mean margin on the held-out pairs and, when ../shared/data is there, on
BIG-bench hhh_alignment (evaluation only: never trained on), overall and per subset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..data.preference import encode_pairs, load_hhh_alignment, preference_accuracy
from ..data.sources import MissingDataError
from ..train.config import TrainConfig
from ..train.pretraining import trainer_note
from ..train.supervised import PeftSetup, SFTPeft, plain_model, start_run
from ..train.trainer import Trainer, TrainResult
from .logprobs import eval_mode
from .pairs import PairLoader, PreferenceData, collate, pad_id_of, prepare
from .reward import RewardModel, bradley_terry_loss


def _rm_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=200, lr=2e-5, warmup_steps=10, weight_decay=0.0, eval_every=50,
                       checkpoint_every=100, keep_last=1, eval_at_start=True)


@dataclass
class RMConfig:
    out_dir: str = "runs/rm"
    seed: int = 0
    model: str = "smollm2-135m-instruct"
    data: PreferenceData = field(default_factory=PreferenceData)
    train: TrainConfig = field(default_factory=_rm_train_defaults)
    peft: SFTPeft = field(default_factory=SFTPeft)  # e.g. lora: the adapter and the new scalar head train
    margin: float = 0.0  # m in -log σ(r_c - r_r - m)
    center_coef: float = 0.0  # Eisenstein et al. 2023: + coef·(r_c + r_r)², keeps rewards near zero mean
    eval_hhh: bool = True  # also evaluate on BIG-bench hhh_alignment when ../shared/data has it

    def __post_init__(self) -> None:
        self.train.validate()
        self.data.validate()
        self.peft.validate()
        if self.peft.method in ("prompt", "ptuning", "prefix"):
            raise ValueError(f"peft.method={self.peft.method} wraps the model for generation; a reward model "
                             "reads the last hidden state: use lora, dora, ia3, bitfit or adapter")
        if self.center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {self.center_coef}")


@dataclass
class RMResult:
    train: TrainResult
    eval: dict  # eval.json: {"val": {...}, "hhh": {...}} (accuracy, margin, n)
    final: str  # the reward model's directory


def bt_loss_fn(margin: float, center_coef: float):
    """The trainer's loss: rows [chosen × B, rejected × B] -> the Bradley-Terry loss, with accuracy and margin
    (logged per interval in training and as val_accuracy / val_margin at each evaluation)."""
    def loss_fn(model, batch):
        scores = model(batch["input_ids"], batch["attention_mask"]).logits[:, 0]
        B = scores.shape[0] // 2
        out = bradley_terry_loss(scores[:B], scores[B:], margin=margin or None, center_coef=center_coef or None)
        diff = out.chosen_rewards - out.rejected_rewards
        return out.loss, {"weight": B, "accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    return loss_fn


@torch.no_grad()
def score_pairs(reward_model: RewardModel, encoded: list[dict], pad_id: int, *, batch_size: int = 8):
    """(chosen scores, rejected scores) [N] of encoded pairs (prompt_ids, chosen_ids, rejected_ids)."""
    device = next(reward_model.parameters()).device
    chosen, rejected = [], []
    with eval_mode(reward_model):
        for i in range(0, len(encoded), batch_size):
            b = collate(encoded[i:i + batch_size], range(i, i + len(encoded[i:i + batch_size])), pad_id)
            s = reward_model(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
            chosen.append(s[:len(s) // 2])
            rejected.append(s[len(s) // 2:])
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_pairs(reward_model: RewardModel, encoded: list[dict], pad_id: int, *, batch_size: int = 8) -> dict:
    c, r = score_pairs(reward_model, encoded, pad_id, batch_size=batch_size)
    acc = preference_accuracy(c, r)
    return {"accuracy": acc.accuracy, "margin": acc.margin, "n": acc.n, "ties": acc.ties}


def evaluate_hhh(reward_model: RewardModel, tokenizer, *, max_len: int, chat_template=None,
                 batch_size: int = 8) -> dict:
    """Accuracy on BIG-bench hhh_alignment (221 pairs), overall and per subset; raises MissingDataError when
    ../shared/data is absent."""
    pairs = load_hhh_alignment()
    encoded = encode_pairs(pairs, tokenizer, max_len=max_len, chat_template=chat_template)
    pad = pad_id_of(tokenizer)
    c, r = score_pairs(reward_model, encoded, pad, batch_size=batch_size)
    out = {"all": {"accuracy": preference_accuracy(c, r).accuracy, "n": len(pairs)}}
    for subset in sorted({p.meta.get("subset", "") for p in pairs}):
        idx = [i for i, p in enumerate(pairs) if p.meta.get("subset", "") == subset]
        out[subset] = {"accuracy": preference_accuracy(c[idx], r[idx]).accuracy, "n": len(idx)}
    return out


def train_reward_model(cfg: RMConfig) -> RMResult:
    out, device, model, tok = start_run(cfg, "a reward model scores text")
    if model.cfg.head == "classification" and model.cfg.n_labels == 1:
        rm = RewardModel(model)  # continue a saved reward model
    else:
        rm = RewardModel.from_policy(model)
        del model
    peft = PeftSetup(rm.model, cfg.peft, tok, max_steps=cfg.train.max_steps, seed=cfg.seed)
    if cfg.peft.method != "none":
        rm.model.head.proj.weight.requires_grad_(True)  # the new scalar head always trains
    train, val = prepare(cfg.data, tok, cfg.seed)
    pad = pad_id_of(tok)
    loader = PairLoader(train, batch_size=cfg.data.batch_size, pad_id=pad, seed=cfg.seed)
    val_batches = PairLoader(val, batch_size=cfg.data.batch_size, pad_id=pad, shuffle=False).epoch_batches() \
        if val else []
    train_cfg = cfg.train
    if train_cfg.sample_prompts:  # a scalar head generates nothing
        from dataclasses import replace
        train_cfg = replace(train_cfg, sample_prompts=[])
    rm.train()
    trainer = Trainer(rm.model, loader, train_cfg, out_dir=out, loss_fn=bt_loss_fn(cfg.margin, cfg.center_coef),
                      val_batches=val_batches, tokenizer=tok)
    peft.attach(trainer)
    if train_cfg.progress:
        trainer_note(f"reward model on {cfg.model} ({sum(p.numel() for p in rm.parameters()) / 1e6:.1f}M "
                     f"parameters): {len(train):,} training pairs, {len(val):,} held out; out_dir {out}")
        if cfg.peft.method != "none":
            trainer_note(peft.describe() + " (+ the scalar head)")
    result = trainer.fit()
    if cfg.peft.method != "none":  # merged (PEFT's format names causal-LM modules; this is a classifier)
        rm = RewardModel(plain_model(rm.model))
    final = rm.save(out / "final", tok)
    report: dict = {}
    if val:
        report["val"] = evaluate_pairs(rm, val, pad, batch_size=cfg.data.batch_size)
    if cfg.eval_hhh:
        try:
            report["hhh"] = evaluate_hhh(rm, tok, max_len=cfg.data.max_len, chat_template=cfg.data.chat_template,
                                         batch_size=cfg.data.batch_size)
        except MissingDataError as e:
            report["hhh"] = {"skipped": str(e)}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if train_cfg.progress:
        trainer_note("evaluation: " + json.dumps(report))
    return RMResult(result, report, str(final))
