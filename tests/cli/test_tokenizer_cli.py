import json

import pytest

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


@pytest.mark.parametrize("kind, options, vocab_size", [("bpe", [], 300), ("bpe", ["--char-level"], 320),
                                                       ("unigram", [], 60)], ids=["bpe", "bpe-char-level", "unigram"])
def test_train_bpe_and_unigram_match_tokenizers(tmp_path, capsys, kind, options, vocab_size):
    tokenizers = pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--kind", kind, *options, "--vocab-size", str(vocab_size),
                 "--special", "<s>", "</s>", "--corpus", str(corpus), "--out", str(out)]) == 0
    assert f"trained {kind}" in capsys.readouterr().out
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert load(out).vocab == hf.get_vocab()
    for text in ["The lazy dog jumps.", "机器学习是分支。", "unseen Zebra 字 🎉 <s> x</s>"]:
        assert main(["tokenizer", "encode", str(out), text]) == 0
        ids = [int(i) for i in capsys.readouterr().out.split()]
        assert ids == hf.encode(text).ids
        assert main(["tokenizer", "decode", str(out), *map(str, ids)]) == 0
        decoded = capsys.readouterr().out[:-1]  # print's newline
        assert decoded == hf.decode(ids, skip_special_tokens=False)
        if kind == "bpe" or text != "unseen Zebra 字 🎉 <s> x</s>":  # unigram has no byte fallback: <unk>
            assert decoded == text


def test_eval_shows_a_progress_bar(tmp_path, capsys, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    from llmlab.progress import Bar
    from llmlab.tokenizer import evaluate as evaluate_module

    bars = []

    class Recorded(Bar):
        def __init__(self, total, description, enabled=True):
            super().__init__(total, description, enabled)
            self.total, self.enabled, self.done = total, enabled, 0
            bars.append(self)

        def update(self, n=1):
            super().update(n)
            self.done += n

    monkeypatch.setattr(evaluate_module, "Bar", Recorded)
    monkeypatch.setattr(evaluate_module, "BATCH", 7)  # several batches, so the bar moves
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--corpus", str(corpus), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "eval", str(out), "--corpus", str(corpus), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    lines = [x for x in TEXT.split("\n") if x]
    assert [(b.total, b.done, b.enabled) for b in bars] == [(len(lines), len(lines), True)]
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert row["tokens"] == sum(len(e.ids) for e in hf.encode_batch(lines, add_special_tokens=False))
