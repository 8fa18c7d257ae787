"""`llmlab chat` keeps a long conversation inside a small context window by dropping
whole old turns (checked against a brute-force choice of the longest fitting suffix of turns, never by
crashing), and the errors about lengths name both numbers."""

import io

import pytest
import torch

import llmlab
from llmlab.cli.main import main
from llmlab.infer.llm import LLM
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train
from llmlab.tokenizer.chat import get_template

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "stop here, then go there; the end is near, the end is here. ") * 20
WINDOW = 80


@pytest.fixture(scope="module")
def tok():
    tok = train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = get_template("chatml")
    tok.eos_token = "<|im_end|>"
    return tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano", vocab_size=len(tok), max_seq_len=WINDOW)).eval()
    path = tmp_path_factory.mktemp("audit6") / "ckpt"
    llmlab.save(model, tok, path, format="llmlab")
    return str(path)


def run(capsys, monkeypatch, argv, stdin):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def longest_fitting(tok, system, turns, budget):
    """Brute force: of all suffixes of the conversation that start at a user message, the longest whose
    rendered prompt (with the generation prompt) has at most `budget` tokens; the system message always stays."""
    for i, m in enumerate(turns):
        if m["role"] != "user":
            continue
        messages = system + turns[i:]
        if len(tok.apply_chat_template(messages, add_generation_prompt=True)) <= budget:
            return messages
    return None


def test_long_chat_drops_whole_old_turns_and_never_overflows(capsys, monkeypatch, tok, ckpt):
    max_tokens = 10
    users = [f"the {w} sat on the {v}" for w, v in (("cat", "mat"), ("dog", "log"), ("cat", "log"), ("dog", "mat"))]
    users = [users[i % 4] + " and" * (i % 3) for i in range(14)]
    sent = []  # (prompt ids, reply) of every turn, as the chat loop gave them to the engine
    stream = LLM.stream

    def spy(self, prompt, params=None, **kw):
        sent.append([list(prompt), ""])
        for piece in stream(self, prompt, params, **kw):
            sent[-1][1] += piece
            yield piece

    monkeypatch.setattr(LLM, "stream", spy)
    system = [{"role": "system", "content": "be brief"}]
    code, out, err = run(capsys, monkeypatch, ["chat", ckpt, "--system", "be brief", "--temperature", "0",
                                               "--max-tokens", str(max_tokens)], "\n".join(users) + "\n")
    assert code == 0 and "dropped" in err and "not sent" not in err
    assert len(sent) == len(users)
    turns = []
    for (ids, reply), user in zip(sent, users):
        turns.append({"role": "user", "content": user})
        want = longest_fitting(tok, system, turns, WINDOW - max_tokens)
        assert ids == tok.apply_chat_template(want, add_generation_prompt=True)
        assert len(ids) + max_tokens <= WINDOW
        turns = want[1:] + [{"role": "assistant", "content": reply}]
    assert len(turns) < 2 * len(users)  # old turns really went
    assert out == "".join(reply + "\n" for _, reply in sent)


def test_length_errors_name_both_numbers(capsys, monkeypatch, tok, ckpt):
    long = "the cat sat on the mat " * 30
    n = len(tok.encode(long))
    code, _, err = run(capsys, monkeypatch, ["generate", ckpt, long, "--max-tokens", "4"], "")
    assert code == 2 and f"{n} tokens" in err and f"context window is {WINDOW}" in err
    code, _, err = run(capsys, monkeypatch, ["chat", ckpt, "--max-tokens", str(WINDOW)], "hi\n")
    assert code == 2 and f"--max-tokens {WINDOW}" in err and f"{WINDOW} tokens" in err
