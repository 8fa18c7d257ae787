"""The PPO workflow (align/ppo_train.py on align/online.py): a few steps on the nano model write the promised
metrics and files (shared value head or separate critic, fixed or adaptive KL); a reward model scores through
the policy's token ids when the tokenizers match and through text otherwise; a killed run resumes exactly;
NaN losses and a KL above kl_stop stop the run with the last good checkpoint intact; bad settings are clear
errors. The slow test is the acceptance: PPO raises the mean reward while the KL to the reference stays bounded."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from align_helpers import COLOURS, NUMBERS, completion_sft_step, make_base, toy_pairs  # noqa: E402

from llmlab.align import ppo_train  # noqa: E402
from llmlab.align.ppo_train import PPOConfig, ppo  # noqa: E402
from llmlab.api import load  # noqa: E402
from llmlab.train import TrainingDiverged, list_checkpoints, load_recipe  # noqa: E402
from llmlab.train.metrics import read_metrics  # noqa: E402

FAST = ["train.prompts_per_step=6", "rollout.max_tokens=8", "train.lr=1e-3", "train.threads=1", "train.progress=false",
        "train.plot=false", "data.n_eval=4", "train.steps=4", "train.checkpoint_every=2", "ppo_epochs=2",
        "reward.functions=[lexicon_sentiment, length_penalty]", "reward.max_chars=12", "reward.soft_chars=10"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in toy_pairs(60)))
    return make_base(root), prompts


def config(setup, out, *extra) -> PPOConfig:
    base, prompts = setup
    return load_recipe(PPOConfig, None, [f"model={base}", f"out_dir={out}", f"data.source={prompts}", *FAST, *extra])


KEYS = ("reward", "reward_std", "rewards/lexicon_sentiment/mean", "rewards/length_penalty/mean", "kl", "kl_seq",
        "kl_coef", "non_score_reward", "entropy", "policy/clip_frac", "policy/approx_kl", "value/clip_frac",
        "loss/policy", "loss/value", "value/explained_variance", "loss", "grad_norm", "lr", "tokens_per_s",
        "step_time_s", "completions/mean_length")


@pytest.mark.parametrize("extra", [["peft.method=lora", "peft.r=4", "train.plot=true"],
                                   ["value_model=separate", "adaptive_kl=true", "kl_target=0.01", "kl_horizon=10"]],
                         ids=["shared-lora", "separate-adaptive"])
def test_ppo_writes_metrics_and_models(setup, tmp_path, extra):
    out = tmp_path / "run"
    result = ppo(config(setup, out, *extra))
    train = read_metrics(out / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in KEYS:
        assert all(math.isfinite(r[key]) for r in train), key
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6) and train[-1]["kl"] > 0
    assert all(0 <= r["policy/clip_frac"] <= 1 for r in train) and train[0]["updates"] == 2
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [0, 4] and result.eval["after"]["step"] == 4
    assert set(load_file(str(out / "value_head.safetensors"))) == {"proj.weight", "proj.bias"}
    assert load(out / "final")[1] is not None
    if "value_model=separate" in extra:
        assert (out / "critic" / "config.json").is_file()
        # Ziegler et al.'s controller: β ← β·(1 + clip(KL/target - 1, ±0.2)·n/horizon), n = 6 rollouts a step
        assert train[0]["kl_coef"] == 0.05
        for a, b in zip(train, train[1:]):
            error = min(max(a["kl_seq"] / 0.01 - 1, -0.2), 0.2)
            assert b["kl_coef"] == pytest.approx(a["kl_coef"] * (1 + error * 6 / 10), rel=1e-6)
        assert len({r["kl_coef"] for r in train}) == 4
    else:
        assert (out / "adapter" / "adapter_config.json").is_file() and (out / "rewards.png").is_file()
        assert {r["kl_coef"] for r in train} == {0.05}


def test_reward_model_scores_token_ids_or_text(setup, tmp_path):
    from llmlab.align.reward import RewardModel

    base, _ = setup
    policy, tok = load(base)
    rm_dir = RewardModel.from_policy(policy).save(tmp_path / "rm", tokenizer=tok)
    for mode in ("auto", "text"):
        out = tmp_path / mode
        ppo(config(setup, out, "reward.functions=[model]", f"reward.model={rm_dir}", f"reward.model_input={mode}",
                   "train.steps=2"))
        train = read_metrics(out / "metrics.jsonl", "train")
        assert all(math.isfinite(r["rewards/model/mean"]) and r["reward_std"] > 0 for r in train)
    from llmlab.tokenizer import train as train_tokenizer

    other = train_tokenizer(["a different text entirely " * 20], kind="bpe", vocab_size=300)
    rm_other = RewardModel.from_policy(policy).save(tmp_path / "rm_other", tokenizer=other)
    with pytest.raises(ValueError, match="reward model's tokenizer differs from the policy's"):
        ppo(config(setup, tmp_path / "ids", "reward.functions=[model]", f"reward.model={rm_other}",
                   "reward.model_input=ids"))


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_killed_run_resumes_exactly(setup, tmp_path, monkeypatch, value_model):
    extra = [f"value_model={value_model}", "minibatches=2", "adaptive_kl=true", "kl_target=0.01", "kl_horizon=10"]
    full = ppo(config(setup, tmp_path / "full", *extra))
    original = ppo_train._PPOStep.__call__

    def killed(self, step):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(ppo_train._PPOStep, "__call__", killed)
        with pytest.raises(KeyboardInterrupt):
            ppo(config(setup, tmp_path / "killed", *extra))
    assert ppo(config(setup, tmp_path / "killed", *extra)).resumed_from == 2 and full.resumed_from is None
    a = read_metrics(tmp_path / "full" / "metrics.jsonl", "train")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl", "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("reward", "loss", "kl", "kl_coef", "loss/value", "value/explained_variance", "entropy"):
            assert ra[key] == rb[key], (ra["step"], key)
    va, vb = load_file(str(tmp_path / "full" / "value_head.safetensors")), \
        load_file(str(tmp_path / "killed" / "value_head.safetensors"))
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_nan_loss_stops_with_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    original = ppo_train.ppo_policy_loss

    def loss(*args, **kwargs):
        calls["n"] += 1
        value, stats = original(*args, **kwargs)
        return (value * math.nan if calls["n"] == 5 else value), stats  # 2 calls a step: step 3's first

    monkeypatch.setattr(ppo_train, "ppo_policy_loss", loss)
    with pytest.raises(TrainingDiverged, match=r"PPO diverged at step 3: loss = nan.*last good checkpoint .*step 2"):
        ppo(config(setup, out, "train.steps=5"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert read_metrics(out / "metrics.jsonl", "diverged")[0]["step"] == 3


def test_kl_above_kl_stop_stops_the_run(setup, tmp_path):
    out = tmp_path / "run"
    ppo(config(setup, out, "train.steps=2"))
    with pytest.raises(TrainingDiverged, match=r"step 3: the mean KL to the reference is .* above train.kl_stop"):
        ppo(config(setup, out, "train.steps=6", "train.kl_stop=1e-6"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="unknown reward function 'lexicon' \\(did you mean 'lexicon_sentiment'"):
        load_recipe(PPOConfig, None, ["reward.functions=[lexicon]"])
    with pytest.raises(ValueError, match="reward function 'model' needs reward.model=PATH"):
        load_recipe(PPOConfig, None, ["reward.functions=[model]"])
    with pytest.raises(ValueError, match="value_model='critic': use shared"):
        load_recipe(PPOConfig, None, ["value_model=critic"])
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        load_recipe(PPOConfig, None, ["kl_estimator=k4"])
    with pytest.raises(ValueError, match="minibatches=20 is more than the 16 rollouts"):
        load_recipe(PPOConfig, None, ["minibatches=20"])
    with pytest.raises(ValueError, match="train.kl_stop must be >= 0"):
        load_recipe(PPOConfig, None, ["train.kl_stop=-1"])


def test_recipes_load_and_the_nano_one_runs(setup, tmp_path):
    root = Path(__file__).parents[2] / "recipes" / "ppo"
    smol = load_recipe(PPOConfig, root / "smollm2_sentiment.yaml")
    assert smol.model == "smollm2-135m-instruct" and smol.peft.method == "lora" and smol.adaptive_kl
    base, _ = setup
    result = ppo(load_recipe(PPOConfig, root / "nano.yaml", [
        f"model={base}", f"out_dir={tmp_path / 'run'}", "train.steps=2", "train.eval_every=0",
        "train.progress=false", "train.plot=false"]))
    assert result.steps == 2 and "reward" in result.eval["after"]


# ------------------------------------------------------------------------------------------------ acceptance
def sft_toy_replies(base: Path, root: Path, steps: int = 150, seed: int = 0) -> Path:
    """The nano base taught to answer the toy prompts with "It is <colour>." or "It is <number>." (half each):
    a policy whose samples the colour-vs-number reward can tell apart, starting near reward 0."""
    from llmlab.align.rollout import Rollouts
    from llmlab.io import save_checkpoint

    model, tok = load(base)
    roll = Rollouts(model, tok, max_tokens=8)
    end = tok.token_to_id("<|im_end|>")
    rows = [(roll.encode_prompt(r["prompt"]), tok.encode(r[side]) + [end]) for r in toy_pairs(200, seed=seed)
            for side in ("chosen", "rejected")]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(steps):
        completion_sft_step(model, opt, rng.sample(rows, 32))
    return save_checkpoint(model.eval(), root / "sft", tokenizer=tok)


@pytest.mark.slow
def test_ppo_raises_reward_with_bounded_kl(setup, tmp_path):
    """Measured (2 shared CPU cores, one thread): the SFT policy names a colour about half the time (reward
    +1/3 for "It is red.", -1/3 for "It is one."): rollout reward 0.06 over the first 5 steps; 40 PPO steps of
    32 rollouts (β = 0.05, lr 3e-4) bring it to 0.32 (the ceiling is 0.33) and the held-out reward from 0.02 to
    0.33, with the KL to the reference at most 0.29 nats a token, in 34 s. Seeds 1-3: +0.21 to +0.26."""
    base, prompts = setup
    sft = sft_toy_replies(base, tmp_path)
    cfg = load_recipe(PPOConfig, None, [
        f"model={sft}", f"out_dir={tmp_path / 'run'}", f"data.source={prompts}", "data.n_eval=16",
        "reward.functions=[lexicon_sentiment]", f"reward.lexicon_positive={json.dumps(COLOURS)}",
        f"reward.lexicon_negative={json.dumps(NUMBERS)}", "rollout.max_tokens=8", "rollout.eval_temperature=1.0",
        "train.steps=40", "train.prompts_per_step=32", "train.lr=3e-4", "kl_coef=0.05", "train.threads=1",
        "train.progress=false", "train.eval_every=20", "train.checkpoint_every=1000"])
    t = time.perf_counter()
    result = ppo(cfg)
    seconds = time.perf_counter() - t
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    first = sum(r["reward"] for r in train[:5]) / 5
    last = sum(r["reward"] for r in train[-5:]) / 5
    kl_max = max(r["kl"] for r in train)
    kl_reply = sum(r["kl_seq"] for r in train[-5:]) / 5
    print(f"\nPPO rollout reward {first:.3f} -> {last:.3f}; held-out reward {result.eval['before']['reward']:.3f} -> "
          f"{result.eval['after']['reward']:.3f}; max KL {kl_max:.3f} nats/token, {kl_reply:.3f} per reply at the end; "
          f"{seconds:.0f} s ({sum(r['step_time_s'] for r in train) / len(train):.2f} s/step)")
    assert last > first + 0.15
    assert result.eval["after"]["reward"] > result.eval["before"]["reward"] + 0.1
    # bounded: under β = 0.05 the best policy moves all mass to colours and leaves the rest as it was, a KL of
    # log 2 ≈ 0.69 nats per reply; seeds 0-3 end at 0.8-1.4 per reply and peak at 0.29-0.45 a token
    assert kl_max < 0.75 and kl_reply < 2.0
