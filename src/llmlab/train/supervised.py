"""Supervised fine-tuning: a model and its tokenizer → conversations encoded with the chat template (loss on
assistant tokens only) → padded or packed batches → the same trainer as pretraining.

    from llmlab.train import SFTConfig, load_recipe, sft
    result = sft(load_recipe(SFTConfig, "recipes/sft/smollm2.yaml", ["data.max_conversations=200"]))

`model` is anything llmlab.load reads: a named asset ("smollm2-135m-instruct"), a .gguf file, a Hugging Face
directory or an llmlab checkpoint (e.g. a pretraining run's out_dir/final). out_dir gets config.yaml,
checkpoints/, metrics.jsonl, loss.png, result.json and final/ (model + tokenizer).

Parameter-efficient fine-tuning: the `peft` section (`peft.method=lora peft.r=8`, or `llmlab sft --peft lora`)
applies one method before training; only its parameters train (the optimizer sees only them). The run also
writes peft.json (method, trainable and total parameters) and adapter/:

    lora, dora     PEFT's format (adapter_config.json + adapter_model.safetensors): peft.PeftModel loads it,
                   so do llmlab.peft.load_adapter and `llmlab peft merge`
    ia3            PEFT's format (peft_type IA3)
    prompt, ptuning, prefix   PEFT's format (PROMPT_TUNING / PREFIX_TUNING; P-tuning's encoder output is saved
                   as a plain soft prompt, prefixes folded), read back by llmlab.peft.load_prompt
    adalora        no PEFT writer here: adalora_model.safetensors (our module names: P, Λ, Q per part) and
                   adalora_config.json (config + final ranks)
    bitfit         PEFT has no BitFit: bitfit_model.safetensors (every trained bias, our names) + bitfit.json
    adapter        PEFT has no bottleneck adapters: bottleneck_adapter.safetensors + .json (Houlsby, or
                   Pfeiffer with peft.placement=mlp), read back by llmlab.peft.load_bottleneck_adapter

final/ is always a plain llmlab checkpoint: the adapter merged into the weights (LoRA, DoRA, IA3, AdaLoRA),
the trained biases in the model (BitFit; the config's bias flags set where biases were added), or for the
prompt methods and bottleneck adapters the unchanged base model (a soft prompt, a prefix or a nonlinear
bottleneck cannot be folded into the weights: use adapter/). AdaLoRA's importance statistics (the controller)
are not checkpointed: a resumed AdaLoRA run restarts them. The prompt methods generate no samples during training (the wrapper is not a plain model).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig, resolve_device
from .pretraining import trainer_note
from .recipe import save_recipe
from .state import seed_everything
from .trainer import Trainer, TrainResult, lm_loss


@dataclass
class SFTData:
    sources: list[str] = field(default_factory=lambda: ["chat-english"])  # files, directories or named sources
    format: str = "auto"  # auto | alpaca | sharegpt | messages
    max_conversations: int = 0  # 0: all; else a seeded random subset of this many (quick runs)
    val_fraction: float = 0.1  # conversations held out for validation
    max_len: int = 512  # tokens per conversation; longer ones are truncated
    batch_size: int = 8
    pack: bool = False  # pack conversations into rows of seq_len tokens (document_ids keep them apart)
    seq_len: int = 0  # row length when packing; 0: max_len
    chat_template: str | None = None  # None: the tokenizer's; or a built-in name (chatml, llama3) or Jinja text


PEFT_METHODS = ("none", "lora", "dora", "adalora", "ia3", "bitfit", "adapter", "prompt", "ptuning", "prefix")


@dataclass
class SFTPeft:
    method: str = "none"  # none | lora | dora | adalora | ia3 | bitfit | adapter | prompt | ptuning | prefix
    r: int = 8  # LoRA/DoRA rank; AdaLoRA's average final rank (target_r)
    alpha: float = 16.0  # LoRA/DoRA/AdaLoRA scaling numerator (s = alpha / r; AdaLoRA: alpha / init_r)
    dropout: float = 0.0  # on the adapter's input (LoRA, DoRA, AdaLoRA)
    # Hugging Face names (q k v o gate up down) or regexes over our module names; []: the method's default
    # (LoRA/DoRA/AdaLoRA: q k v o gate up down; IA3: k v down; BitFit: every existing bias)
    target_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False  # LoRA/DoRA: s = alpha / sqrt(r)
    init_r: int = 12  # AdaLoRA: starting rank per part
    tinit: int = 0  # AdaLoRA: steps at the full budget first
    tfinal: int = 0  # AdaLoRA: last steps at the final allocation
    orth_reg_weight: float = 0.5  # AdaLoRA: weight of the orthogonality regularizer in the loss
    feedforward_modules: list[str] = field(default_factory=list)  # IA3: input-side targets ([]: down if targeted)
    n_virtual_tokens: int = 20  # prompt, ptuning, prefix
    init_text: str | None = None  # prompt: initialize the soft prompt from this text
    prefix_projection: bool = False  # prefix: train through an MLP reparameterization (false: P-tuning v2)
    encoder: str = "mlp"  # ptuning: mlp | lstm
    reduction_factor: int = 16  # adapter: bottleneck size = dim // reduction_factor
    placement: str = "both"  # adapter: both (Houlsby: after attention and MLP) | mlp (Pfeiffer: after the MLP)

    def validate(self) -> None:
        if self.method not in PEFT_METHODS:
            close = difflib.get_close_matches(self.method, PEFT_METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown peft.method {self.method!r}{hint}; choose one of {', '.join(PEFT_METHODS)}")
        for key in ("r", "init_r", "n_virtual_tokens", "reduction_factor"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"peft.{key} must be an int >= 1, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must lie in [0, 1), got {self.dropout}")
        if self.method == "adalora" and self.r > self.init_r:
            raise ValueError(f"peft.r={self.r} (AdaLoRA's final average rank) is above peft.init_r={self.init_r}")
        if self.method == "ptuning" and self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"peft.encoder must be mlp or lstm, got {self.encoder!r}")
        if self.placement not in ("both", "mlp"):
            raise ValueError(f"peft.placement must be both or mlp, got {self.placement!r}")


def _sft_train_defaults() -> TrainConfig:
    # fine-tuning moves a trained model a little: a small lr, short warm-up, no decay on top of the pretrained
    # weights' own scale, evaluation before the first step as the baseline
    return TrainConfig(max_steps=200, lr=5e-5, warmup_steps=10, weight_decay=0.0, eval_every=50,
                       checkpoint_every=100, keep_last=1, eval_at_start=True)


@dataclass
class SFTConfig:
    out_dir: str = "runs/sft"
    seed: int = 0
    model: str = "smollm2-135m-instruct"
    data: SFTData = field(default_factory=SFTData)
    train: TrainConfig = field(default_factory=_sft_train_defaults)
    peft: SFTPeft = field(default_factory=SFTPeft)

    def __post_init__(self) -> None:
        self.train.validate()
        self.peft.validate()
        if self.peft.method == "adalora" and self.peft.tinit + self.peft.tfinal >= self.train.max_steps:
            raise ValueError(f"peft.tinit + peft.tfinal ({self.peft.tinit} + {self.peft.tfinal}) must be below "
                             f"train.max_steps ({self.train.max_steps}) for AdaLoRA's rank budget to decrease")
        if not self.data.sources:
            raise ValueError("data.sources is empty; give conversation files or named sources (chat-english)")
        if self.data.max_len < 2 or self.data.batch_size < 1:
            raise ValueError(f"data.max_len must be >= 2 and data.batch_size >= 1, got {self.data.max_len} and "
                             f"{self.data.batch_size}")


def start_run(cfg, why_tokenizer: str):
    """What every fine-tuning workflow does first: out_dir with the resolved config.yaml, the seeds, the device,
    and cfg.model loaded (anything llmlab.load reads) in fp32 master weights (AdamW updates vanish in bf16;
    autocast handles speed) with its tokenizer, which must exist (why_tokenizer says why)."""
    from llmlab.api import load

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device, cfg.train.threads)
    model, tok = load(cfg.model, device=device)
    if tok is None:
        raise ValueError(f"{cfg.model} has no tokenizer; {why_tokenizer} (save the model with its tokenizer)")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return out, device, model, tok


def sft(cfg: SFTConfig) -> TrainResult:
    from llmlab.data import SFTLoader, encode_conversations, load_conversations
    from llmlab.io import save_checkpoint

    out, device, model, tok = start_run(cfg, "SFT needs one to apply the chat template")
    progress = cfg.train.progress
    if tok.chat_template is None and cfg.data.chat_template is None:
        raise ValueError(f"the tokenizer of {cfg.model} has no chat template; set data.chat_template (a built-in: "
                         "chatml, llama3; or Jinja text)")
    data = cfg.data
    if data.max_len > model.cfg.max_seq_len or (data.pack and data.seq_len > model.cfg.max_seq_len):
        raise ValueError(f"data.max_len={data.max_len} (or data.seq_len={data.seq_len}) is above the model's "
                         f"max_seq_len={model.cfg.max_seq_len}; lower it")

    convs = load_conversations(list(data.sources), format=data.format)
    rng = random.Random(cfg.seed)
    order = rng.sample(range(len(convs)), len(convs))  # a seeded shuffle, then the subset and the split
    if data.max_conversations:
        order = order[: data.max_conversations]
    n_val = min(max(1, round(len(order) * data.val_fraction)), len(order) - 1) if data.val_fraction > 0 and \
        len(order) >= 2 else 0
    val_convs = [convs[i] for i in order[:n_val]]
    train_convs = [convs[i] for i in order[n_val:]]
    encode = dict(max_len=data.max_len, chat_template=data.chat_template, progress=progress)
    train_examples = encode_conversations(train_convs, tok, **encode)
    pad_id = _pad_id(tok)
    seq_len = data.seq_len or data.max_len
    loader = SFTLoader(train_examples, batch_size=data.batch_size, seed=cfg.seed, pack=data.pack,
                       seq_len=seq_len if data.pack else None, pad_id=pad_id)
    val_batches = []
    if val_convs:
        val_loader = SFTLoader(encode_conversations(val_convs, tok, **encode), batch_size=data.batch_size,
                               shuffle=False, pack=data.pack, seq_len=seq_len if data.pack else None, pad_id=pad_id,
                               drop_last=False)
        val_batches = list(itertools.islice(iter(val_loader), val_loader.batches_in_epoch(0)))

    template = data.chat_template

    def encode_prompt(text: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       chat_template=template)

    peft = PeftSetup(model, cfg.peft, tok, max_steps=cfg.train.max_steps, seed=cfg.seed)
    train_cfg = cfg.train
    if peft.wrapped and train_cfg.sample_prompts:  # a prompt wrapper is not a plain model for generate()
        train_cfg = dataclasses.replace(train_cfg, sample_prompts=[])
    model.train()
    trainer = Trainer(peft.train_model, loader, train_cfg, out_dir=out, loss_fn=peft.loss_fn(lm_loss),
                      val_batches=val_batches, tokenizer=tok, encode_prompt=encode_prompt)
    peft.attach(trainer)
    (out / "peft.json").write_text(json.dumps(peft.summary(), indent=2) + "\n")
    if progress:
        trainer_note(f"SFT of {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
                     f"{len(train_examples):,} conversations, {len(val_convs):,} held out; {trainer.precision} on "
                     f"{device}; out_dir {out}")
        if cfg.peft.method != "none":
            trainer_note(peft.describe())
    result = trainer.fit()
    if cfg.peft.method == "none":
        save_checkpoint(model, out / "final", tokenizer=tok)
    else:
        peft.save_adapter(out / "adapter", base_model_name_or_path=cfg.model)
        save_checkpoint(plain_model(model), out / "final", tokenizer=tok)
    return result


class PeftSetup:
    """One PEFT method applied to `model` for training: the module the trainer runs (the model itself, or a
    prompt wrapper around it), the loss (AdaLoRA adds its regularizer), the per-step controller (AdaLoRA, as an
    optimizer step post-hook: it reads the gradients, which the trainer's own hooks no longer see) and the
    adapter's files."""

    def __init__(self, model, cfg: SFTPeft, tokenizer=None, *, max_steps: int = 1000, seed: int = 0):
        from llmlab import peft as P

        self.model, self.cfg, self.train_model, self.wrapped = model, cfg, model, False
        self.total_base = sum(p.numel() for p in model.parameters())
        targets = tuple(cfg.target_modules) or ("q", "k", "v", "o", "gate", "up", "down")
        m = cfg.method
        if m in ("lora", "dora"):
            P.add_lora(model, P.LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=targets,
                                           use_rslora=cfg.use_rslora, use_dora=m == "dora"))
        elif m == "adalora":
            P.add_adalora(model, P.AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.r, alpha=cfg.alpha,
                                                 dropout=cfg.dropout, target_modules=targets, total_step=max_steps,
                                                 tinit=cfg.tinit, tfinal=cfg.tfinal,
                                                 orth_reg_weight=cfg.orth_reg_weight))
        elif m == "ia3":
            ia3_targets = tuple(cfg.target_modules) or ("k", "v", "down")
            ff = tuple(cfg.feedforward_modules) or tuple(t for t in ia3_targets if t in ("down", "down_proj"))
            P.add_ia3(model, P.IA3Config(target_modules=ia3_targets, feedforward_modules=ff))
        elif m == "bitfit":
            try:
                P.apply_bitfit(model, tuple(cfg.target_modules))
            except ValueError as e:
                raise ValueError(f"peft.method=bitfit: {e}; in a recipe: peft.target_modules=[q, o, up, down]") \
                    from None
        elif m == "adapter":
            P.add_adapter(model, P.AdapterConfig(reduction_factor=cfg.reduction_factor, placement=cfg.placement))
        elif m in ("prompt", "ptuning", "prefix"):
            n = cfg.n_virtual_tokens
            if m == "prompt":
                self.train_model = P.PromptTuning(model, n, init_text=cfg.init_text,
                                                  tokenizer=tokenizer if cfg.init_text else None, seed=seed)
            elif m == "ptuning":
                self.train_model = P.PTuning(model, n, encoder=cfg.encoder, seed=seed)
            else:
                self.train_model = P.PrefixTuning(model, n, projection=cfg.prefix_projection, seed=seed)
            self.wrapped = True
        elif m != "none":
            raise ValueError(f"unknown peft.method {m!r}")
        params = list(self.train_model.parameters())
        self.trainable = sum(p.numel() for p in params if p.requires_grad)
        self.total = sum(p.numel() for p in params)
        self.controller = P.AdaLoraController(model) if m == "adalora" else None

    def summary(self) -> dict:
        return {"method": self.cfg.method, "trainable_parameters": self.trainable, "total_parameters": self.total,
                "trainable_percent": 100.0 * self.trainable / max(self.total, 1),
                "config": dataclasses.asdict(self.cfg)}

    def describe(self) -> str:
        return (f"peft {self.cfg.method}: {self.trainable:,} trainable parameters of {self.total:,} "
                f"({100.0 * self.trainable / max(self.total, 1):.3f}%)")

    def loss_fn(self, base_loss):
        if self.cfg.method != "adalora":
            return base_loss
        from llmlab.peft import orthogonal_regularization

        weight, model = self.cfg.orth_reg_weight, self.model

        def adalora_loss(m, batch):
            loss, metrics = base_loss(m, batch)
            if torch.is_grad_enabled() and weight > 0:  # a training regularizer: not in the validation loss
                reg = weight * orthogonal_regularization(model)
                loss = loss + reg.to(loss.dtype)
                metrics["orth_reg"] = float(reg.detach())
            return loss, metrics

        return adalora_loss

    def attach(self, trainer: Trainer) -> None:
        """AdaLoRA's update_and_allocate(t) after each optimizer step, before zero_grad (it reads the gradients).
        The trainer's hooks run after zero_grad, so this is a torch optimizer step post-hook; t is 1-based."""
        if self.controller is None:
            return
        controller = self.controller
        trainer.optimizer.register_step_post_hook(lambda opt, args, kwargs: controller.update_and_allocate(
            trainer.step + 1))

    def save_adapter(self, path: Path, base_model_name_or_path: str | None = None) -> Path:
        from safetensors.torch import save_file

        from llmlab import peft as P

        path = Path(path)
        m = self.cfg.method
        if m in ("lora", "dora", "ia3"):
            P.save_adapter(self.model, path, base_model_name_or_path=base_model_name_or_path)
        elif m in ("prompt", "ptuning", "prefix"):
            P.save_prompt(self.train_model, path, base_model_name_or_path=base_model_name_or_path)
        elif m == "adalora":
            path.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items() if ".adalora." in k}
            save_file(tensors, str(path / "adalora_model.safetensors"), metadata={"format": "pt"})
            ranks = {f"{mod}.{part}": r for (mod, part), r in self.controller.ranks().items()}
            (path / "adalora_config.json").write_text(json.dumps(
                {"peft_type": "ADALORA (llmlab names)", "base_model_name_or_path": base_model_name_or_path,
                 **self.model.adalora_config.to_dict(), "ranks": ranks}, indent=2, sort_keys=True) + "\n")
        elif m == "adapter":
            P.save_bottleneck_adapter(self.model, path)
        elif m == "bitfit":
            path.mkdir(parents=True, exist_ok=True)
            tensors = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(tensors, str(path / "bitfit_model.safetensors"), metadata={"format": "pt"})
            (path / "bitfit.json").write_text(json.dumps(
                {"peft_type": "BITFIT (llmlab names)", "base_model_name_or_path": base_model_name_or_path,
                 "added_biases": list(getattr(self.model, "bitfit_added", []))}, indent=2) + "\n")
        return path


_BIAS_FLAGS = {"attn.qkv": "qkv_bias", "attn.out": "attn_out_bias", "mlp.up": "mlp_bias", "mlp.down": "mlp_bias"}


@torch.no_grad()
def plain_model(model):
    """A plain Transformer (no wrappers, hooks or adapter tensors) computing what `model` with its active LoRA /
    DoRA / IA3 / AdaLoRA adapter computes: the adapter merged into a copy of the weights. BitFit's added
    biases become real biases (the config's bias flags are set; layers of the same kind that got none get
    zero biases). `model` itself is left as it is."""
    from llmlab.peft import active_adapter, adalora_parts, merge_ia3, merge_lora

    m = copy.deepcopy(model)
    if active_adapter(m) is not None:
        merge_lora(m, active_adapter(m))
    ia3_active = getattr(m, "ia3_active", None)
    if ia3_active is not None:
        merge_ia3(m, ia3_active)
    if getattr(m, "adalora_config", None) is not None:
        modules = dict(m.named_modules())
        for name, parts in adalora_parts(m).items():
            W = modules[name].weight
            for p in parts.values():
                W[p.start:p.stop] += (p.scaling * (p.lora_B @ (p.lora_A * p.lora_E))).to(W.dtype)
    cfg = m.cfg
    added = getattr(m, "bitfit_added", [])
    if added:
        flags = {}
        for name in added:
            kind = ".".join(name.split(".")[-2:])
            if kind not in _BIAS_FLAGS:
                raise ValueError(f"a BitFit bias was added to {name}, which no config flag describes")
            flags[_BIAS_FLAGS[kind]] = True
        cfg = dataclasses.replace(cfg, **flags)
    sd = {k.replace(".base_layer.", "."): v for k, v in m.state_dict().items()
          if not any(t in k for t in (".adapters.", ".ia3.", ".adalora."))}
    clean = type(model)(cfg).to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    missing, unexpected = clean.load_state_dict(sd, strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise ValueError(f"could not rebuild a plain model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k in missing:  # biases of layers BitFit did not touch, in a config that now has them
        clean.get_parameter(k).zero_()
    clean.requires_grad_(True)
    return clean.eval()


def _pad_id(tok) -> int:
    """Padding never reaches the loss (labels -100) or attention (attention_mask 0); any valid id works, the
    tokenizer's pad (or EOS) token is the conventional one."""
    for name in (tok.pad_token, tok.eos_token):
        if name and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return 0
