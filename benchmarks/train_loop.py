"""Overhead of the training loop: tokens/s of the full pretrain loop (PackedLoader over memory-mapped token
shards, the LR schedule, gradient clipping, the NaN guard, a JSONL record every step, atomic checkpoints of
model + AdamW + RNG + loader state) as a fraction of bare forward/backward/AdamW steps on one fixed batch,
same model shape, same process.

The loop is pretrain() itself (llmlab.train.pretraining) with evaluation off; its one-time set-up (tokenizer
training, tokenization) is not timed. Its throughput is taken after the first `--warmup` steps, until the end
of fit() (the final checkpoint included). The bare loop is timed in two rounds, before and after, and
averaged, so load changes on a shared machine hit both sides alike.

    python benchmarks/train_loop.py [--preset micro] [--steps 60] [--checkpoint-every 50] [--seq 256] [--batch 8]

Prints one JSON object; "loop_fraction" is the ratio (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlab.model import ModelConfig, Transformer
from llmlab.train import PretrainConfig, build_optimizer, load_recipe, pretrain
from llmlab.train.metrics import read_metrics

WORDS = ("time people year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact sea ship whale captain 政府 人民 经济 发展 国家").split()


def corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """Synthetic documents (the loop's cost does not depend on what the text says)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 800)))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def bare_tokens_per_s(cfg: ModelConfig, batch: int, seq: int, steps: int, warmup: int, lr: float) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opt = build_optimizer(model, lr=lr)  # the AdamW pretrain() steps with
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x, labels=x, return_logits=False).loss.backward()
        opt.step()
    return batch * seq * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="micro")
    p.add_argument("--steps", type=int, default=60, help="timed steps of each loop")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer size (the model keeps its preset's vocab)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens_needed = (args.warmup + args.steps) * args.batch * args.seq
        docs = corpus(tmp / "docs.jsonl", n_docs=max(50, tokens_needed // 400 + 50))
        total = args.warmup + args.steps
        overrides = [f"out_dir={tmp / 'run'}", f"preset={args.preset}", f"data.sources=[{docs}]",
                     "data.val_fraction=0", f"data.seq_len={args.seq}", f"data.batch_size={args.batch}",
                     f"tokenizer.vocab_size={args.vocab}", "tokenizer.train_chars=300000",
                     f"model.max_seq_len={max(args.seq, 16)}", f"train.max_steps={total}", "train.warmup_steps=2",
                     "train.lr=1e-3", "train.precision=fp32", f"train.log_every={args.log_every}",
                     "train.eval_every=0", f"train.checkpoint_every={args.checkpoint_every}", "train.keep_last=2",
                     "train.sample_prompts=[]", "train.progress=false", "train.plot=false"]
        # the tokenizer first, so the model shape (its vocab follows the tokenizer) is known to the bare loop
        from llmlab import tokenizer as tokenizers
        from llmlab.train.pretraining import SPECIAL_TOKENS

        texts = [json.loads(line)["text"] for line in open(docs, encoding="utf-8")][:200]
        tok = tokenizers.train(texts, "bpe", vocab_size=args.vocab, special_tokens=SPECIAL_TOKENS)
        tok.eos_token = SPECIAL_TOKENS[0]
        (tmp / "tok").mkdir()
        tok.save(tmp / "tok")
        overrides.append(f"tokenizer.path={tmp / 'tok'}")
        cfg = load_recipe(PretrainConfig, None, overrides)
        # the preset's vocabulary (the head's cost is part of the model's), however few tokens the toy text needs
        vocab = max(ModelConfig.preset(args.preset).vocab_size, -(-len(tok) // 64) * 64)
        cfg.model["vocab_size"] = vocab
        model_cfg = ModelConfig.preset(args.preset, max_seq_len=max(args.seq, 16), vocab_size=vocab)
        rounds = max(3, args.steps // 3)
        bare = [bare_tokens_per_s(model_cfg, args.batch, args.seq, rounds, args.warmup, 1e-3)]
        result = pretrain(cfg)
        records = read_metrics(Path(result.metrics_path), "train")
        assert json.loads((Path(cfg.out_dir) / "final" / "config.json").read_text()) == model_cfg.to_dict()
        bare.append(bare_tokens_per_s(model_cfg, args.batch, args.seq, rounds, args.warmup, 1e-3))
    at_warmup = next(r for r in records if r["step"] >= args.warmup)
    loop_tokens = result.tokens - at_warmup["tokens"]
    loop_seconds = result.train_seconds - at_warmup["elapsed_s"]
    loop_tps = loop_tokens / loop_seconds
    bare_tps = sum(bare) / len(bare)
    checkpoints = total // args.checkpoint_every + (total % args.checkpoint_every != 0)
    out = {
        "benchmark": "train_loop",
        "preset": args.preset, "params": model_cfg.num_parameters(),
        "shape": {"seq": args.seq, "batch": args.batch, "vocab": model_cfg.vocab_size},
        "threads": torch.get_num_threads(),
        "steps_timed": total - at_warmup["step"], "checkpoints_written": checkpoints,
        "log_every": args.log_every,
        "loop_tokens_per_s": round(loop_tps, 1),
        "bare_tokens_per_s": round(bare_tps, 1), "bare_rounds_tokens_per_s": [round(b, 1) for b in bare],
        "loop_fraction": round(loop_tps / bare_tps, 4),
    }
    print(json.dumps(out, indent=2))
    print(f"loop/bare = {out['loop_fraction']:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
