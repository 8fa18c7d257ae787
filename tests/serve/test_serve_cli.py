"""`llmlab serve`: the help lists the server flags; a bad SOURCE or flag is one clear error line (exit 2)."""

import pytest

from llmlab.cli.main import main


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--max-concurrency", "SRC".lower()):
        assert flag in out
    assert "127.0.0.1" in out and "8000" in out


def test_bad_source_is_one_clear_line(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmlab: error:") and "missing" in err[0]


def test_bad_flag_values(capsys):
    assert main(["serve", "whatever", "--max-concurrency", "0"]) == 2
    assert "--max-concurrency" in capsys.readouterr().err
    assert main(["serve", "whatever", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
