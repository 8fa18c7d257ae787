"""Offline preference optimization: DPO and its family (IPO, conservative DPO, hinge, robust, SimPO, ORPO, KTO)
on preference pairs, through the same trainer as SFT, optionally on a PEFT adapter.

    from llmlab.align.dpo import DPOConfig, dpo
    result = dpo(load_recipe(DPOConfig, "recipes/dpo/smollm2_lora.yaml", ["loss=ipo"]))
    llmlab dpo --recipe recipes/dpo/smollm2_lora.yaml loss=simpo beta=2.0

The losses are align.losses' (equal to TRL's, tests/align/test_losses.py) with TRL's normalizations: DPO,
cDPO, hinge, robust and KTO on summed completion log-probs, IPO averaged per token, SimPO and ORPO on per-token
means. ORPO adds the chosen completions' NLL (mean per token) to its odds-ratio term.

The reference (DPO family and KTO) is the policy as it starts: with reference=cache its completion log-probs
are computed once before the first step, in the trainer's precision, and kept in out_dir/reference.json (a
resumed run reads them back); with reference=adapter_disabled (LoRA/DoRA only) they are computed for every
batch with the adapter switched off, which needs no memory for the cache and no pass before training. A
separate reference checkpoint can be named with ref_model. SimPO and ORPO use no reference.

out_dir gets what SFT writes (config.yaml, checkpoints/, metrics.jsonl with the loss's rewards and margins as
val_rewards/... at each evaluation, final/, adapter/ with peft) and eval.json: held-out preference accuracy
and mean margin of the implicit rewards (β·log π/π_ref, or β·mean log π for SimPO/ORPO) and of the policy's own
mean log-probs (chosen vs rejected), before training and after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data.preference import preference_accuracy
from ..train.config import TrainConfig
from ..train.pretraining import trainer_note
from ..train.supervised import PeftSetup, SFTPeft, plain_model, start_run
from ..train.metrics import resolve_precision
from ..train.trainer import Trainer, TrainResult, precision_context
from .logprobs import eval_mode, target_mask, token_logprobs
from .losses import dpo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss
from .pairs import PairLoader, PreferenceData, collate, pad_id_of, prepare

LOSSES = ("dpo", "ipo", "cdpo", "hinge", "robust", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
DPO_TYPES = {"dpo": "sigmoid", "cdpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}


def _dpo_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=200, lr=5e-6, warmup_steps=10, weight_decay=0.0, eval_every=50,
                       checkpoint_every=100, keep_last=1, eval_at_start=True)


@dataclass
class DPOConfig:
    out_dir: str = "runs/dpo"
    seed: int = 0
    model: str = "smollm2-135m-instruct"  # the policy to align (an SFT model)
    data: PreferenceData = field(default_factory=PreferenceData)
    train: TrainConfig = field(default_factory=_dpo_train_defaults)
    peft: SFTPeft = field(default_factory=SFTPeft)
    loss: str = "dpo"  # dpo | ipo | cdpo | hinge | robust | simpo | orpo | kto
    beta: float = 0.1  # SimPO's paper uses 2.0-2.5
    label_smoothing: float = 0.0  # cdpo / robust: ε, the assumed rate of flipped labels (cdpo: 0.1 if left at 0)
    simpo_gamma_beta_ratio: float = 0.5  # SimPO's target margin γ = ratio·β
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference: str = "cache"  # cache | adapter_disabled
    ref_model: str | None = None  # a separate reference checkpoint (cache mode); None: the policy as it starts

    def __post_init__(self) -> None:
        self.train.validate()
        self.data.validate()
        self.peft.validate()
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.loss == "cdpo" and self.label_smoothing == 0:
            self.label_smoothing = 0.1
        if self.reference not in ("cache", "adapter_disabled"):
            raise ValueError(f"reference must be cache or adapter_disabled, got {self.reference!r}")
        if self.reference == "adapter_disabled" and self.peft.method not in ("lora", "dora"):
            raise ValueError("reference=adapter_disabled needs a LoRA/DoRA adapter (peft.method=lora); with "
                             f"peft.method={self.peft.method} use reference=cache")
        if self.reference == "adapter_disabled" and self.ref_model:
            raise ValueError("ref_model names a separate reference; it only works with reference=cache")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass
class DPOResult:
    train: TrainResult
    eval: dict  # eval.json: {"before": {...}, "after": {...}}
    final: str


# ---------------------------------------------------------------------------------------------- scoring
def completion_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs [rows], completion token counts [rows]) of the batch's completions under model."""
    ids, mask, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    logp = token_logprobs(model, ids, mask, completion_mask=cm)
    return logp.sum(-1), target_mask(ids, mask, cm).sum(-1).to(logp.dtype)


def _adapter_off(model):
    from llmlab.peft import active_adapter, set_adapter

    name = active_adapter(model)

    @contextlib.contextmanager
    def off():
        set_adapter(model, None)
        try:
            yield
        finally:
            set_adapter(model, name)
    return off


def make_loss_fn(cfg: DPOConfig, ref_off=None):
    """The trainer's loss for cfg.loss; ref_off: a context manager factory that turns the policy into the
    reference (adapter_disabled), else the batch's cached ref_logps are used."""
    loss = cfg.loss

    def reference(model, batch):
        """[rows] reference log-probs in the batch's row order (chosen rows, then rejected or KL rows)."""
        if ref_off is None:
            return batch["ref_logps"].T.reshape(-1)  # cached per item as [B, 2]
        with torch.no_grad(), ref_off():
            return completion_logps(model, batch)[0]

    def loss_fn(model, batch):
        sums, n = completion_logps(model, batch)
        B = len(batch["index"])
        if loss == "kto":
            desirable = batch["label"].bool()
            ref = reference(model, batch)
            with torch.no_grad():  # the reference point z0 carries no gradient (KTO, as TRL)
                kl = kto_kl(sums[B:].detach(), ref[B:])
            out = kto_loss(sums[:B], ref[:B], desirable, kl, beta=cfg.beta,
                           desirable_weight=cfg.kto_desirable_weight, undesirable_weight=cfg.kto_undesirable_weight)
            return out.loss, {"weight": B, **_metrics(out.metrics())}
        avg = sums / n.clamp(min=1)
        if loss == "simpo":
            out = simpo_loss(avg[:B], avg[B:], beta=cfg.beta, gamma_beta_ratio=cfg.simpo_gamma_beta_ratio,
                             label_smoothing=cfg.label_smoothing)
            total = out.loss
        elif loss == "orpo":
            out = orpo_loss(avg[:B], avg[B:], beta=cfg.beta)
            nll = -sums[:B].sum() / n[:B].sum().clamp(min=1)  # the SFT term on the chosen completions
            total = nll + out.loss
        else:
            ref = reference(model, batch)
            lengths = dict(chosen_lengths=n[:B], rejected_lengths=n[B:]) if loss == "ipo" else {}
            out = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=cfg.beta, loss_type=DPO_TYPES[loss],
                           label_smoothing=cfg.label_smoothing, **lengths)
            total = out.loss
        m = _metrics(out.metrics())
        m["logps_accuracy"] = float((avg[:B] > avg[B:]).float().mean())  # the policy's own preference
        return total, {"weight": B, **m}
    return loss_fn


def _metrics(m: dict) -> dict:
    m.pop("loss", None)  # the trainer logs the total loss itself
    return m


# ------------------------------------------------------------------------------------ the reference cache
def _fingerprint(examples: list[dict], cfg: DPOConfig) -> str:
    h = hashlib.sha256(json.dumps([cfg.model, cfg.ref_model, cfg.train.precision]).encode())
    for e in examples:
        h.update(json.dumps({k: v for k, v in e.items() if k.endswith("_ids")}).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def attach_reference(model, examples: list[dict], pad_id: int, *, batch_size: int, precision=None) -> None:
    """Each encoded item gets ref_logps (summed completion log-probs under `model`; chosen then rejected, or the
    completion then the KL completion) as a list, in place."""
    with eval_mode(model):
        device = next(model.parameters()).device
        for i in range(0, len(examples), batch_size):
            part = examples[i:i + batch_size]
            b = collate(part, range(len(part)), pad_id)
            b = {k: v.to(device) for k, v in b.items()}
            with precision() if precision else contextlib.nullcontext():
                sums = completion_logps(model, b)[0].float().cpu()
            rows = sums.view(-1, len(part))  # [2, B]: chosen/completion row, rejected/KL row
            for j, e in enumerate(part):
                e["ref_logps"] = rows[:, j].tolist()


def _kto_mismatch(examples: list[dict], seed: int) -> None:
    """KTO's reference point uses each prompt with another example's completion: a fixed seeded partner per
    item (a shifted permutation, never itself), so the reference log-probs of those rows can be cached too."""
    if len(examples) < 2:
        raise ValueError("KTO needs at least 2 examples (each prompt is also scored with another's completion)")
    order = np.random.default_rng(seed).permutation(len(examples))
    for k, i in enumerate(order):
        examples[i]["kl_completion_ids"] = examples[order[(k + 1) % len(order)]]["completion_ids"]


def _implicit_accuracy(model, examples, pad_id, cfg: DPOConfig, precision, *, at_start: bool = False) -> dict:
    """Held-out accuracy and mean margin of the implicit rewards and of the policy's mean log-probs. at_start:
    the policy is still the cached reference, whose log-probs the examples carry (no pass needed)."""
    if not examples or cfg.loss == "kto":
        return {}
    if at_start and "ref_logps" in examples[0] and not cfg.ref_model:
        pol = torch.tensor([e["ref_logps"] for e in examples])
    else:
        scored = [dict(e) for e in examples]
        attach_reference(model, scored, pad_id, batch_size=cfg.data.batch_size, precision=precision)
        pol = torch.tensor([e["ref_logps"] for e in scored])  # [N, 2] the policy's summed log-probs
    lens = torch.tensor([[len(e["chosen_ids"]), len(e["rejected_ids"])] for e in examples], dtype=torch.float32)
    avg = pol / lens
    out = {"logps": vars(preference_accuracy(avg[:, 0], avg[:, 1]))}
    if cfg.loss in REFERENCE_FREE:
        out["rewards"] = vars(preference_accuracy(cfg.beta * avg[:, 0], cfg.beta * avg[:, 1]))
    elif "ref_logps" in examples[0]:
        ref = torch.tensor([e["ref_logps"] for e in examples])
        r = cfg.beta * (pol - ref)
        out["rewards"] = vars(preference_accuracy(r[:, 0], r[:, 1]))
    return out


# ----------------------------------------------------------------------------------------------- workflow
def dpo(cfg: DPOConfig) -> DPOResult:
    from llmlab.io import save_checkpoint

    out, device, model, tok = start_run(cfg, "preference pairs are text")
    train, val = prepare(cfg.data, tok, cfg.seed, unpaired=cfg.loss == "kto")
    if cfg.loss == "kto":
        _kto_mismatch(train, cfg.seed)
        if val:
            _kto_mismatch(val, cfg.seed + 1)
    pad = pad_id_of(tok)
    peft = PeftSetup(model, cfg.peft, tok, max_steps=cfg.train.max_steps, seed=cfg.seed)
    train_cfg = replace(cfg.train, sample_prompts=[]) if peft.wrapped else cfg.train
    template = cfg.data.chat_template

    def encode_prompt(text: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       chat_template=template)

    precision = resolve_precision(cfg.train.precision, torch.device(device).type)

    def autocast():
        return precision_context(precision, torch.device(device).type)

    needs_ref = cfg.loss not in REFERENCE_FREE
    ref_off = _adapter_off(peft.model) if needs_ref and cfg.reference == "adapter_disabled" else None
    if needs_ref and ref_off is None:  # before the first step: the policy as it starts, in the trainer's precision
        _reference_cache(cfg, peft.model, train, val, pad, autocast, out, device)
    loader = PairLoader(train, batch_size=cfg.data.batch_size, pad_id=pad, seed=cfg.seed)
    val_batches = PairLoader(val, batch_size=cfg.data.batch_size, pad_id=pad, shuffle=False).epoch_batches() \
        if val else []
    trainer = Trainer(peft.train_model, loader, train_cfg, out_dir=out, loss_fn=make_loss_fn(cfg, ref_off),
                      val_batches=val_batches, tokenizer=tok, encode_prompt=encode_prompt)
    peft.attach(trainer)
    (out / "peft.json").write_text(json.dumps(peft.summary(), indent=2) + "\n")
    eval_path = out / "eval.json"
    report = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    if "before" not in report:  # a resumed run keeps the first measurement
        report = {"before": _implicit_accuracy(peft.train_model, val, pad, cfg, autocast, at_start=True)}
        _write_json(eval_path, report)
    if train_cfg.progress:
        trainer_note(f"{cfg.loss.upper()} of {cfg.model}: {len(train):,} training items, {len(val):,} held out; "
                     f"beta {cfg.beta}; reference {'none' if not needs_ref else cfg.reference}; out_dir {out}")
        if cfg.peft.method != "none":
            trainer_note(peft.describe())
    result = trainer.fit()
    report["after"] = _implicit_accuracy(peft.train_model, val, pad, cfg, autocast)
    _write_json(eval_path, report)
    if cfg.peft.method == "none":
        final = save_checkpoint(model, out / "final", tokenizer=tok)
    else:
        peft.save_adapter(out / "adapter", base_model_name_or_path=cfg.model)
        final = save_checkpoint(plain_model(model), out / "final", tokenizer=tok)
    return DPOResult(result, report, str(final))


def _reference_cache(cfg, policy, train, val, pad, precision, out: Path, device) -> None:
    """ref_logps on every item: read from out/reference.json when it matches these items and models, else
    computed (with cfg.ref_model, or the policy as it starts) and written there."""
    from llmlab.api import load

    path, key = out / "reference.json", _fingerprint(train + val, cfg)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == key:
            for e, r in zip(train + val, saved["ref_logps"]):
                e["ref_logps"] = r
            return
    ref = policy
    if cfg.ref_model:
        ref, _ = load(cfg.ref_model, device=device)
        ref = ref.float()
    attach_reference(ref, train + val, pad, batch_size=cfg.data.batch_size, precision=precision)
    _write_json(path, {"fingerprint": key, "ref_logps": [e["ref_logps"] for e in train + val]})


def _write_json(path: Path, obj) -> None:
    """Atomically (temp file + rename): a run killed mid-write keeps the previous file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
