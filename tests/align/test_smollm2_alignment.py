"""Measured improvement on the real model (slow; issue 9's acceptance; the full-size numbers are in
docs/results/alignment.md): a reward model on SmolLM2-135M-Instruct's body trained on pairs built from the
English chat data beats chance on held-out pairs and is evaluated on BIG-bench hhh_alignment (never trained
on); DPO with LoRA raises held-out preference accuracy and the chosen-rejected margin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmlab.align.dpo import DPOConfig, dpo
from llmlab.align.rm import RMConfig, train_reward_model
from llmlab.train import load_recipe

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.max_pairs=96", "data.val_fraction=0.25", "data.max_len=64", "data.batch_size=4",
         "train.max_steps=16", "train.eval_every=16", "train.log_every=4", "train.progress=false",
         "train.plot=false", "train.threads=2", "train.precision=fp32"]


@pytest.fixture(scope="module", autouse=True)
def smollm2():
    from llmlab.data import sources
    from llmlab.io.assets import AssetNotFoundError, asset_path

    try:
        asset_path("smollm2-135m-instruct")
        sources.chat_pairs("english")
    except (AssetNotFoundError, sources.MissingDataError) as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_reward_model_beats_chance_and_is_evaluated_on_hhh(tmp_path):
    cfg = load_recipe(RMConfig, ROOT / "recipes" / "rm" / "smollm2.yaml", [f"out_dir={tmp_path}", *SMALL])
    result = train_reward_model(cfg)
    val = result.eval["val"]
    assert val["n"] == 24 and val["accuracy"] >= 0.7, val
    hhh = result.eval["hhh"]
    if "skipped" not in hhh:  # ../shared/data present: all 221 pairs scored, per subset too
        assert hhh["all"]["n"] == 221 and 0 <= hhh["all"]["accuracy"] <= 1
        assert {"harmless", "helpful", "honest", "other"} <= set(hhh)
    assert json.loads((tmp_path / "eval.json").read_text()) == result.eval


@pytest.mark.slow
def test_dpo_with_lora_raises_held_out_accuracy_and_margin(tmp_path):
    cfg = load_recipe(DPOConfig, ROOT / "recipes" / "dpo" / "smollm2_lora.yaml", [f"out_dir={tmp_path}", *SMALL])
    result = dpo(cfg)
    before, after = result.eval["before"], result.eval["after"]
    assert before["rewards"]["accuracy"] == 0.5 and before["rewards"]["margin"] == pytest.approx(0, abs=1e-6)
    assert after["rewards"]["accuracy"] > 0.6 and after["rewards"]["margin"] > 0, after
    assert after["logps"]["accuracy"] >= before["logps"]["accuracy"]
    assert after["logps"]["margin"] > before["logps"]["margin"]
