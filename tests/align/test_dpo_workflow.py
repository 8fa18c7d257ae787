"""The offline preference workflow (align/dpo.py) on a nano model and a toy preference file: DPO learns the
toy preference on held-out pairs; at step 0 the policy is its own reference (loss log 2); the cached reference
and the adapter-disabled reference give the same training; every loss of the family trains; bad settings are
clear errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from align_helpers import make_base, toy_pairs, write_pairs  # noqa: E402

from llmlab.align.dpo import LOSSES, DPOConfig, dpo  # noqa: E402
from llmlab.train import load_recipe  # noqa: E402
from llmlab.train.metrics import read_metrics  # noqa: E402

FAST = ["data.max_len=48", "data.batch_size=16", "data.val_fraction=0.2", "train.max_steps=30",
        "train.eval_every=15", "train.lr=3e-3", "train.warmup_steps=2", "train.progress=false",
        "train.plot=false", "train.threads=1", "train.checkpoint_every=100", "train.precision=fp32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return make_base(root), write_pairs(root / "pairs.jsonl", toy_pairs(160))


def config(setup, out, *extra) -> DPOConfig:
    base, pairs = setup
    return load_recipe(DPOConfig, None, [f"model={base}", f"out_dir={out}", f"data.sources=[{pairs}]", *FAST,
                                         *extra])


def test_dpo_with_lora_learns_held_out_preferences(setup, tmp_path):
    result = dpo(config(setup, tmp_path / "run", "peft.method=lora", "peft.r=8", "beta=0.5"))
    vals = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert vals[0]["step"] == 0 and vals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert vals[0]["val_rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert vals[-1]["val_rewards/accuracies"] > 0.9 and vals[-1]["val_rewards/margins"] > 0.5
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report == result.eval
    assert report["after"]["rewards"]["accuracy"] > 0.9
    # before training the policy is its own (cached) reference: every implicit reward is exactly 0, and the
    # policy's log-probs are read from the cache, so they must equal a fresh pass over the untrained model
    n = report["before"]["rewards"]["n"]
    assert report["before"]["rewards"] == {"accuracy": 0.5, "margin": 0.0, "n": n, "ties": n}
    fresh = _untrained_logps_accuracy(setup)
    assert report["before"]["logps"]["accuracy"] == fresh.accuracy
    assert report["before"]["logps"]["margin"] == pytest.approx(fresh.margin, abs=1e-5)
    assert report["after"]["logps"]["accuracy"] > report["before"]["logps"]["accuracy"]
    assert report["after"]["logps"]["margin"] > report["before"]["logps"]["margin"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "reference.json").is_file()


def _untrained_logps_accuracy(setup):
    """The held-out pairs' preference by mean completion log-prob under the base model, computed directly."""
    import torch

    from llmlab.align.dpo import completion_logps
    from llmlab.align.pairs import collate, pad_id_of, prepare
    from llmlab.api import load
    from llmlab.data.preference import preference_accuracy

    cfg = config(setup, "unused")
    model, tok = load(cfg.model)
    _, val = prepare(cfg.data, tok, cfg.seed)
    with torch.no_grad():
        sums, n = completion_logps(model.eval(), collate(val, range(len(val)), pad_id_of(tok)))
    avg = sums / n
    return preference_accuracy(avg[:len(val)], avg[len(val):])


def test_cached_and_adapter_disabled_references_train_alike(setup, tmp_path):
    extra = ["peft.method=lora", "peft.r=4", "train.max_steps=4", "train.eval_every=4", "train.log_every=1"]
    dpo(config(setup, tmp_path / "cache", *extra))
    dpo(config(setup, tmp_path / "off", *extra, "reference=adapter_disabled"))
    a = [r["loss"] for r in read_metrics(tmp_path / "cache" / "metrics.jsonl", "train")]
    b = [r["loss"] for r in read_metrics(tmp_path / "off" / "metrics.jsonl", "train")]
    assert len(a) == 4 and a[0] == pytest.approx(math.log(2), abs=1e-6)
    assert a == pytest.approx(b, abs=1e-5)
    assert not (tmp_path / "off" / "reference.json").exists()


@pytest.mark.parametrize("loss", [x for x in LOSSES if x != "dpo"])
def test_every_loss_trains(setup, tmp_path, loss):
    extra = {"simpo": ["beta=2.0"], "kto": []}.get(loss, [])
    dpo(config(setup, tmp_path / loss, f"loss={loss}", "train.max_steps=12", "train.eval_every=12", *extra))
    vals = read_metrics(tmp_path / loss / "metrics.jsonl", "val")
    assert all(math.isfinite(v["val_loss"]) for v in vals)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"], loss
    if loss != "kto":
        assert vals[-1]["val_rewards/margins"] > vals[0]["val_rewards/margins"], loss


def test_resume_reads_the_reference_cache(setup, tmp_path):
    out = tmp_path / "run"
    dpo(config(setup, out, "train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=2"))
    cache = json.loads((out / "reference.json").read_text())
    (out / "reference.json").write_text(json.dumps({**cache, "ref_logps": [[0.0, 0.0]] * len(cache["ref_logps"])}))
    result = dpo(config(setup, out, "train.max_steps=6", "train.eval_every=0", "train.checkpoint_every=2"))
    assert result.train.resumed_from == 4  # and it used the (doctored) cache instead of recomputing it
    assert json.loads((out / "reference.json").read_text())["ref_logps"][0] == [0.0, 0.0]


def test_bad_settings_are_clear_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="unknown loss 'dop'"):
        load_recipe(DPOConfig, None, ["loss=dop"])
    with pytest.raises(ValueError, match="reference=adapter_disabled needs a LoRA"):
        load_recipe(DPOConfig, None, ["reference=adapter_disabled"])
    with pytest.raises(ValueError, match="beta must be > 0"):
        load_recipe(DPOConfig, None, ["beta=0"])
