"""`llmlab speedrun`: the whole lifecycle on one machine in about 15 minutes, ending in a report card.

From scratch (the default, what `make demo` runs):
    chat split → BPE tokenizer → pretrain a preset on English + Chinese prose → SFT on chat → DPO with LoRA
    → evaluate every model → report
From a real model (`--base smollm2-135m-instruct`, or any path llmlab.load reads):
    chat split → evaluate the base → SFT with LoRA → DPO with LoRA → evaluate → report

Everything lands in runs/<name>/: plan.json (sizes and step counts, fixed at the first start so that running
the command again resumes the same plan), data/ (the held-out split), pretrain/ sft/ dpo/ (each a workflow's
out_dir, resumable from its checkpoints), stages.json (finished stages and what they measured), loss.png and
report.json, rendered to report.md and a self-contained report.html (eval/report.py) with a leaderboard of
the runs beside it. Running the same command again skips finished stages and resumes the interrupted one.

Budget: pretraining gets PRETRAIN_SHARE of --minutes; its step count comes from timing a few training steps
of the real model here (a GPU gets many more steps from the same minutes). The fine-tuning stages have
fixed step counts per size, scaled by --minutes / 15 when fine-tuning a base model.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console

PRETRAIN_SHARE = 0.6  # of the minutes: the stages after pretraining take roughly the rest (measured, micro)
CHAT_SOURCES = ["chat-english", "chat-chinese"]
PROSE_SOURCES = ["english", "chinese"]
SAMPLE_CHATS = ["Hello, how are you?", "What is AI?", "Tell me a joke.", "你好，你是谁？"]
SAMPLE_PROSE = ["The President", "中国"]
MC_TASK = "strategyqa"  # a BIG-bench task from ../shared/data, scored when present


@dataclass(frozen=True)
class Size:
    """What a size trains: the tokenizer, the pretraining shape, the fine-tuning stages and the evaluation."""
    vocab: int
    train_chars: int  # tokenizer training text
    max_documents: int  # 0: every document of the corpora
    seq_len: int
    batch: int
    lr: float
    val_tokens: int
    sft_steps: int
    sft_max_len: int
    conversations: int  # 0: all chat conversations
    dpo_steps: int
    dpo_pairs: int
    eval_chars: int  # held-out prose per language for bits per byte
    mc_limit: int


SIZES = {
    "nano": Size(512, 200_000, 200, 128, 8, 3e-3, 2048, 30, 96, 400, 10, 120, 4000, 20),
    "micro": Size(8192, 3_000_000, 0, 256, 8, 2e-3, 16384, 120, 128, 0, 30, 400, 20_000, 100),
    "small": Size(16384, 10_000_000, 0, 512, 16, 1e-3, 65536, 400, 256, 0, 100, 0, 100_000, 200),
    "base": Size(32768, 30_000_000, 0, 1024, 16, 6e-4, 131072, 800, 512, 0, 200, 0, 200_000, 500),
}
# fine-tuning a real model: steps per 15 minutes; held-out prose per language (a 49k vocabulary spends ~2 tokens
# per Chinese character, so this is ~4 times the micro model's work per character)
BASE_STEPS = {"sft": 30, "dpo": 20, "max_len": 128, "batch": 4, "eval_chars": 8000}


@dataclass
class SpeedrunConfig:
    name: str = "speedrun"
    runs_dir: str = "runs"
    size: str = "micro"  # nano | micro | small | base (ignored with base)
    minutes: float = 15.0
    base: str | None = None  # a pretrained model to fine-tune instead of pretraining one
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.base is None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}")
        if not self.minutes > 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ValueError(f"name {self.name!r} must be a plain folder name (no slashes, not hidden)")


# ------------------------------------------------------------------------------------------- resources
def available_memory_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_needs(cfg: SpeedrunConfig) -> dict[str, int]:
    """Bytes of memory and disk the run needs at most (a deliberate over-estimate of the big terms).
    Memory: fp32 weights, gradients and AdamW's two moments (16 B/parameter) plus activations (model/cost.py)
    plus ~0.6 GB of runtime; fine-tuning a base with LoRA keeps the weights and the activations only.
    Disk: each stage's final model and its newest and best checkpoints (weights + optimizer state)."""
    from llmlab.model import ModelConfig
    from llmlab.model.cost import activation_bytes

    runtime = 600 * 2**20
    if cfg.base is None:
        s = SIZES[cfg.size]
        mcfg = ModelConfig.preset(cfg.size, vocab_size=s.vocab, max_seq_len=s.seq_len)
        n = mcfg.num_parameters()
        memory = 16 * n + activation_bytes(mcfg, s.batch, s.seq_len) + runtime
        disk = 3 * (4 * n + 2 * 12 * n) + 300 * 2**20  # three stages; shards and logs
    else:
        n = 135_000_000 if "smollm2" in cfg.base.lower() else _parameters_on_disk(cfg.base)
        memory = 2 * 4 * n + runtime * 2  # weights, the LoRA reference pass and activations at batch 4
        disk = 2 * 3 * 4 * n + 100 * 2**20  # final models and checkpoints (which hold the frozen base too)
    return {"memory": memory, "disk": disk}


def _parameters_on_disk(path: str) -> int:
    p = Path(path)
    files = list(p.rglob("*.safetensors")) + list(p.rglob("*.gguf")) if p.is_dir() else [p] if p.exists() else []
    return sum(f.stat().st_size for f in files) // 4 or 135_000_000


def check_resources(cfg: SpeedrunConfig, device: str, *, memory: int | None = None, disk: int | None = None) -> None:
    """Raise ValueError before anything starts when the machine lacks the memory or disk the run needs
    (memory/disk: the available bytes; measured here when None)."""
    need = estimate_needs(cfg)
    what = f"--base {cfg.base}" if cfg.base else f"--size {cfg.size}"
    memory = available_memory_bytes(device) if memory is None else memory
    root = Path(cfg.runs_dir)
    probe = next((p for p in [root, *root.resolve().parents] if p.exists()), Path("."))
    disk = shutil.disk_usage(probe).free if disk is None else disk
    gb = 2**30
    if memory is not None and memory < need["memory"]:
        raise ValueError(f"speedrun {what} needs about {need['memory'] / gb:.1f} GB of memory and {device} has "
                         f"{memory / gb:.1f} GB available; choose a smaller --size or free memory")
    if disk < need["disk"]:
        raise ValueError(f"speedrun {what} needs about {need['disk'] / gb:.1f} GB of disk under {probe} and "
                         f"{disk / gb:.1f} GB are free; choose a smaller --size, another --runs-dir, or free space")


# ------------------------------------------------------------------------------------------- the run
class Run:
    """runs/<name>: the plan, the finished stages, atomic JSON files."""

    def __init__(self, cfg: SpeedrunConfig, console: Console):
        self.cfg, self.console = cfg, console
        self.dir = Path(cfg.runs_dir) / cfg.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plan = self.read("plan.json") or {}
        self.stages = self.read("stages.json") or {}
        started = {k: self.plan.get(k) for k in ("size", "base", "minutes", "seed")}
        wanted = {"size": None if cfg.base else cfg.size, "base": cfg.base, "minutes": cfg.minutes, "seed": cfg.seed}
        if self.plan and started != wanted:
            raise ValueError(f"{self.dir} holds a run started with {started}, not {wanted}; pass another --name "
                             "or delete the folder")
        if not self.plan:
            self.plan = {**wanted, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "command": " ".join(["llmlab", "speedrun", *sys.argv[2:]]) if "speedrun" in sys.argv else ""}
            self.write("plan.json", self.plan)

    def read(self, name: str):
        p = self.dir / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def write(self, name: str, obj) -> Path:
        p = self.dir / name
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, p)
        return p

    def stage(self, name: str, fn) -> dict:
        if name in self.stages:
            self.console.print(f"[dim]{name}: finished earlier ({self.stages[name]['seconds']:.0f} s), skipped[/dim]")
            return self.stages[name]
        self.console.rule(f"[bold]{name}")
        t = time.perf_counter()
        info = fn() or {}
        info["seconds"] = round(time.perf_counter() - t, 2)
        self.stages[name] = info
        self.write("stages.json", self.stages)
        return info


def speedrun(cfg: SpeedrunConfig, console: Console | None = None) -> Path:
    """Run (or resume) the speedrun; returns runs/<name>/report.md."""
    from llmlab.train.config import resolve_device

    cfg.validate()
    console = console or Console(stderr=True)
    device = resolve_device(cfg.device, cfg.threads)
    check_resources(cfg, device)
    run = Run(cfg, console)
    run.stage("data", lambda: _split_data(run))
    if cfg.base is None:
        run.stage("tokenizer", lambda: _tokenizer_stage(run))
        run.stage("pretrain", lambda: _pretrain_stage(run, device))
        run.stage("sft", lambda: _sft_stage(run, str(run.dir / "pretrain" / "final"), peft=False))
    else:
        run.stage("sft", lambda: _sft_stage(run, cfg.base, peft=True))
    run.stage("dpo", lambda: _dpo_stage(run))
    run.stage("evaluate", lambda: _evaluate_stage(run, device))
    return _write_report(run)


# ------------------------------------------------------------------------------------------- stages
def _pretrain_config(run: Run, steps: int = 1):
    from llmlab.train import PretrainConfig, PretrainData, TokenizerSpec, TrainConfig

    cfg, s = run.cfg, SIZES[run.cfg.size]
    every = max(1, steps // 4)
    return PretrainConfig(
        out_dir=str(run.dir / "pretrain"), seed=cfg.seed, preset=cfg.size, model={"max_seq_len": s.seq_len},
        data=PretrainData(sources=list(PROSE_SOURCES), max_documents=s.max_documents, val_fraction=0.02,
                          seq_len=s.seq_len, batch_size=s.batch, val_tokens=s.val_tokens),
        tokenizer=TokenizerSpec(kind="bpe", vocab_size=s.vocab, train_chars=s.train_chars),
        train=TrainConfig(max_steps=steps, lr=s.lr, warmup_steps=max(2, steps // 10), schedule="cosine",
                          min_lr_ratio=0.1, weight_decay=0.1, device=cfg.device, threads=cfg.threads,
                          log_every=max(1, steps // 50), eval_every=every, eval_at_start=True,
                          checkpoint_every=every, keep_last=1, sample_prompts=list(SAMPLE_PROSE), sample_tokens=24,
                          progress=cfg.progress))


def _split_data(run: Run) -> dict:
    """Held-out data every model is measured on and no stage trains on: chat conversations (their replies
    score chat loss; pairs built from them score preference accuracy) and prose per language."""
    from llmlab.data import load_conversations
    from llmlab.data.preference import pairs_from_conversations, save_preferences

    cfg = run.cfg
    data = run.dir / "data"
    data.mkdir(exist_ok=True)
    convs = [c for source in CHAT_SOURCES for c in load_conversations(source)]
    order = random.Random(cfg.seed).sample(range(len(convs)), len(convs))
    limit = SIZES[cfg.size].conversations if cfg.base is None else 0
    order = order[:limit] if limit else order
    n_val = min(100, max(8, len(order) // 10))  # evaluation scores every model on these: keep it quick
    val, train = [convs[i] for i in order[:n_val]], [convs[i] for i in order[n_val:]]
    for name, part in (("chat_train.jsonl", train), ("chat_val.jsonl", val)):
        (data / name).write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in part),
                                 encoding="utf-8")
    save_preferences(pairs_from_conversations(train, seed=cfg.seed), data / "pairs_train.jsonl")
    save_preferences(pairs_from_conversations(val, seed=cfg.seed), data / "pairs_val.jsonl")
    prose = {}
    if cfg.base is None:  # the pretraining's own validation documents
        from llmlab.train.pretraining import split_corpus

        _, val_docs = split_corpus(_pretrain_config(run))
    else:
        from llmlab.data import read_documents, split_documents

        val_docs = []
        for source in PROSE_SOURCES:
            try:
                val_docs += split_documents(read_documents([source]), 0.02, cfg.seed)[1]
            except ValueError as e:  # a corpus that is not installed: evaluate on the others
                run.console.print(f"[yellow]held-out prose: {e}")
    limit_chars = BASE_STEPS["eval_chars"] if cfg.base else SIZES[cfg.size].eval_chars
    for lang in ("en", "zh"):
        docs = [d for d in val_docs if _is_chinese(d) == (lang == "zh")]
        text = "\n\n".join(docs)[:limit_chars]
        if text:
            (data / f"prose_val_{lang}.txt").write_text(text, encoding="utf-8")
            prose[lang] = len(text)
    return {"chat_train": len(train), "chat_val": len(val), "prose_chars": prose}


def _is_chinese(text: str) -> bool:
    sample = text[:2000]
    return sum("\u4e00" <= c <= "\u9fff" for c in sample) > 0.2 * max(1, len(sample))


def _tokenizer_stage(run: Run) -> dict:
    from llmlab.tokenizer.evaluate import evaluate
    from llmlab.train.pretraining import prepare_tokenizer, split_corpus

    pcfg = _pretrain_config(run)
    train_docs, _ = split_corpus(pcfg)
    out = Path(pcfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = prepare_tokenizer(pcfg, train_docs, out)
    info = {"kind": pcfg.tokenizer.kind, "vocab_size": len(tok), "train_chars": pcfg.tokenizer.train_chars}
    for lang in ("en", "zh"):
        path = run.dir / "data" / f"prose_val_{lang}.txt"
        if path.is_file():
            info[f"bytes_per_token_{lang}"] = round(evaluate(tok, path.read_text(encoding="utf-8"))["bytes_per_token"], 3)
    return info


def seconds_per_step(model_cfg, batch: int, seq_len: int, device, steps: int = 3) -> float:
    """Median wall time of a training step (forward, backward, AdamW) of a fresh model at this shape, after two
    warm-up steps (the allocator's and AdamW's first-step costs): what the pretraining budget is divided by."""
    from llmlab.model import Transformer
    from llmlab.train.metrics import resolve_precision
    from llmlab.train.optim import build_optimizer
    from llmlab.train.trainer import precision_context

    device = torch.device(device)
    model = Transformer(model_cfg).to(device).train()
    opt = build_optimizer(model, lr=1e-4)  # the trainer's AdamW
    x = torch.randint(0, model_cfg.vocab_size, (batch, seq_len), device=device)
    precision = resolve_precision("auto", device.type)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        with precision_context(precision, device.type):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def _pretrain_stage(run: Run, device) -> dict:
    from llmlab import tokenizer as tokenizers
    from llmlab.train import pretrain
    from llmlab.train.pretraining import build_model_config

    cfg, s = run.cfg, SIZES[run.cfg.size]
    if "pretrain_steps" not in run.plan:
        tok = tokenizers.load(run.dir / "pretrain" / "tokenizer")
        model_cfg = build_model_config(_pretrain_config(run), len(tok))
        sps = seconds_per_step(model_cfg, s.batch, s.seq_len, device)
        budget = cfg.minutes * 60 * PRETRAIN_SHARE
        # 5 evaluations of val_tokens forward-only (≈ 1/3 of a training step's work per token) come off the top
        evals = 5 * math.ceil(s.val_tokens / (s.batch * s.seq_len)) / 3
        run.plan["pretrain_steps"] = max(20, int(budget / sps - evals))
        run.plan["seconds_per_step"] = round(sps, 4)
        run.write("plan.json", run.plan)
        run.console.print(f"a training step takes {sps:.3f} s here: {run.plan['pretrain_steps']} steps fit "
                          f"{budget / 60:.1f} of the {cfg.minutes:g} minutes")
    result = pretrain(_pretrain_config(run, run.plan["pretrain_steps"]))
    return _train_info(result, Path(run.dir / "pretrain"))


def _train_info(result, out: Path) -> dict:
    from llmlab.train.metrics import read_metrics

    train = read_metrics(out / "metrics.jsonl", "train")
    val = read_metrics(out / "metrics.jsonl", "val")
    mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
    info = {"steps": result.steps, "tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
            "mfu": round(statistics.mean(mfu), 4) if mfu else None, "train_seconds": round(result.train_seconds, 1)}
    if val:
        for key in ("val_loss", "val_bpb"):
            if key in val[0]:
                info[f"{key}_start"], info[f"{key}_final"] = val[0][key], val[-1][key]
    return info


def _ft_scale(run: Run, steps: int) -> int:
    return max(4, round(steps * run.cfg.minutes / 15)) if run.cfg.base else steps


def _sft_stage(run: Run, model: str, *, peft: bool) -> dict:
    from llmlab.train import SFTConfig, SFTData, TrainConfig, sft
    from llmlab.train.supervised import SFTPeft

    cfg = run.cfg
    s = SIZES[cfg.size]
    steps = _ft_scale(run, BASE_STEPS["sft"] if peft else s.sft_steps)
    max_len, batch = (BASE_STEPS["max_len"], BASE_STEPS["batch"]) if peft else (s.sft_max_len, 8)
    sft_cfg = SFTConfig(
        out_dir=str(run.dir / "sft"), seed=cfg.seed, model=model,
        data=SFTData(sources=[str(run.dir / "data" / "chat_train.jsonl")], val_fraction=0.05, max_len=max_len,
                     batch_size=batch),
        train=TrainConfig(max_steps=steps, lr=1e-3 if peft else s.lr / 4, warmup_steps=max(1, steps // 10),
                          weight_decay=0.0, device=cfg.device, threads=cfg.threads, log_every=max(1, steps // 20),
                          eval_every=max(1, steps // 2), eval_at_start=True, checkpoint_every=max(1, steps // 2),
                          keep_last=1, sample_prompts=SAMPLE_CHATS[:2], sample_tokens=24, progress=cfg.progress),
        peft=SFTPeft(method="lora", r=8, alpha=16) if peft else SFTPeft())
    return {**_train_info(sft(sft_cfg), run.dir / "sft"), "peft": "lora r=8" if peft else "full"}


def _dpo_stage(run: Run) -> dict:
    from llmlab.align.dpo import DPOConfig, dpo
    from llmlab.align.pairs import PreferenceData
    from llmlab.train import TrainConfig
    from llmlab.train.supervised import SFTPeft

    cfg, s = run.cfg, SIZES[run.cfg.size]
    base = cfg.base is not None
    steps = _ft_scale(run, BASE_STEPS["dpo"] if base else s.dpo_steps)
    dpo_cfg = DPOConfig(
        out_dir=str(run.dir / "dpo"), seed=cfg.seed, model=str(run.dir / "sft" / "final"), loss="dpo", beta=0.1,
        data=PreferenceData(sources=[str(run.dir / "data" / "pairs_train.jsonl")],
                            max_pairs=steps * BASE_STEPS["batch"] * 2 if base else s.dpo_pairs, val_fraction=0.1,
                            max_len=BASE_STEPS["max_len"] if base else s.sft_max_len,
                            batch_size=BASE_STEPS["batch"] if base else 8),
        peft=SFTPeft(method="lora", r=8, alpha=16),
        train=TrainConfig(max_steps=steps, lr=5e-4 if base else 2e-3, warmup_steps=max(1, steps // 10),
                          weight_decay=0.0, device=cfg.device, threads=cfg.threads, log_every=max(1, steps // 10),
                          eval_every=steps, eval_at_start=True, checkpoint_every=steps, keep_last=1,
                          progress=cfg.progress))
    result = dpo(dpo_cfg)
    info = {**_train_info(result.train, run.dir / "dpo"), "peft": "lora r=8"}
    for when in ("before", "after"):
        rewards = result.eval[when].get("rewards", {})
        info[f"reward_accuracy_{when}"] = rewards.get("accuracy")
    return info


# ------------------------------------------------------------------------------------------- evaluation
def _models(run: Run) -> list[tuple[str, str | None]]:
    """(label, checkpoint) in lifecycle order; None = the untrained model, built as pretraining built it."""
    if run.cfg.base is None:
        return [("untrained", None), ("pretrained", str(run.dir / "pretrain" / "final")),
                ("SFT", str(run.dir / "sft" / "final")), ("DPO (LoRA)", str(run.dir / "dpo" / "final"))]
    return [("base", run.cfg.base), ("SFT (LoRA)", str(run.dir / "sft" / "final")),
            ("DPO (LoRA)", str(run.dir / "dpo" / "final"))]


def _evaluate_stage(run: Run, device) -> dict:
    from llmlab.api import load
    from llmlab.model import Transformer
    from llmlab.train.state import seed_everything

    from llmlab.progress import Bar

    rows, samples = [], []
    models = _models(run)
    bar = Bar(len(models), "evaluating every model", run.cfg.progress)
    for label, path in models:
        run.console.print(f"evaluating {label}")
        if path is None:
            model, tok = load(str(run.dir / "pretrain" / "final"), device=device)
            seed_everything(run.cfg.seed)  # pretraining seeds, then builds: the same initial weights
            model = Transformer(model.cfg).to(device)
        else:
            model, tok = load(path, device=device)
        model = model.float().eval()
        rows.append({"model": label, **evaluate_model(run, model, tok)})
        last = label == models[-1][0]
        if label in ("pretrained", "base") or last:
            samples += _samples(model, tok, label, chat=last or label == "base")
        del model
        bar.update()
    bar.close()
    return {"rows": rows, "samples": samples}


@torch.no_grad()
def evaluate_model(run: Run, model, tok) -> dict:
    """Bits per byte on held-out prose (per language), loss per reply token on held-out chats, preference
    accuracy (mean log-prob of the true reply above a reply to another question) and, with ../shared/data,
    multiple-choice accuracy as lm-eval scores it."""
    from llmlab.align.logprobs import sequence_logprobs
    from llmlab.align.pairs import pad_id_of
    from llmlab.data.preference import encode_pairs, load_preferences
    from llmlab.eval.perplexity import perplexity

    data, out = run.dir / "data", {}
    max_len = min(model.cfg.max_seq_len, 512)
    for lang in ("en", "zh"):
        path = data / f"prose_val_{lang}.txt"
        if path.is_file():
            r = perplexity(model, tok, path.read_text(encoding="utf-8"), max_length=max_len, progress=False)
            out[f"bpb_{lang}"] = round(r.bits_per_byte, 4)
    pairs = encode_pairs(load_preferences(data / "pairs_val.jsonl"), tok, max_len=min(max_len, 256))
    prompts = [p["prompt_ids"] for p in pairs]
    chosen = sequence_logprobs(model, prompts, [p["chosen_ids"] for p in pairs], pad_id=pad_id_of(tok), batch_size=16)
    rejected = sequence_logprobs(model, prompts, [p["rejected_ids"] for p in pairs], pad_id=pad_id_of(tok),
                                 batch_size=16)
    out["chat_loss"] = round(float(-chosen.sum.sum() / chosen.n_tokens.sum()), 4)
    out["pref_accuracy"] = round(float((chosen.mean > rejected.mean).float().mean()), 4)
    out["pref_margin"] = round(float((chosen.mean - rejected.mean).mean()), 4)
    out.update(_multiple_choice(run, model, tok))
    return out


def _multiple_choice(run: Run, model, tok) -> dict:
    from llmlab.data.sources import MissingDataError
    from llmlab.eval.multiple_choice import evaluate_multiple_choice

    limit = SIZES["micro" if run.cfg.base else run.cfg.size].mc_limit
    try:
        r = evaluate_multiple_choice(model, tok, MC_TASK, limit=limit, progress=False,
                                     max_length=model.cfg.max_seq_len)
    except MissingDataError:
        return {}
    return {f"{MC_TASK}_acc": round(r.acc, 4), f"{MC_TASK}_acc_norm": round(r.acc_norm, 4)}


def _samples(model, tok, label: str, *, chat: bool) -> list[dict]:
    from llmlab.infer import LLM, SamplingParams

    llm = LLM(model, tok, max_num_seqs=8)
    params = SamplingParams(max_tokens=40, temperature=0)
    if chat and tok.chat_template:
        outs = llm.chat([[{"role": "user", "content": q}] for q in SAMPLE_CHATS], params)
        return [{"model": label, "prompt": q, "reply": o.text.strip()} for q, o in zip(SAMPLE_CHATS, outs)]
    outs = llm.generate(SAMPLE_PROSE, params)
    return [{"model": label, "prompt": q, "reply": o.text} for q, o in zip(SAMPLE_PROSE, outs)]


# ------------------------------------------------------------------------------------------- the report
def environment(device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = str(device)
    if dev.startswith("cuda"):
        dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": dev, "commit": commit}


def _model_card(run: Run) -> dict:
    from llmlab.api import load
    from llmlab.model.cost import kv_cache_bytes_per_token

    model, _ = load(str(run.dir / "dpo" / "final"), device="cpu")
    c = model.cfg
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "layers": c.n_layers, "dim": c.dim, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
            "vocab": c.vocab_size, "context": c.max_seq_len, "fp32_mb": round(4 * n / 2**20, 1),
            "bf16_mb": round(2 * n / 2**20, 1), "kv_bytes_per_token_bf16": kv_cache_bytes_per_token(c, 2)}


def plot_run(run: Run) -> Path | None:
    """loss.png: one panel per training stage, training and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmlab.train.metrics import read_metrics

    stages = [s for s in ("pretrain", "sft", "dpo") if (run.dir / s / "metrics.jsonl").is_file()]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), dpi=110, squeeze=False)
    for ax, stage in zip(axes[0], stages):
        path = run.dir / stage / "metrics.jsonl"
        train, val = read_metrics(path, "train"), read_metrics(path, "val")
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="train")
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", lw=1.5, label="validation")
        ax.set_title({"pretrain": "pretraining", "sft": "SFT", "dpo": "DPO"}[stage])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (nats/token; DPO: its loss)")
    axes[0][0].legend()
    fig.tight_layout()
    out = run.dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _write_report(run: Run) -> Path:
    from llmlab.eval.report import write_report
    from llmlab.train.config import resolve_device

    plot = plot_run(run)
    report = {
        "name": run.cfg.name, "created": run.plan["created"], "command": run.plan.get("command", ""),
        "config": asdict(run.cfg), "plan": run.plan,
        "environment": environment(resolve_device(run.cfg.device, run.cfg.threads)),
        "model": _model_card(run), "tokenizer": run.stages.get("tokenizer"),
        "stages": {k: {"seconds": v["seconds"]} if k == "evaluate" else v for k, v in run.stages.items()},
        "eval": run.stages["evaluate"]["rows"], "samples": run.stages["evaluate"]["samples"],
        "images": {"loss": plot.name} if plot else {},
        "final_model": str(run.dir / "dpo" / "final"),
    }
    run.write("report.json", report)
    return write_report(run.dir)


__all__ = ["SIZES", "SpeedrunConfig", "check_resources", "estimate_needs", "evaluate_model", "seconds_per_step",
           "speedrun"]
