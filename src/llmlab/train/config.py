"""TrainConfig: how the trainer loop runs (optimizer, schedule, precision, logging, evaluation, checkpoints).
Every workflow config (PretrainConfig, SFTConfig, later DPO/GRPO...) nests one under `train`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .optim import SCHEDULES


@dataclass
class TrainConfig:
    # --- length and optimization
    max_steps: int = 1000  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (weighted by their labelled tokens)
    lr: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # cosine | linear | wsd | constant (formulas in train/optim.py)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio · lr (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    weight_decay: float = 0.1  # on linear-layer matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off

    # --- compute
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast where measured faster, else fp32) | fp32 | bf16
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU threads for torch; 0: torch's default (one per core). 1 wins on a busy shared machine

    # --- logging and evaluation
    log_every: int = 10  # steps per train record in metrics.jsonl (loss averaged over them)
    eval_every: int = 100  # steps between validation passes; 0: only at the end
    eval_batches: int = 0  # validation batches per pass; 0: all
    eval_at_start: bool = False  # a validation pass before the first step (the baseline a fine-tune improves on)
    sample_prompts: list[str] = field(default_factory=list)  # generated from at each evaluation
    sample_tokens: int = 32
    sample_top_k: int = 0  # 0: greedy
    progress: bool = True  # progress bar on a terminal, a line per evaluation otherwise
    plot: bool = True  # loss.png at the end
    peak_flops: float = 0.0  # MFU denominator in FLOP/s; 0: measure a matmul here (see train/metrics.py)

    # --- checkpoints
    checkpoint_every: int = 100  # also at the end, and whenever the validation loss reaches a new best
    keep_last: int = 2  # newest checkpoints kept (the best one is kept as well)
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"train.{msg}")

        need(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.decay_fraction <= 1, f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got "
             f"{self.beta1}, {self.beta2}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        need(self.precision in ("auto", "fp32", "bf16"), f"precision={self.precision!r}: use auto, fp32 or bf16")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.eval_every >= 0, f"eval_every must be >= 0 (0: only at the end), got {self.eval_every}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        need(self.threads >= 0, f"threads must be >= 0 (0: torch's default), got {self.threads}")
        need(self.eval_batches >= 0, f"eval_batches must be >= 0 (0: all), got {self.eval_batches}")


def resolve_device(device: str, threads: int = 0) -> str:
    """The device to train on ("auto": cuda when available); sets torch's CPU thread count when threads > 0."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r} but CUDA is not available here; use device=cpu (or auto)")
    return device
