"""`llmlab rm | dpo | ppo | grpo`: the alignment workflows from a YAML recipe plus key=value overrides.

    llmlab rm --recipe recipes/rm/smollm2.yaml train.max_steps=50        # reward model (Bradley-Terry)
    llmlab dpo --recipe recipes/dpo/smollm2_lora.yaml loss=ipo            # DPO family (dpo ipo cdpo ... kto)
    llmlab grpo --recipe recipes/grpo/smollm2_arithmetic.yaml             # GRPO with verifiable rewards
    llmlab ppo --recipe recipes/ppo/smollm2_sentiment.yaml                # PPO against a reward function/model
    llmlab dpo --recipe recipes/dpo/nano.yaml --print-config              # the resolved config, then exit
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from functools import partial

import yaml

# name -> (module, config class, workflow function, help)
WORKFLOWS = {
    "rm": ("llmlab.align.rm", "RMConfig", "train_reward_model", "train a reward model on preference pairs"),
    "dpo": ("llmlab.align.dpo", "DPOConfig", "dpo", "offline preference optimization: DPO, IPO, cDPO, SimPO, "
            "ORPO, KTO"),
    "ppo": ("llmlab.align.ppo_train", "PPOConfig", "ppo", "PPO for RLHF against a reward model or function"),
    "grpo": ("llmlab.align.grpo_train", "GRPOConfig", "grpo", "GRPO with verifiable rewards"),
}


def _run(name: str, args: argparse.Namespace) -> int:
    from ..train import TrainingDiverged, load_recipe
    from ..train.recipe import to_dict

    module, cls_name, fn_name, _ = WORKFLOWS[name]
    mod = importlib.import_module(module)
    overrides = list(args.overrides)
    if getattr(args, "peft", None):
        overrides.insert(0, f"peft.method={args.peft}")
    cfg = load_recipe(getattr(mod, cls_name), args.recipe, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    try:
        result = getattr(mod, fn_name)(cfg)
    except TrainingDiverged as e:
        print(f"llmlab {name}: {e}", file=sys.stderr)
        return 3
    report = getattr(result, "eval", None)
    if report:
        print(f"{name} evaluation: {json.dumps(report)}")
    print(f"out_dir: {cfg.out_dir}   final: {getattr(result, 'final', cfg.out_dir + '/final')}")
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    for name, (*_, help_text) in WORKFLOWS.items():
        p = groups.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0])
        p.add_argument("--recipe", help=f"a YAML recipe (recipes/{name}/*.yaml); without one the defaults apply")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="override recipe keys, dotted for nested sections (train.lr=1e-5 beta=0.1)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--peft", metavar="METHOD", help="train a PEFT adapter: sets peft.method (lora ...)")
        p.set_defaults(run=partial(_run, name), group_parser=p)
