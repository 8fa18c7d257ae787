"""SFT data: alpaca, sharegpt and messages records become conversations whose labels are exactly the assistant
tokens; packed and padded batches give a model the same loss; overflow and malformed records are handled."""

import json
import warnings

import pytest
import torch

from llmlab.data import MissingDataError, SFTLoader, encode_conversations, load_conversations
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train

ALPACA = [{"instruction": "Name a primary colour.", "input": "", "output": "Red."},
          {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour.",
           "system": "You translate."}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
                               {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "What is 2+2?"},
                               {"from": "gpt", "value": "4, of course."}]}]
MESSAGES = [{"messages": [{"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris, 巴黎."}]}]
ALL = ALPACA + SHAREGPT + MESSAGES


@pytest.fixture(scope="module")
def tok():
    texts = [json.dumps(r, ensure_ascii=False) for r in ALL] * 3 + ["user assistant system"] * 5
    return train(texts, vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_formats_become_messages(tmp_path):
    chats = load_conversations(write_jsonl(tmp_path / "mixed.jsonl", ALL))
    assert chats[0] == [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]
    assert chats[1] == [{"role": "system", "content": "You translate."},
                        {"role": "user", "content": "Translate to French.\n\nGood morning"},
                        {"role": "assistant", "content": "Bonjour."}]
    assert [m["role"] for m in chats[2]] == ["system", "user", "assistant", "user", "assistant"]
    assert chats[3] == MESSAGES[0]["messages"]
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA), encoding="utf-8")  # Stanford's file is a list
    assert load_conversations(tmp_path / "alpaca.json", format="alpaca") == chats[:2]
    assert load_conversations(ALL) == chats  # records in memory
    assert load_conversations(tmp_path) == chats[:2] + chats  # a directory: alpaca.json, then mixed.jsonl


@pytest.mark.parametrize("records", [ALPACA, SHAREGPT, MESSAGES], ids=["alpaca", "sharegpt", "messages"])
def test_exactly_the_assistant_tokens_are_labelled(tok, records):
    chats = load_conversations(records)
    examples = encode_conversations(chats, tok, max_len=512, chat_template="chatml", progress=False)
    for chat, ex in zip(chats, examples):
        rendered = tok.apply_chat_template(chat, chat_template="chatml", return_assistant_mask=True)
        assert ex["input_ids"] == rendered["input_ids"]
        for t, (i, m) in enumerate(zip(rendered["input_ids"], rendered["assistant_mask"])):
            assert ex["labels"][t] == (i if m else -100)  # token by token
        labelled = tok.decode([i for i, y in zip(ex["input_ids"], ex["labels"]) if y != -100])
        assert labelled == "".join(m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant")
        text = tok.apply_chat_template(chat, chat_template="chatml", tokenize=False)
        assert tok.decode(ex["input_ids"]) == text


def batch_loss(model, batch):
    """The loss summed over the batch's targets, and their count (labels[t+1] is position t's target)."""
    out = model(batch["input_ids"], batch.get("attention_mask"), document_ids=batch.get("document_ids"),
                labels=batch["labels"])
    n = int((batch["labels"][:, 1:] != -100).sum())
    return out.loss.item() * n, n


def test_packed_and_padded_batches_give_the_same_loss(tok):
    chats = load_conversations(ALL * 2)
    examples = encode_conversations(chats, tok, max_len=128, chat_template="chatml", progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano", vocab_size=tok.vocab_size)).eval()
    padded = SFTLoader(examples, batch_size=len(examples), shuffle=False)
    packed = SFTLoader(examples, batch_size=2, shuffle=False, pack=True, seq_len=128, drop_last=False)
    rows = packed._plan(0)
    assert sum(len(r) for batch in rows for r in batch) == len(examples)  # every example once per epoch
    assert len([r for batch in rows for r in batch]) < len(examples)  # and some share a row
    with torch.no_grad():
        total_p, n_p = batch_loss(model, next(iter(padded)))
        it = iter(packed)
        sums = [batch_loss(model, next(it)) for _ in range(packed.batches_in_epoch())]
    total_k, n_k = sum(s for s, _ in sums), sum(n for _, n in sums)
    assert n_k == n_p and total_k / n_k == pytest.approx(total_p / n_p, abs=1e-5)


def test_batch_layouts(tok):
    examples = encode_conversations(load_conversations(ALL), tok, max_len=128, chat_template="chatml", progress=False)
    batch = next(iter(SFTLoader(examples, batch_size=2, shuffle=False, pad_id=7)))
    short = len(examples[0]["input_ids"])
    assert batch["input_ids"].shape[1] == max(short, len(examples[1]["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["input_ids"][0, short:] == 7).all() and (batch["labels"][0, short:] == -100).all()
    packed = next(iter(SFTLoader(examples, batch_size=1, shuffle=False, pack=True, seq_len=128, pad_id=7)))
    docs, labels = packed["document_ids"][0], packed["labels"][0]
    used = sum(len(examples[i]["input_ids"]) for i in SFTLoader(examples, batch_size=1, shuffle=False, pack=True,
                                                                  seq_len=128)._plan(0)[0][0])
    assert (docs[used:] == docs[used - 1] + 1).all() and (labels[used:] == -100).all()
    assert set(packed) == {"input_ids", "labels", "document_ids"}


@pytest.mark.parametrize("pack", [False, True])
def test_exact_resume(tok, pack):
    examples = encode_conversations(load_conversations(ALL * 4), tok, max_len=128, chat_template="chatml",
                                    progress=False)

    def make():
        return SFTLoader(examples, batch_size=2, seed=3, pack=pack, seq_len=128 if pack else None)

    reference = iter(make())
    expected = [next(reference) for _ in range(12)]
    run = make()
    it = iter(run)
    for _ in range(5):
        next(it)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
    for want, got in zip(expected[5:], iter(resumed)):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="n_examples"):
        SFTLoader(examples[:-1], batch_size=2, seed=3, pack=pack, seq_len=128).load_state_dict(run.state_dict())


def test_overflow(tok):
    chats = load_conversations(SHAREGPT + ALPACA[:1])
    lengths = [len(tok.apply_chat_template(c, chat_template="chatml")) for c in chats]
    max_len = lengths[0] - 3  # cuts the long chat's last assistant turn, keeps the short one whole
    assert lengths[1] <= max_len
    with pytest.warns(UserWarning, match="1 of 2 conversations are longer than max_len=.* truncated"):
        cut = encode_conversations(chats, tok, max_len=max_len, chat_template="chatml", progress=False)
    assert len(cut[0]["input_ids"]) == max_len and cut[1]["input_ids"] == tok.apply_chat_template(
        chats[1], chat_template="chatml")
    with pytest.warns(UserWarning, match="skipped"):
        assert len(encode_conversations(chats, tok, max_len=max_len, chat_template="chatml", on_overflow="skip",
                                        progress=False)) == 1
    with pytest.raises(ValueError, match=f"conversation 0 has {lengths[0]} tokens > max_len"):
        encode_conversations(chats, tok, max_len=max_len, chat_template="chatml", on_overflow="fail")
    with warnings.catch_warnings(record=True) as caught:  # truncated before any assistant token: dropped
        warnings.simplefilter("always")
        left = encode_conversations(chats, tok, max_len=lengths[1] - 1, chat_template="chatml", progress=False)
    assert len(left) == 1 and any("without assistant tokens" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="seq_len=8"):
        SFTLoader(cut, batch_size=1, pack=True, seq_len=8)


def test_errors_name_the_place_and_the_fix(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ALPACA)
    with open(bad, "a", encoding="utf-8") as f:
        f.write('{"prompt": "x", "completion": "y"}\n{"conversations": [{"from": "robot", "value": "x"}]}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: expected alpaca .*sharegpt .*messages.*'completion'"):
        load_conversations(bad)
    robot = write_jsonl(tmp_path / "robot.jsonl", SHAREGPT * 3 + [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(ValueError, match=r"robot\.jsonl:4: turn 0 has \"from\": 'robot'; use one of human"):
        load_conversations(robot, format="sharegpt")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: sharegpt records need \"conversations\""):
        load_conversations(bad, format="sharegpt")
    with pytest.warns(UserWarning, match=r"skipped 3 malformed conversations; the first: .*bad\.jsonl:3"):
        assert len(load_conversations(bad, on_error="skip")) == 2
    with pytest.raises(ValueError, match=r"records\[0\]: the conversation has no assistant turn"):
        load_conversations([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="message 0 needs \"role\""):
        load_conversations([{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(ValueError, match="unknown format"):
        load_conversations(ALL, format="chatml")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no conversations in"):
        load_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="chat-english"):
        load_conversations(tmp_path / "missing.jsonl")


def test_chatterbot_corpus_loads(tok):
    try:
        english = load_conversations("chat-english")
        chinese = load_conversations("chat-chinese")
    except MissingDataError as e:
        pytest.skip(f"chatterbot-corpus not installed here: {e}")
    assert len(english) > 1000 and len(chinese) > 300
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in english + chinese)
    examples = encode_conversations(english[:50], tok, max_len=256, chat_template="chatml", progress=False)
    assert len(examples) == 50 and all(any(y != -100 for y in e["labels"]) for e in examples)
