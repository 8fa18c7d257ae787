"""`llmlab speedrun`: tokenizer → pretraining → SFT → DPO with LoRA → evaluation → report card, in about 15
minutes on 2 CPU cores (what `make demo` runs).

    llmlab speedrun                                   # micro model from scratch, runs/speedrun/report.{md,html}
    llmlab speedrun --size nano --minutes 1           # a one-minute smoke run
    llmlab speedrun --size small --minutes 60         # longer pretraining (a GPU trains far more in the same time)
    llmlab speedrun --base smollm2-135m-instruct      # fine-tune and evaluate the real model instead

Running the same command again resumes: finished stages are skipped, the interrupted one continues from its
newest checkpoint. The workflow is llmlab.speedrun.speedrun(SpeedrunConfig).
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from llmlab.speedrun import SpeedrunConfig, speedrun

    name = args.name or (f"speedrun-{args.base.replace('/', '_').strip('_.')}" if args.base else f"speedrun-{args.size}")
    cfg = SpeedrunConfig(name=name, runs_dir=args.runs_dir, size=args.size, minutes=args.minutes, base=args.base,
                         device=args.device, threads=args.threads, seed=args.seed, progress=not args.quiet)
    console = Console(stderr=True)
    report = speedrun(cfg, console)
    final = report.parent / "dpo" / "final"
    print(f"report: {report} and {report.with_suffix('.html')}")
    print(f"chat with the result:  llmlab chat {final}")
    print(f"serve it (OpenAI API and a web chat at http://127.0.0.1:8000):  llmlab serve {final} --port 8000")
    return 0


def register(groups) -> None:
    from llmlab.speedrun import SIZES

    p = groups.add_parser("speedrun", help="the whole lifecycle in ~15 minutes, ending in a report card",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="micro", choices=list(SIZES), help="model size trained from scratch (default micro)")
    p.add_argument("--minutes", type=float, default=15.0, help="time budget of the whole run (default 15)")
    p.add_argument("--base", metavar="MODEL", help="fine-tune this model instead (named asset, .gguf, HF or llmlab dir)")
    p.add_argument("--name", help="run folder name under --runs-dir (default speedrun-<size> or speedrun-<base>)")
    p.add_argument("--runs-dir", default="runs", help="where runs live (default runs/); the leaderboard compares them")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)

