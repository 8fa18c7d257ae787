"""read_documents reads every file kind, directories, lists and named corpora; malformed JSONL is reported
with file:line (or skipped with one warning); split_documents is a deterministic document-level split."""

import json
import sys
import warnings

import pytest

from llmlab.data import MissingDataError, read_documents, split_documents
from llmlab.data.corpus import NAMED


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_txt_is_one_document_unless_separated(tmp_path):
    (tmp_path / "one.txt").write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert read_documents(tmp_path / "one.txt") == ["First paragraph.\n\nSecond paragraph.\n"]
    (tmp_path / "many.txt").write_text("doc one\n<|endoftext|>\ndoc two\n<|endoftext|>\n\n", encoding="utf-8")
    assert read_documents(str(tmp_path / "many.txt")) == ["doc one\n", "doc two\n"]  # blank tail dropped


def test_jsonl_json_and_text_key(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "alpha"}), "", json.dumps({"text": "beta", "id": 2})])
    assert read_documents(tmp_path / "a.jsonl") == ["alpha", "beta"]
    write_jsonl(tmp_path / "b.jsonl", [json.dumps({"body": "gamma"})])
    assert read_documents(tmp_path / "b.jsonl", text_key="body") == ["gamma"]
    (tmp_path / "c.json").write_text(json.dumps(["delta", {"text": "epsilon"}]), encoding="utf-8")
    assert read_documents(tmp_path / "c.json") == ["delta", "epsilon"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["zeta", None, "eta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert read_documents(tmp_path / "d.parquet") == ["zeta", "eta"]  # nulls are no documents
    with pytest.raises(ValueError, match=r"no column 'content'.*\['text', 'n'\]"):
        read_documents(tmp_path / "d.parquet", text_key="content")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'llmlab\[parquet\]'"):
        read_documents(tmp_path / "d.parquet")


def test_directory_sorted_recursive_and_lists(tmp_path):
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "x.jsonl", [json.dumps({"text": "from a/x"})])
    (tmp_path / "notes.md").write_text("not a corpus file", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    assert read_documents(tmp_path) == ["from a/x", "from b"]
    assert read_documents([tmp_path / "b.txt", tmp_path / "a"]) == ["from b", "from a/x"]


def test_named_corpora():
    try:
        english = read_documents("english")
        chinese = read_documents("chinese")
    except MissingDataError as e:
        pytest.skip(f"corpus not installed here: {e}")
    sotu, moby = read_documents("sotu"), read_documents("moby-dick")
    assert english == sotu + moby and len(sotu) >= 230 and len(moby) >= 135
    assert sotu[0].startswith("Fellow-Citizens of the Senate")
    assert moby[0].startswith("Loomings.")
    assert NAMED["peoples_daily"] is NAMED["chinese"]
    assert 2000 < len(chinese) < 5000  # articles, not the 19k paragraphs
    assert chinese[0].startswith("迈向充满希望的新世纪")
    assert 1.7e6 < sum(len(a) for a in chinese) < 2.0e6


def test_malformed_jsonl_fail_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "{not json", json.dumps({"txt": "x"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON.*on_error='skip'"):
        read_documents(bad)
    fixed = write_jsonl(tmp_path / "keys.jsonl", [json.dumps({"text": "ok"}), json.dumps({"txt": "x"})])
    with pytest.raises(ValueError, match=r"keys\.jsonl:2: expected an object with a string under 'text'.*'txt'"):
        read_documents(fixed)


def test_malformed_jsonl_skip_warns_once(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "{not json", json.dumps({"text": 3}),
                                               json.dumps({"text": "fine"})])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = read_documents(bad, on_error="skip")
    assert docs == ["ok", "fine"]
    assert len(caught) == 1 and "skipped 2 malformed records" in str(caught[0].message)
    assert "bad.jsonl:2" in str(caught[0].message)
    with pytest.raises(ValueError, match="on_error must be"):
        read_documents(bad, on_error="ignore")


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents in"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="no documents in"):
        read_documents(tmp_path / "dir")
    with pytest.raises(FileNotFoundError, match="not a named corpus"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot read \.csv"):
        read_documents(tmp_path / "x.csv")


def test_split_is_document_level_and_deterministic():
    docs = [f"document {i}" for i in range(100)]
    train, val = split_documents(docs, val_fraction=0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert [d for d in docs if d in set(train)] == train  # order kept
    assert split_documents(docs, val_fraction=0.1, seed=3) == (train, val)
    assert split_documents(docs, val_fraction=0.1, seed=4)[1] != val
    assert split_documents(["a", "b"], val_fraction=0.01) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split_documents(["a"]) == (["a"], [])
    assert split_documents(docs, val_fraction=0.0) == (docs, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, val_fraction=1.0)
