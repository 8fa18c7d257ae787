"""The speedrun end to end at nano size (about a minute on one core), its resume, its resource check and its
evaluation against a brute-force computation."""

import contextlib
import io
import json
import math

import pytest
import torch

from llmlab.cli.main import main
from llmlab.data.sources import MissingDataError
from llmlab.speedrun import Run, SpeedrunConfig, check_resources, estimate_needs, evaluate_model, speedrun


def _corpora_or_skip():
    from llmlab.data import load_conversations, read_documents

    try:
        read_documents(["english"]), read_documents(["chinese"]), load_conversations("chat-english")
    except MissingDataError as e:
        pytest.skip(f"speedrun corpora not installed: {e}")


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory):
    _corpora_or_skip()
    runs = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["speedrun", "--size", "nano", "--minutes", "0.5", "--runs-dir", str(runs), "--name", "nano",
                     "--threads", "1", "--quiet"])
    assert code == 0
    return runs / "nano", out.getvalue()


def test_nano_speedrun_trains_evaluates_and_reports(nano_run):
    run_dir, stdout = nano_run
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["stages"]) == ["data", "tokenizer", "pretrain", "sft", "dpo", "evaluate"]
    rows = {r["model"]: r for r in report["eval"]}
    assert list(rows) == ["untrained", "pretrained", "SFT", "DPO (LoRA)"]
    # pretraining: held-out bits per byte fall clearly below the untrained model's, in both languages
    assert rows["pretrained"]["bpb_en"] < 0.7 * rows["untrained"]["bpb_en"]
    assert rows["pretrained"]["bpb_zh"] < 0.8 * rows["untrained"]["bpb_zh"]
    assert rows["DPO (LoRA)"]["bpb_en"] < 0.8 * rows["untrained"]["bpb_en"]
    # SFT: the loss per reply token on held-out chats falls below the pretrained model's
    assert rows["SFT"]["chat_loss"] < rows["pretrained"]["chat_loss"] - 0.3
    pretrain = report["stages"]["pretrain"]
    assert pretrain["val_bpb_final"] < pretrain["val_bpb_start"] and pretrain["tokens"] > 0
    assert report["tokenizer"]["vocab_size"] == 512 and report["tokenizer"]["bytes_per_token_en"] > 1.2
    from llmlab.model import ModelConfig

    final_cfg = ModelConfig.from_dict(json.loads((run_dir / "dpo" / "final" / "config.json").read_text()))
    assert report["model"]["parameters"] == final_cfg.num_parameters()  # the closed form in model/cost.py
    md = (run_dir / "report.md").read_text()
    assert "## Evaluation" in md and "![" in md and "Leaderboard" in md and "llmlab chat" in md
    page = (run_dir / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "http://" not in page and "https://" not in page
    assert "llmlab chat" in stdout and "llmlab serve" in stdout
    assert (run_dir / "dpo" / "final" / "config.json").is_file()


def test_rerun_skips_finished_stages_and_resumes(nano_run, capsys):
    run_dir, _ = nano_run
    stages = json.loads((run_dir / "stages.json").read_text())
    del stages["dpo"], stages["evaluate"]  # as if the run had been killed during DPO
    (run_dir / "stages.json").write_text(json.dumps(stages))
    before = json.loads((run_dir / "report.json").read_text())
    cfg = SpeedrunConfig(name="nano", runs_dir=str(run_dir.parent), size="nano", minutes=0.5, threads=1,
                         progress=False)
    speedrun(cfg)
    after = json.loads((run_dir / "report.json").read_text())
    assert after["stages"]["pretrain"] == before["stages"]["pretrain"]  # not run again
    assert after["stages"]["dpo"]["steps"] == before["stages"]["dpo"]["steps"]
    assert [r["model"] for r in after["eval"]] == [r["model"] for r in before["eval"]]
    # the same name with another plan is refused instead of mixing two runs
    with pytest.raises(ValueError, match="another --name"):
        speedrun(SpeedrunConfig(name="nano", runs_dir=str(run_dir.parent), size="micro", minutes=0.5))


def test_evaluation_equals_brute_force(nano_run):
    """chat loss and preference accuracy of evaluate_model against a plain forward pass per pair."""
    from llmlab.api import load
    from llmlab.data.preference import encode_pairs, load_preferences

    run_dir, _ = nano_run
    model, tok = load(str(run_dir / "sft" / "final"))
    model.eval()
    cfg = SpeedrunConfig(name="nano", runs_dir=str(run_dir.parent), size="nano", minutes=0.5)
    run = Run.__new__(Run)
    run.cfg, run.dir = cfg, run_dir
    got = evaluate_model(run, model, tok)
    pairs = encode_pairs(load_preferences(run_dir / "data" / "pairs_val.jsonl"), tok, max_len=128)

    def reply_logps(prompt, reply):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        return [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(reply)]

    nll, n, wins = 0.0, 0, 0
    for p in pairs:
        chosen = reply_logps(p["prompt_ids"], p["chosen_ids"])
        rejected = reply_logps(p["prompt_ids"], p["rejected_ids"])
        nll -= sum(chosen)
        n += len(chosen)
        wins += sum(chosen) / len(chosen) > sum(rejected) / len(rejected)
    assert math.isclose(got["chat_loss"], nll / n, abs_tol=2e-4)
    assert math.isclose(got["pref_accuracy"], wins / len(pairs), abs_tol=1e-4)


def test_too_little_memory_or_disk_is_refused_before_starting(tmp_path):
    cfg = SpeedrunConfig(name="r", runs_dir=str(tmp_path), size="base")
    need = estimate_needs(cfg)
    assert need["memory"] > 16 * 400e6  # base is ~400M parameters: 16 bytes each for weights, grads, AdamW
    with pytest.raises(ValueError, match=r"--size base needs about .* GB of memory .* smaller --size"):
        check_resources(cfg, "cpu", memory=need["memory"] // 2, disk=need["disk"] * 2)
    with pytest.raises(ValueError, match=r"GB of disk"):
        check_resources(cfg, "cpu", memory=need["memory"] * 2, disk=need["disk"] // 2)
    check_resources(cfg, "cpu", memory=need["memory"] * 2, disk=need["disk"] * 2)
    assert not (tmp_path / "r").exists()  # nothing was started


@pytest.mark.parametrize("kwargs, message", [
    (dict(size="huge"), "unknown size 'huge'; choose one of nano, micro, small, base"),
    (dict(minutes=0), "minutes must be positive"),
    (dict(name="a/b"), "plain folder name"),
])
def test_bad_settings_are_reported(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        speedrun(SpeedrunConfig(runs_dir=str(tmp_path), **kwargs))


def test_cli_reports_bad_settings_in_one_line(tmp_path, capsys):
    assert main(["speedrun", "--size", "nano", "--minutes", "-1", "--runs-dir", str(tmp_path)]) == 2
    assert "minutes must be positive" in capsys.readouterr().err
