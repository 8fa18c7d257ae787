import json
import subprocess
import sys

from llmlab.cli.main import main


def test_help_lists_the_command_groups(capsys):
    assert main([]) == 0
    assert "model" in capsys.readouterr().out


def test_model_info_prints_the_cost_table_for_every_attention_variant(capsys):
    assert main(["model", "info", "--preset", "micro"]) == 0
    out = capsys.readouterr().out
    for name in ("MHA", "GQA", "MQA", "MLA"):
        assert name in out


def test_model_info_json_matches_the_config_formulas(capsys, tmp_path):
    from llmlab.model import ModelConfig

    cfg = ModelConfig.preset("nano", n_kv_heads=1)
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert main(["model", "info", "--config", str(path), "--json", "--seq-len", "64"]) == 0
    rows = {r["attention"]: r for r in json.loads(capsys.readouterr().out)["variants"]}
    assert rows["MQA"]["params"] == cfg.num_parameters()
    assert rows["MQA"]["kv_bytes_per_token_bf16"] == cfg.kv_cache_bytes_per_token(2)
    assert rows["MHA"]["kv_bytes_per_token_bf16"] == 4 * rows["MQA"]["kv_bytes_per_token_bf16"]
    assert rows["MQA"]["train_flops_per_token"] == cfg.flops_per_token(64)


def test_bad_config_file_gives_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"dim": 100, "n_heads": 3}')
    assert main(["model", "info", "--config", str(path)]) == 2
    assert "dim=100 is not divisible by n_heads=3" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "llmlab.cli.main", "model", "info", "--depth", "2"],
                         capture_output=True, text=True, check=True)
    assert "depth 2" in out.stdout
