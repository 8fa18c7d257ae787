"""The pretrain and SFT workflows end to end (nano on a tiny corpus), their CLI, and their errors; the real
SmolLM2-135M-Instruct SFT is slow-marked."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import nano_overrides

import llmlab
from llmlab.cli.main import main
from llmlab.train import PretrainConfig, SFTConfig, load_recipe, pretrain, sft
from llmlab.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def nano_cfg(corpus, out, **extra):
    return load_recipe(PretrainConfig, ROOT / "recipes" / "pretrain" / "nano.yaml", nano_overrides(corpus, out, **extra))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    torch.set_num_threads(1)
    result = pretrain(nano_cfg(tiny_corpus, out, **{"train.max_steps": 40, "train.eval_every": 10,
                                                    "train.checkpoint_every": 20, "train.keep_last": 1,
                                                    "train.eval_at_start": True, "train.plot": True,
                                                    "train.sample_prompts": "[The whale]"}))
    return out, result


def test_pretrain_nano_learns_and_writes_everything(pretrained):
    out, result = pretrained
    val = read_metrics(out / "metrics.jsonl", "val")
    assert [r["step"] for r in val] == [0, 10, 20, 30, 40]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0  # from ≈ ln(vocab) down: it learned the grammar
    # bpb = loss / (ln 2 · bytes per token): one ratio for the whole validation text, a plausible one for a
    # 300-token byte-level BPE on English
    bytes_per_token = {round(r["val_loss"] / (r["val_bpb"] * math.log(2)), 6) for r in val}
    assert len(bytes_per_token) == 1 and 1.5 < bytes_per_token.pop() < 6
    assert 0 < val[-1]["val_bpb"] < val[0]["val_bpb"]
    assert read_metrics(out / "metrics.jsonl", "sample")[0]["prompt"] == "The whale"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "result.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    assert result.steps == 40 and result.best_checkpoint is not None
    # the final model and its tokenizer load with llmlab.load and continue the training text
    model, tok = llmlab.load(out / "final")
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template is not None
    assert model.cfg.vocab_size % 64 == 0 and model.cfg.vocab_size >= len(tok)
    saved = json.loads((out / "result.json").read_text())
    assert saved["val_loss"] == pytest.approx(val[-1]["val_loss"])


def test_pretrain_rerun_resumes_and_extends(pretrained, tiny_corpus, tmp_path):
    out, _ = pretrained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    cfg = nano_cfg(tiny_corpus, copy, **{"train.max_steps": 44, "train.eval_every": 10,
                                         "train.checkpoint_every": 20, "train.keep_last": 1})
    result = pretrain(cfg)  # the tokenizer and the token shards are reused, the run continues
    assert result.resumed_from == 40 and result.steps == 44
    assert [r["step"] for r in read_metrics(copy / "metrics.jsonl", "train")][-5:] == [40, 41, 42, 43, 44]


def test_sft_nano_from_the_pretrained_checkpoint(pretrained, tmp_path):
    out, _ = pretrained
    conversations = tmp_path / "chats.jsonl"
    with open(conversations, "w") as f:
        for i in range(60):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say the number {i % 7}."},
                                             {"role": "assistant", "content": f"The number is {i % 7}."}]}) + "\n")
    cfg = load_recipe(SFTConfig, ROOT / "recipes" / "sft" / "nano.yaml", [
        f"model={out / 'final'}", f"out_dir={tmp_path / 'sft'}", f"data.sources=[{conversations}]",
        "data.max_len=64", "data.batch_size=4", "train.max_steps=30", "train.eval_every=15", "train.lr=3e-3",
        "train.progress=false", "train.plot=false", "train.peak_flops=1e11", "train.sample_prompts=[Say the number 3.]",
        "train.threads=1"])
    result = sft(cfg)
    val = read_metrics(tmp_path / "sft" / "metrics.jsonl", "val")
    assert val[0]["step"] == 0 and val[-1]["val_loss"] < 0.6 * val[0]["val_loss"]
    assert result.val_loss == val[-1]["val_loss"]
    model, tok = llmlab.load(tmp_path / "sft" / "final")
    assert tok.chat_template is not None


def test_sft_errors_name_the_recipe_key(pretrained, tmp_path):
    out, _ = pretrained
    model, tok = llmlab.load(out / "final")
    tok.chat_template = None
    llmlab.save(model, tok, tmp_path / "plain")
    base = [f"out_dir={tmp_path / 'sft'}", "train.progress=false"]
    with pytest.raises(ValueError, match="no chat template; set data.chat_template"):
        sft(load_recipe(SFTConfig, None, [f"model={tmp_path / 'plain'}", *base]))
    with pytest.raises(ValueError, match="data.max_len=512 .* above the model's max_seq_len=128"):
        sft(load_recipe(SFTConfig, None, [f"model={out / 'final'}", *base]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no conversations in"):
        sft(load_recipe(SFTConfig, None, [f"model={out / 'final'}", "data.max_len=64", f"data.sources=[{empty}]",
                                          *base]))


def test_pretrain_rejects_an_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no documents in"):
        pretrain(nano_cfg(empty, tmp_path / "run"))


def test_pretrain_rejects_too_little_data(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "a few words"}\n{"text": "and more"}\n' * 3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pretrain(nano_cfg(small, tmp_path / "run", **{"tokenizer.vocab_size": 270}))


def test_pretrain_rejects_seq_len_above_the_model_maximum(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"data.seq_len=256 is above the model's max_seq_len=128.*model.max_seq_len"):
        pretrain(nano_cfg(tiny_corpus, tmp_path / "run", **{"data.seq_len": 256}))
    assert not (tmp_path / "run").exists()  # failed before touching anything


def test_cli_pretrain_runs_a_recipe(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["pretrain", "--recipe", str(ROOT / "recipes" / "pretrain" / "nano.yaml"),
            *nano_overrides(tiny_corpus, out, **{"train.max_steps": 3, "train.eval_every": 0})]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrain: 3 steps" in printed and str(out / "final") in printed
    assert (out / "final" / "model.safetensors").is_file()
    assert main(["sft", "model=/nonexistent/model", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "/nonexistent/model" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_smollm2_on_chat_pairs_lowers_validation_loss(tmp_path):
    from llmlab.io.assets import AssetNotFoundError, asset_path

    try:
        asset_path("smollm2-135m-instruct")
    except AssetNotFoundError as e:
        pytest.skip(str(e))
    torch.set_num_threads(2)
    cfg = load_recipe(SFTConfig, ROOT / "recipes" / "sft" / "smollm2.yaml", [
        f"out_dir={tmp_path / 'sft'}", "data.max_conversations=160", "data.max_len=96", "train.max_steps=8",
        "train.eval_every=8", "train.lr=1e-4", "train.warmup_steps=2", "train.precision=fp32",
        "train.progress=false", "train.plot=false", "train.sample_prompts=[]"])
    result = sft(cfg)
    val = read_metrics(tmp_path / "sft" / "metrics.jsonl", "val")
    assert val[0]["step"] == 0 and val[-1]["step"] == 8
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.1, val
    assert result.checkpoint and (tmp_path / "sft" / "final" / "model.safetensors").is_file()
