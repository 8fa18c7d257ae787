"""The report card renders report.json into Markdown and self-contained HTML with the same content, and the
leaderboard ranks the runs of a folder."""

import base64
import json

import pytest

from llmlab.eval.report import headline, leaderboard, write_report

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _report(name: str, bpb: float, **extra) -> dict:
    return {
        "name": name, "created": "2026-11-30T12:00:00+00:00", "command": "llmlab speedrun --size nano",
        "config": {"size": "nano", "base": None, "minutes": 1.0},
        "model": {"parameters": 1000, "layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "vocab": 512,
                  "context": 128, "fp32_mb": 0.1, "bf16_mb": 0.05, "kv_bytes_per_token_bf16": 256},
        "tokenizer": {"kind": "bpe", "vocab_size": 512, "train_chars": 1000, "bytes_per_token_en": 1.9},
        "stages": {"pretrain": {"seconds": 30.0, "steps": 100, "tokens": 5000, "tokens_per_s": 200.0, "mfu": 0.25,
                                "val_bpb_start": 5.0, "val_bpb_final": bpb}},
        "eval": [{"model": "untrained", "bpb_en": 5.0, "chat_loss": 6.0},
                 {"model": "pretrained", "bpb_en": bpb, "chat_loss": 4.0, "pref_accuracy": 0.6}],
        "samples": [{"model": "pretrained", "prompt": "a | b <i>", "reply": "c\nd"}],
        "environment": {"python": "3.11", "torch": "2.13.0"},
        "images": {"loss": "loss.png"}, "final_model": f"runs/{name}/dpo/final", **extra,
    }


def _write(folder, report):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "loss.png").write_bytes(PNG)


def test_markdown_and_html_say_the_same_things(tmp_path):
    _write(tmp_path / "a", _report("a", 2.5))
    md = write_report(tmp_path / "a").read_text()
    page = (tmp_path / "a" / "report.html").read_text()
    assert "| pretrained | 2.5 | 4 | 0.6 |" in md
    assert "Held-out English bits per byte: 5.000 (untrained) → 2.500 (pretrained)." in md
    assert "![training and validation loss per stage](loss.png)" in md
    assert "a \\| b <i>" in md  # a pipe in a cell must not split the Markdown table
    assert "a | b &lt;i&gt;" in page  # and HTML is escaped
    assert f'src="data:image/png;base64,{base64.b64encode(PNG).decode()}"' in page  # self-contained
    assert "25.0%" in md and "25.0%" in page  # MFU
    for text in ("llmlab chat runs/a/dpo/final", "StrategyQA", "Leaderboard"):
        assert (text in md) == (text in page) or text == "StrategyQA"


def test_leaderboard_ranks_runs_and_skips_broken_files(tmp_path):
    _write(tmp_path / "slow", _report("slow", 3.0))
    _write(tmp_path / "fast", _report("fast", 2.0))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    board = leaderboard(tmp_path)
    assert [r["run"] for r in board] == ["fast", "slow"]
    assert board[0] == headline(_report("fast", 2.0))
    assert board[0]["tokens"] == 5000 and board[0]["minutes"] == 0.5 and board[0]["bpb_en_start"] == 5.0
    md = write_report(tmp_path / "slow").read_text()
    assert md.index("| fast |") < md.index("| **slow** |")  # this run in bold, ranked among the others


def test_missing_report_json_says_what_writes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="llmlab speedrun"):
        write_report(tmp_path)
