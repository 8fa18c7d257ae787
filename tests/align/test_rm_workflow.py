"""The reward-model workflow (align/rm.py) end to end on a nano model: trains on a toy preference file, logs
accuracy and margin at each evaluation, saves a reward model that RewardModel.load reads back with the same
scores, and reports held-out accuracy; bad data is reported with its line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from align_helpers import make_base, toy_pairs, write_pairs  # noqa: E402

from llmlab.align.pairs import PairLoader, collate, pad_id_of, prepare  # noqa: E402
from llmlab.align.reward import RewardModel  # noqa: E402
from llmlab.align.rm import RMConfig, score_pairs, train_reward_model  # noqa: E402
from llmlab.train import load_recipe  # noqa: E402
from llmlab.train.metrics import read_metrics  # noqa: E402

FAST = ["data.max_len=48", "data.batch_size=16", "data.val_fraction=0.2", "train.max_steps=30",
        "train.eval_every=15", "train.lr=3e-3", "train.warmup_steps=2", "train.progress=false",
        "train.plot=false", "train.threads=1", "train.checkpoint_every=100", "eval_hhh=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    return make_base(root), write_pairs(root / "pairs.jsonl", toy_pairs(160))


def config(setup, out, *extra) -> RMConfig:
    base, pairs = setup
    return load_recipe(RMConfig, None, [f"model={base}", f"out_dir={out}", f"data.sources=[{pairs}]", *FAST, *extra])


def test_reward_model_learns_toy_preferences_and_reloads(setup, tmp_path):
    result = train_reward_model(config(setup, tmp_path / "run"))
    vals = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert [v["step"] for v in vals] == [0, 15, 30]
    assert vals[-1]["val_accuracy"] > 0.9 and vals[-1]["val_margin"] > vals[0]["val_margin"]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report == result.eval and report["val"]["accuracy"] > 0.9 and report["val"]["n"] == 32
    rm, tok = RewardModel.load(result.final)
    _, val = prepare(config(setup, tmp_path / "x").data, tok, 0)
    chosen, rejected = score_pairs(rm, val, pad_id_of(tok))
    assert float((chosen > rejected).float().mean()) == pytest.approx(report["val"]["accuracy"])
    assert chosen.shape == (32,)


def test_batches_put_chosen_rows_first_with_completion_masks():
    examples = [{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]},
                {"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": [4]}]
    b = collate(examples, [3, 4], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [1, 2, 3, 0], [5, 6, 8, 9], [1, 4, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["index"].tolist() == [3, 4]
    loader = PairLoader(examples * 4, batch_size=3, pad_id=0, seed=1)
    it = iter(loader)
    first = [next(it)["index"].tolist() for _ in range(3)]
    state = loader.state_dict()
    after = next(it)["index"].tolist()
    again = PairLoader(examples * 4, batch_size=3, pad_id=0, seed=1)
    again.load_state_dict(state)
    assert next(iter(again))["index"].tolist() == after
    assert sorted(sum(first[:2], [])) == sorted(set(sum(first[:2], [])))  # an epoch never repeats an item


def test_bad_preference_file_names_the_line(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" +
                   json.dumps({"prompt": "p", "chosen": ""}) + "\n")
    base, _ = setup
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_reward_model(load_recipe(RMConfig, None, [f"model={base}", f"out_dir={tmp_path / 'o'}",
                                                        f"data.sources=[{bad}]", *FAST]))
    with pytest.raises(ValueError, match="center_coef must be >= 0"):
        load_recipe(RMConfig, None, ["center_coef=-1"])


def test_lora_reward_model_through_the_cli(setup, tmp_path, capsys):
    from llmlab.cli.main import main

    base, pairs = setup
    out = tmp_path / "lora"
    assert main(["rm", "--peft", "lora", f"model={base}", f"out_dir={out}", f"data.sources=[{pairs}]", *FAST,
                 "peft.r=4", "train.lr=1e-2"]) == 0
    assert "rm evaluation" in capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["val"]["accuracy"] > 0.8
    rm, _ = RewardModel.load(out / "final")  # the adapter merged into a plain reward model
    assert rm.cfg.head == "classification"
