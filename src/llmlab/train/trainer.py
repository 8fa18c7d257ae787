"""The one trainer loop. Pretraining, SFT and later DPO/PPO/GRPO/distillation differ only in the data they feed
and the loss function they pass:

    loss_fn(model, batch) -> (loss, metrics)

`loss` is a scalar mean over whatever the batch holds; metrics may hold a "weight": how many items the mean is
over (labelled tokens for a language model, pairs for DPO). Micro-batches of one optimizer step are weighted by
it, so k micro-batches give the update of one batch k times larger:

    g = Σ_i w_i ∇loss_i / Σ_i w_i      (= ∇ of the mean over all labelled tokens of the step)

Each step: lr from the schedule → k × (forward, backward of w_i · loss_i) → gradients scaled by 1/Σw and
clipped in one multiply (coef = min(1, clip / (‖g‖ + 1e-6)) as torch's clip_grad_norm_) → NaN/Inf guard →
AdamW step. Then logging, evaluation, sample generations and checkpoints at their intervals.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .metrics import (MetricsLog, Progress, backward_extent, format_eval, matmul_peak_flops, perplexity, plot_losses,
                      resolve_precision)
from .optim import Schedule, build_optimizer
from .state import (clean_temporaries, checkpoint_path, list_checkpoints, load_training_checkpoint,
                    prune_checkpoints, save_training_checkpoint)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


def precision_context(precision: str, device_type: str):
    """The context a model runs in at a resolved precision ("bf16": autocast, "fp32": none). Workflows use it
    for forward passes outside the trainer (DPO's reference log-probs) so they match the trainer's numerics."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped without saving."""


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy, mean over labelled tokens (position t predicts labels[t+1]; -100 is ignored),
    computed chunk by chunk without the [B, T, vocab] logits (return_logits=False). Under torch.no_grad
    (evaluation) the MoE auxiliary loss, a training regularizer, is left out: the validation loss is the
    language-modelling loss."""
    labels = batch["labels"]
    weight = int((labels[:, 1:] != -100).sum())
    out = model(batch["input_ids"], batch.get("attention_mask"), document_ids=batch.get("document_ids"),
                labels=labels, return_logits=False)
    loss = out.loss
    if not torch.is_grad_enabled() and out.aux_loss is not None:
        loss = loss - out.aux_loss
    return loss, {"weight": weight}


@dataclass
class TrainResult:
    steps: int
    tokens: int  # tokens processed (input_ids elements), this session and before it
    train_loss: float | None  # last logged
    val_loss: float | None  # last evaluation
    best_val_loss: float | None
    best_step: int | None
    checkpoint: str | None  # the newest checkpoint directory
    best_checkpoint: str | None
    metrics_path: str
    plot_path: str | None
    resumed_from: int | None  # the step this session started from, if it resumed
    train_seconds: float  # wall time of this session's loop: data, logging, evaluation, checkpoints included
    eval_seconds: float  # of which evaluation and sample generation
    tokens_per_s: float  # this session's training tokens / (train_seconds - eval_seconds)


class Trainer:
    def __init__(self, model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], config: TrainConfig, *,
                 out_dir: str | Path, loss_fn: LossFn = lm_loss, val_batches: Sequence[dict] | None = None,
                 val_bytes_per_token: float | None = None, tokenizer: Any = None,
                 encode_prompt: Callable[[str], list[int]] | None = None,
                 hooks: Sequence[Callable[["Trainer"], None]] = ()):
        """model on its device; loader an (infinite) iterable of batches with state_dict()/load_state_dict()
        for exact resume; val_bytes_per_token (UTF-8 bytes of the validation text per token) turns the
        validation loss into bits per byte; tokenizer is saved with each checkpoint and used for samples;
        encode_prompt turns a sample prompt into ids (default: tokenizer.encode; SFT applies the chat
        template); hooks run after every optimizer step."""
        config.validate()
        self.model, self.loader, self.config, self.loss_fn = model, loader, config, loss_fn
        self.val_batches = list(val_batches or [])
        self.val_bytes_per_token, self.tokenizer, self.hooks = val_bytes_per_token, tokenizer, list(hooks)
        self.encode_prompt = encode_prompt
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(config.precision, self.device.type)
        if config.gradient_checkpointing:
            if not hasattr(getattr(model, "cfg", None), "gradient_checkpointing"):
                raise ValueError("train.gradient_checkpointing needs an llmlab Transformer (model.cfg)")
            model.cfg.gradient_checkpointing = True
        self.optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                         betas=(config.beta1, config.beta2), eps=config.eps)
        self.schedule = Schedule(config.schedule, config.max_steps, config.warmup_steps, config.min_lr_ratio,
                                 config.decay_fraction)
        self.forward_model = torch.compile(model) if config.compile else model
        self.step, self.tokens = 0, 0
        self.best_val_loss, self.best_step = math.inf, None
        self.last_val: dict[str, Any] | None = None
        self.last_train: dict[str, Any] | None = None
        self._acc = self._empty_acc()
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------------------------------------ public
    def fit(self) -> TrainResult:
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.checkpoint_dir)
        resumed_from = self._resume_or_start()
        peak = cfg.peak_flops or (matmul_peak_flops(str(self.device), self._dtype()) if hasattr(
            getattr(self.model, "cfg", None), "flops_per_token") else 0.0)
        self._peak = peak
        model_cfg = getattr(self.model, "cfg", None)
        self._backward = backward_extent(self.model, model_cfg.n_layers) if peak and model_cfg else {}
        self._iter = iter(self.loader)
        self.model.train()
        log = MetricsLog(self.metrics_path)
        bar = Progress(cfg.max_steps, self.step, cfg.progress)
        start, eval_seconds, session_tokens = time.perf_counter(), 0.0, 0
        self._fit_start = start
        try:
            if cfg.eval_at_start and self.val_batches and self.step == 0:
                self._evaluate_and_log(log, bar, track_best=False)
                eval_seconds = time.perf_counter() - start
            self._interval_start, self._interval_tokens, self._interval_pause = time.perf_counter(), 0, 0.0
            while self.step < cfg.max_steps:
                step_tokens = self._train_step(log)
                session_tokens += step_tokens
                self._interval_tokens += step_tokens
                for hook in self.hooks:
                    hook(self)
                last = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or last:
                    self.last_train = self._log_train(log)
                    bar.update(self.step, self.last_train)
                else:
                    bar.update(self.step)
                new_best = False
                if self.val_batches and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    t = time.perf_counter()
                    new_best = self._evaluate_and_log(log, bar)
                    spent = time.perf_counter() - t
                    eval_seconds += spent
                    self._interval_pause += spent
                if self.step % cfg.checkpoint_every == 0 or last or new_best:
                    self.save()
        finally:
            bar.close()
            log.close()
        seconds = time.perf_counter() - start
        plot = None
        if cfg.plot and self.metrics_path.exists():
            plot = str(plot_losses(self.metrics_path, self.out_dir / "loss.png"))
        found = dict(list_checkpoints(self.checkpoint_dir))
        result = TrainResult(
            steps=self.step, tokens=self.tokens,
            train_loss=self.last_train["loss"] if self.last_train else None,
            val_loss=self.last_val["val_loss"] if self.last_val else None,
            best_val_loss=None if self.best_step is None else self.best_val_loss, best_step=self.best_step,
            checkpoint=str(found[max(found)]) if found else None,
            best_checkpoint=str(found[self.best_step]) if self.best_step in found else None,
            metrics_path=str(self.metrics_path), plot_path=plot, resumed_from=resumed_from,
            train_seconds=seconds, eval_seconds=eval_seconds,
            tokens_per_s=session_tokens / max(1e-9, seconds - eval_seconds))
        (self.out_dir / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        return result

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (token-weighted mean over the validation batches), perplexity = e^loss and, when
        the bytes per token of the validation text are known, bits per byte:
            bpb = loss_nats_per_token · tokens / (bytes · ln 2) = loss / (ln 2 · bytes_per_token)
        Any other number the loss function reports (a reward model's accuracy, DPO's margins) is averaged with
        the same weights and reported as val_<name>."""
        batches = self.val_batches[: self.config.eval_batches or None]
        if not batches:
            raise ValueError("no validation batches: pass val_batches to the Trainer")
        was_training = self.model.training
        self.model.eval()
        total, weight, extra = 0.0, 0.0, {}
        try:
            for batch in batches:
                with self.autocast():
                    loss, metrics = self.loss_fn(self.forward_model, self._to_device(batch))
                w = float(metrics.pop("weight", 1))
                total += float(loss) * w
                weight += w
                for name, v in metrics.items():
                    extra[name] = extra.get(name, 0.0) + float(v) * w
        finally:
            self.model.train(was_training)
        loss = total / max(weight, 1e-12)
        out = {"val_loss": loss, "val_ppl": perplexity(loss)}
        out.update({f"val_{name}": v / max(weight, 1e-12) for name, v in extra.items()})
        if self.val_bytes_per_token:
            out["val_bpb"] = loss / (math.log(2) * self.val_bytes_per_token)
        return out

    def save(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "best_val_loss": self.best_val_loss,
                 "best_step": self.best_step, "schedule": self.schedule.state_dict(), "accumulated": self._acc,
                 "last_val": self.last_val, "last_train": self.last_train}
        path = save_training_checkpoint(checkpoint_path(self.checkpoint_dir, self.step), model=self.model,
                                        optimizer=self.optimizer, loader=self.loader, state=state,
                                        tokenizer=self.tokenizer)
        prune_checkpoints(self.checkpoint_dir, self.config.keep_last,
                          {self.best_step} if self.best_step is not None else set())
        return path

    # ------------------------------------------------------------------------------------------------ steps
    def _train_step(self, log: MetricsLog) -> int:
        cfg = self.config
        self.schedule.apply(self.optimizer, self.step)
        loss_sum = torch.zeros((), device=self.device)
        weight_sum, tokens, extra = 0.0, 0, {}
        k = cfg.grad_accum_steps
        for _ in range(k):
            batch = self._to_device(self._next_batch())
            with self.autocast():
                loss, metrics = self.loss_fn(self.forward_model, batch)
            w = float(metrics.pop("weight", 1))
            # k == 1: the plain mean's gradient; k > 1: Σ w_i ∇loss_i now, divided by Σ w_i below
            (loss if k == 1 else loss * w).backward()
            loss_sum += loss.detach().float() * w
            weight_sum += w
            for name, v in metrics.items():
                extra[name] = extra.get(name, 0.0) + float(v) * w
            tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        grads = [p.grad for p in self._params if p.grad is not None]
        scale = 1.0 if k == 1 else 1.0 / max(weight_sum, 1e-12)
        norm = (torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)) * scale
        loss_value, norm_value = torch.stack([loss_sum / max(weight_sum, 1e-12), norm.float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self._diverged(log, loss_value, norm_value)
        coef = torch.full((), scale, device=norm.device)
        if cfg.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_'s coefficient, times the accumulation scale
            coef = torch.clamp(cfg.grad_clip / (norm + 1e-6), max=1.0) * scale
        if grads and (cfg.grad_clip > 0 or k > 1):
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        a = self._acc
        a["loss"] += loss_value * weight_sum
        a["weight"] += weight_sum
        a["grad_norm"] += norm_value
        a["steps"] += 1
        a["lr"] = self.optimizer.param_groups[0]["lr"]
        for name, v in extra.items():
            a["extra"][name] = a["extra"].get(name, 0.0) + v
        return tokens

    def _log_train(self, log: MetricsLog) -> dict[str, Any]:
        a, now = self._acc, time.perf_counter()
        seconds = max(1e-9, now - self._interval_start - self._interval_pause)
        tps = self._interval_tokens / seconds
        record = {"kind": "train", "step": self.step, "loss": a["loss"] / max(a["weight"], 1e-12),
                  "lr": a["lr"], "grad_norm": a["grad_norm"] / max(a["steps"], 1), "tokens": self.tokens,
                  "tokens_per_s": tps, "elapsed_s": now - self._fit_start}
        for name, v in a["extra"].items():
            record[name] = v / max(a["weight"], 1e-12)
        cfg = getattr(self.model, "cfg", None)
        if self._peak and self._seq_len and hasattr(cfg, "flops_per_token"):
            record["mfu"] = tps * cfg.flops_per_token(self._seq_len, **self._backward) / self._peak
        log.write(record)
        self._acc = self._empty_acc()
        self._interval_start, self._interval_tokens, self._interval_pause = now, 0, 0.0
        return record

    def _evaluate_and_log(self, log: MetricsLog, bar: Progress, track_best: bool = True) -> bool:
        record = {"kind": "val", "step": self.step, **self.evaluate()}
        log.write(record)
        self.last_val = record
        bar.print(format_eval({**record, "train_loss": (self.last_train or {}).get("loss")}))
        new_best = track_best and record["val_loss"] < self.best_val_loss
        if new_best:
            self.best_val_loss, self.best_step = record["val_loss"], self.step
        for i, prompt in enumerate(self.config.sample_prompts if self.tokenizer is not None else []):
            text = self._sample(prompt, seed=i)
            log.write({"kind": "sample", "step": self.step, "prompt": prompt, "text": text})
            bar.print(f"  sample: {prompt!r} -> {text!r}")
        return new_best

    def _sample(self, prompt: str, seed: int) -> str:
        from .sample import generate

        tok = self.tokenizer
        ids = self.encode_prompt(prompt) if self.encode_prompt else tok.encode(prompt, add_special_tokens=False)
        stop = tuple(i for i in {tok.token_to_id(t) for t in (tok.eos_token, "<|im_end|>") if t} if i is not None)
        with self.autocast():
            new = generate(self.model, ids, max_new_tokens=self.config.sample_tokens, top_k=self.config.sample_top_k,
                           stop_ids=stop, seed=seed)
        return tok.decode(new, skip_special_tokens=True)

    def _diverged(self, log: MetricsLog, loss: float, norm: float) -> None:
        found = list_checkpoints(self.checkpoint_dir)
        log.write({"kind": "diverged", "step": self.step + 1, "loss": loss, "grad_norm": norm})
        where = (f"the last good checkpoint is {found[-1][1]} (step {found[-1][0]}); it resumes from there"
                 if found else "no checkpoint had been written yet")
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: loss = {loss}, gradient norm = {norm}. Stopped without "
            f"updating the weights or saving; {where}. Try a lower train.lr, more train.warmup_steps, "
            "train.grad_clip=1.0, or train.precision=fp32.")

    # ------------------------------------------------------------------------------------------------ helpers
    def _resume_or_start(self) -> int | None:
        found = list_checkpoints(self.checkpoint_dir)
        if found and not self.config.resume:
            raise ValueError(f"{self.out_dir} already holds checkpoints (up to step {found[-1][0]}); set "
                             "train.resume=true to continue that run, or choose another out_dir")
        if not found:
            MetricsLog.truncate(self.metrics_path, -1)  # a run killed before its first checkpoint starts over
            return None
        step, path = found[-1]
        state = load_training_checkpoint(path, model=self.model, optimizer=self.optimizer, loader=self.loader)
        self.step, self.tokens = state["step"], state["tokens"]
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.schedule.load_state_dict(state["schedule"])
        self._acc = state["accumulated"]
        self.last_val, self.last_train = state["last_val"], state["last_train"]
        MetricsLog.truncate(self.metrics_path, step)
        if self.config.progress:
            Progress(0, 0, True).print(f"resuming from {path} (step {step})")
        return step

    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self._iter)
        except StopIteration:  # a finite loader: start another epoch
            self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                raise ValueError("the training loader produced no batch: the training set is empty. Check the "
                                 "data sources (and that documents are longer than one sequence)") from None
        if not getattr(self, "_checked", False):
            self._check_batch(batch)
            self._checked = True
        return batch

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        ids = batch.get("input_ids")
        self._seq_len = int(ids.shape[-1]) if ids is not None else 0
        limit = getattr(getattr(self.model, "cfg", None), "max_seq_len", None)
        if ids is not None and limit is not None and ids.shape[-1] > limit:
            raise ValueError(f"batches have sequence length {ids.shape[-1]}, above the model's max_seq_len={limit}; "
                             "lower the data's seq_len/max_len or build the model with a larger max_seq_len")

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self):
        return precision_context(self.precision, self.device.type)

    @staticmethod
    def _empty_acc() -> dict[str, Any]:
        return {"loss": 0.0, "weight": 0.0, "grad_norm": 0.0, "steps": 0, "lr": 0.0, "extra": {}}

    _seq_len = 0
    _peak = 0.0
