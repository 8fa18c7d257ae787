"""Preference data: every record form reads back to the same pairs, bad records are all reported with file
and line, synthetic pairs and splits are deterministic, encoding keeps the prompt a prefix of the chat
rendering, and the accuracy evaluator counts ties half."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmlab.data.preference import (
    PreferencePair,
    UnpairedExample,
    encode_pairs,
    load_hhh_alignment,
    load_preferences,
    load_sentiment_pairs,
    pairs_from_conversations,
    pairs_from_labels,
    pairs_from_ranked,
    preference_accuracy,
    save_preferences,
    split_pairs,
)
from llmlab.data.sources import MissingDataError
from llmlab.tokenizer import train
from llmlab.tokenizer.chat import get_template

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data next to the project
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
PAIRS = [{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Seven.", "id": "a"},
         {"prompt": USER, "chosen": "4.", "rejected": "5, I think."}]


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    text = " ".join(json.dumps(r) for r in PAIRS) * 3 + " user assistant system Red Seven colour"
    tok = train([text], kind="bpe", vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = get_template("chatml")
    tok.eos_token = "<|im_end|>"
    return tok


# --------------------------------------------------------------------------------------------- formats
def test_forms_read_the_same_pairs(tmp_path):
    explicit = load_preferences(write_jsonl(tmp_path / "explicit.jsonl", PAIRS))
    assert explicit == [PreferencePair("Name a colour.", "Red.", "Seven.", {"id": "a"}),
                        PreferencePair(USER, "4.", "5, I think.")]
    as_messages = [{"prompt": USER, "chosen": [{"role": "assistant", "content": "4."}],
                    "rejected": [{"role": "assistant", "content": "5, I think."}]}]
    implicit = [{"chosen": USER + [{"role": "assistant", "content": "4."}],  # Anthropic HH / TRL implicit prompt
                 "rejected": USER + [{"role": "assistant", "content": "5, I think."}]}]
    assert load_preferences(as_messages) == load_preferences(implicit) == explicit[1:]
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS), encoding="utf-8")
    assert load_preferences(tmp_path / "pairs.json") == explicit
    assert load_preferences(save_preferences(explicit, tmp_path / "saved.jsonl")) == explicit  # round trip
    tool_turn = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "add", "arguments": {"a": 2, "b": 2}}}]}, {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4."}]
    multi = load_preferences([{"chosen": USER + tool_turn, "rejected": USER + [{"role": "assistant", "content": "5"}]}])
    assert multi[0].prompt == USER and multi[0].chosen == tool_turn and multi[0].rejected == "5"


def test_unpaired_form(tmp_path):
    records = [{"prompt": "Hi", "completion": "Hello!", "label": True},
               {"prompt": USER, "completion": "5", "label": False, "source": "x"}]
    items = load_preferences(write_jsonl(tmp_path / "kto.jsonl", records))
    assert items == [UnpairedExample("Hi", "Hello!", True), UnpairedExample(USER, "5", False, {"source": "x"})]
    assert load_preferences(save_preferences(items, tmp_path / "again.jsonl")) == items


def test_every_bad_record_is_reported_with_its_line(tmp_path):
    lines = [PAIRS[0],
             "{not json",
             {"prompt": "p", "chosen": "a"},
             {"prompt": "p", "chosen": "", "rejected": "b"},
             {"prompt": "p", "chosen": "same", "rejected": "same"},
             {"prompt": 3, "chosen": "a", "rejected": "b"},
             {"chosen": "a", "rejected": "b"},
             {"prompt": "p", "completion": "c", "label": True},
             {"chosen": USER + [{"role": "assistant", "content": "x"}], "rejected": USER},
             {"prompt": "p", "completion": "c", "label": "yes"},
             ["a list"],
             {"prompt": "p", "chosen": ["not a message"], "rejected": "b"}]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    msg = str(e.value)
    assert "11 malformed preference records" in msg
    for number, problem in [(2, "invalid JSON"), (3, "missing 'rejected'"), (4, '"chosen" is empty'),
                            (5, "chosen and rejected are the same reply"), (6, '"prompt" must be a string'),
                            (7, "missing 'prompt'"), (8, "an unpaired record among pairs"),
                            (9, "one of chosen and rejected is a prefix of the other"),
                            (10, '"label" must be true or false'),
                            (11, "expected a JSON object, got list"), (12, '"chosen": message 0 needs "role"')]:
        assert f"{path}:{number}: {problem}" in msg, (number, msg)
    assert f"{path}:1:" not in msg and "accepted records:" in msg
    with pytest.warns(UserWarning, match="skipped 11 malformed preference records"):
        assert load_preferences(path, on_error="skip") == load_preferences(PAIRS[:1])
    with pytest.raises(ValueError, match=r"missing 'chosen', 'rejected'"):
        load_preferences([{"prompt": "only a prompt"}])


def test_hhh_alignment_reads_as_pairs():
    if not (SHARED_DATA / "preference" / "hhh_alignment.jsonl").is_file():
        pytest.skip(f"the BIG-bench evaluation sets are not at {SHARED_DATA} (../shared/data next to the project)")
    pairs = load_hhh_alignment()
    assert len(pairs) == 221 and all(isinstance(p.prompt, str) for p in pairs)
    assert {p.meta["subset"] for p in pairs} == {"harmless", "helpful", "honest", "other"}
    assert pairs[0].meta["id"] == "hhh-harmless-000"
    assert load_preferences(SHARED_DATA / "preference" / "hhh_alignment.jsonl") == pairs
    with pytest.raises(MissingDataError, match="shared/data"):
        load_hhh_alignment(SHARED_DATA / "nowhere.jsonl")


def test_shared_data_folder_can_be_named_by_the_environment(tmp_path, monkeypatch):
    (tmp_path / "preference").mkdir()
    row = {"id": "x-0", "subset": "helpful", "prompt": "p", "chosen": "a", "rejected": "b"}
    (tmp_path / "preference" / "hhh_alignment.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("LLMLAB_SHARED_DATA", str(tmp_path))
    pair, = load_hhh_alignment()
    assert (pair.chosen, pair.meta["subset"]) == ("a", "helpful")
    with pytest.raises(MissingDataError, match="LLMLAB_SHARED_DATA"):
        load_sentiment_pairs()  # no classification/ there


# -------------------------------------------------------------------------------------------- building
CHATS = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
         for i in range(12)]
CHATS += [[{"role": "user", "content": "Question 0?"}, {"role": "assistant", "content": "Also answer 0."}],
          [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
           {"role": "user", "content": "c"}, {"role": "assistant", "content": "Answer 3."},
           {"role": "user", "content": "?"}]]


def test_pairs_from_conversations_are_seeded_and_never_equal():
    pairs = pairs_from_conversations(CHATS, seed=0)
    assert len(pairs) == len(CHATS)
    assert pairs == pairs_from_conversations(CHATS, seed=0)
    assert [p.rejected for p in pairs] != [p.rejected for p in pairs_from_conversations(CHATS, seed=1)]
    assert pairs[-1].prompt == CHATS[-1][:4] and pairs[-1].chosen == "Answer 3."  # up to the last assistant turn
    replies = {json.dumps(p.prompt): [] for p in pairs}
    for p in pairs:
        replies[json.dumps(p.prompt)].append(p.chosen)
    for p, chat in zip(pairs, CHATS):
        assert p.chosen != p.rejected and p.rejected not in replies[json.dumps(p.prompt)]
        assert p.chosen == [m for m in chat if m["role"] == "assistant"][-1]["content"]
    assert pairs[3].rejected != "Answer 3."  # the last conversation's reply has the same text


def test_pairs_from_named_chat_data():
    try:
        pairs = pairs_from_conversations("chat-english", seed=0)
    except MissingDataError as e:
        pytest.skip(str(e))
    assert len(pairs) > 1000 and all(p.chosen.strip() != p.rejected.strip() for p in pairs)
    assert pairs[:50] == pairs_from_conversations("chat-english", seed=0)[:50]


def test_pairs_from_ranked():
    pair, = pairs_from_ranked("p", ["ok", "best", "worst", "best too"], [0.5, 2.0, -1.0, 2.0])
    assert (pair.chosen, pair.rejected, pair.meta) == ("best", "worst", {"chosen_score": 2.0, "rejected_score": -1.0})
    assert pairs_from_ranked("p", ["a", "b"], [1.0, 1.0]) == []  # a tie says nothing
    assert pairs_from_ranked("p", ["a"], [1.0]) == []
    with pytest.raises(ValueError, match="2 samples but 1 scores"):
        pairs_from_ranked("p", ["a", "b"], [1.0])


def test_split_is_deterministic_and_keeps_prompts_together():
    pairs = [PreferencePair(f"prompt {i // 2}", f"good {i}", f"bad {i}") for i in range(40)]
    train_, val = split_pairs(pairs, 0.25, seed=3)
    assert (train_, val) == split_pairs(pairs, 0.25, seed=3)
    assert split_pairs(pairs, 0.25, seed=4)[1] != val
    assert len(val) == 10 and len(train_) == 30 and sorted(train_ + val, key=pairs.index) == pairs
    assert not {p.prompt for p in train_} & {p.prompt for p in val}
    with pytest.raises(ValueError, match="at least 2 prompts"):
        split_pairs(pairs[:2], 0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        split_pairs(pairs, 1.0)


def test_pairs_from_labels_use_each_text_once_and_split_by_pair():
    texts = [(f"good {i}", "positive") for i in range(7)] + [(f"bad {i}", "negative") for i in range(10)] + \
            [("meh", "neutral"), ("  ", "positive")]
    pairs = pairs_from_labels(texts, chosen_label="positive", rejected_label="negative", prompt="Review:", seed=1)
    assert len(pairs) == 7 and pairs == pairs_from_labels(texts, chosen_label="positive", rejected_label="negative",
                                                          prompt="Review:", seed=1)
    assert sorted(p.chosen for p in pairs) == [f"good {i}" for i in range(7)]
    assert len({p.rejected for p in pairs}) == 7 and all(p.rejected.startswith("bad") for p in pairs)
    # one prompt for all, yet each pair is its own group: the split works and shares no text across sides
    train_, val = split_pairs(pairs, 0.3, seed=0)
    assert len(val) == 2 and len(train_) == 5
    assert not {p.chosen for p in train_} & {p.chosen for p in val}
    with pytest.raises(ValueError, match=r"labels present: \['negative', 'neutral', 'positive'\]"):
        pairs_from_labels(texts, chosen_label="happy", rejected_label="negative", prompt="Review:")


def test_sentiment_pairs_from_multiemo():
    try:
        pairs = load_sentiment_pairs("english", seed=0)
    except MissingDataError as e:
        pytest.skip(str(e))
    assert len(pairs) == 2286  # every positive review against one of the 3,111 negative ones
    assert len({p.chosen for p in pairs}) == len({p.rejected for p in pairs}) == len(pairs)
    with pytest.raises(MissingDataError, match="shared/data"):
        load_sentiment_pairs(path=SHARED_DATA / "nowhere.jsonl")


# -------------------------------------------------------------------------------------------- encoding
def test_encode_pairs_prompt_is_a_prefix_of_the_chat(tok):
    pairs = load_preferences(PAIRS)
    for pair, enc in zip(pairs, encode_pairs(pairs, tok, max_len=256)):
        chat = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
        assert enc["prompt_ids"] == tok.apply_chat_template(chat, add_generation_prompt=True)
        for key, reply in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
            full = tok.apply_chat_template(chat + [{"role": "assistant", "content": reply}])
            assert enc["prompt_ids"] + enc[key] == full
            assert tok.decode(enc[key]) == f"{reply}<|im_end|>\n"
    kto, = encode_pairs([UnpairedExample("Hi", "Red.", False)], tok, max_len=256)
    assert set(kto) == {"prompt_ids", "completion_ids", "label"} and kto["label"] is False


def test_truncation_cuts_the_prompt_from_the_left_but_keeps_half(tok):
    pair = PreferencePair("Name a colour. " * 8, "Red. " * 3, "Seven.")
    full, = encode_pairs([pair], tok, max_len=1000)
    n_prompt, n_chosen = len(full["prompt_ids"]), len(full["chosen_ids"])
    assert n_prompt > 2 * n_chosen > len(full["rejected_ids"])
    # the replies fit whole: the prompt keeps its end, next to the reply
    with pytest.warns(UserWarning, match="1 of 1 items are longer than max_len"):
        cut, = encode_pairs([pair], tok, max_len=2 * n_chosen)
    assert cut["prompt_ids"] == full["prompt_ids"][-n_chosen:]
    assert cut["chosen_ids"] == full["chosen_ids"] and cut["rejected_ids"] == full["rejected_ids"]
    # a reply longer than half of max_len no longer crowds out the prompt: both get half
    long_reply = PreferencePair(pair.prompt, "Red. " * 40, "Seven.")
    whole, = encode_pairs([long_reply], tok, max_len=1000)
    with pytest.warns(UserWarning):
        cut, = encode_pairs([long_reply], tok, max_len=16)
    assert cut["prompt_ids"] == whole["prompt_ids"][-8:] and cut["chosen_ids"] == whole["chosen_ids"][:8]
    assert cut["rejected_ids"] == whole["rejected_ids"][:8]
    with pytest.warns(UserWarning):
        tiny, = encode_pairs([pair], tok, max_len=4)
    assert tiny["prompt_ids"] == full["prompt_ids"][-2:] and tiny["chosen_ids"] == full["chosen_ids"][:2]
    assert tiny["rejected_ids"] == full["rejected_ids"][:2]


def test_plain_text_without_template_and_bad_templates(tok):
    plain = train(["Name a colour. Red. Seven."] * 3, kind="bpe", vocab_size=280, special_tokens=["<|endoftext|>"])
    plain.eos_token = "<|endoftext|>"
    enc, = encode_pairs([PreferencePair("Name a colour.", " Red.", " Seven.")], plain, max_len=64)
    assert enc["prompt_ids"] == plain.encode("Name a colour.")
    assert enc["chosen_ids"] == plain.encode(" Red.") + [plain.token_to_id("<|endoftext|>")]
    with pytest.raises(ValueError, match=r"items\[0\]: chat messages need a chat template"):
        encode_pairs(load_preferences(PAIRS[1:]), plain, max_len=64)
    odd = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}assistant says:{% endif %}")  # generation prompt is not a prefix
    with pytest.raises(ValueError, match=r"items\[0\]: the chat template renders the prompt"):
        encode_pairs(load_preferences(PAIRS[:1]), tok, max_len=64, chat_template=odd)


# ------------------------------------------------------------------------------------------ evaluation
def test_preference_accuracy_counts_ties_half():
    acc = preference_accuracy([1.0, 2.0, 0.0, 5.0], [0.0, 3.0, 0.0, 1.0])
    assert (acc.accuracy, acc.margin, acc.n, acc.ties) == (0.625, 1.0, 4, 1)
    torch = pytest.importorskip("torch")
    assert preference_accuracy(torch.tensor([1.0]), torch.tensor([2.0])).accuracy == 0.0
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        preference_accuracy([1.0], [])
