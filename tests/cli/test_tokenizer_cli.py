import json

from llmlab.cli.main import main
from llmlab.tokenizer import load
from llmlab.tokenizer.evaluate import evaluate

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 20 + "机器学习是人工智能的一个分支。\n" * 10


def test_train_encode_decode_eval(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "120", "--min-frequency", "1",
                 "--corpus", str(corpus), "--out", str(out)]) == 0
    tok = load(out)
    capsys.readouterr()
    assert main(["tokenizer", "encode", str(out), "the lazy dog"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert ids == tok.encode("the lazy dog")
    assert main(["tokenizer", "decode", str(out), *map(str, ids), "--skip-special"]) == 0
    assert capsys.readouterr().out.strip() == "the lazy dog"
    assert main(["tokenizer", "eval", str(out), "--corpus", str(corpus), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row == {"tokenizer": str(out), "corpus": str(corpus), **evaluate(tok, [x for x in TEXT.split("\n") if x])}


def test_evaluate_counts_bytes_and_vocab_use(tmp_path):
    from llmlab.tokenizer import train

    tok = train(["ab ab ab abc"], vocab_size=260, min_frequency=1)
    stats = evaluate(tok, ["ab", "é"])
    n = len(tok.encode("ab")) + len(tok.encode("é"))
    assert stats["bytes"] == 4 and stats["tokens"] == n and stats["bytes_per_token"] == 4 / n
    assert stats["vocab_used"] == len(set(tok.encode("ab") + tok.encode("é"))) / len(tok)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["tokenizer", "train", "--corpus", "no-such-corpus", "--out", str(tmp_path)]) == 2
    assert "unknown corpus 'no-such-corpus'" in capsys.readouterr().err
    assert main(["tokenizer", "decode", str(tmp_path), "x"]) == 2
