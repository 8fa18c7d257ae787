"""`llmlab generate` and `llmlab chat` on a tiny random model saved as an llmlab checkpoint: the CLI's greedy text
equals LLM.generate / LLM.chat on the same model, and --num-beams LLM.beam_search; --json, --stream, --stop, stdin
and --file prompts; the chat loop (two turns, /reset, /exit, EOF, a message too long for the window, trimming old
turns); fit_history; bad input gets exit code 2 and one clear line."""

import io
import json

import pytest
import torch

import llmlab
from llmlab.cli.chat import fit_history
from llmlab.cli.main import main
from llmlab.infer import LLM, SamplingParams
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train
from llmlab.tokenizer.chat import get_template

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "stop here, then go there; the end is near, the end is here. ") * 20
GREEDY = ["--temperature", "0", "--max-tokens", "12"]


@pytest.fixture(scope="module")
def tok():
    tok = train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = get_template("chatml")
    tok.eos_token = "<|im_end|>"  # a ChatML model ends its turn (and generation) with <|im_end|>
    return tok


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", vocab_size=len(tok))).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    llmlab.save(model, tok, path, format="llmlab")
    return str(path)


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model, tok)


def greedy(max_tokens=12, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def run(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------ generate


def test_generate_arguments_equal_llm_generate(capsys, ckpt, llm):
    prompts = ["the cat sat", "a dog met"]
    refs = llm.generate(prompts, greedy())
    code, out, _ = run(capsys, ["generate", ckpt, *prompts, *GREEDY])
    assert code == 0
    assert out == "".join(f"--- prompt {i + 1}\n{r.text}\n" for i, r in enumerate(refs))
    code, out, _ = run(capsys, ["generate", ckpt, prompts[0], *GREEDY])
    assert code == 0 and out == refs[0].text + "\n"


def test_generate_json_fields(capsys, ckpt, llm):
    code, out, _ = run(capsys, ["generate", ckpt, "the cat sat", "the end", *GREEDY, "--json", "--logprobs", "2"])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    refs = llm.generate(["the cat sat", "the end"], greedy(logprobs=2))
    assert [r["prompt"] for r in rows] == ["the cat sat", "the end"]
    for row, ref in zip(rows, refs):
        assert row["text"] == ref.text and row["token_ids"] == ref.token_ids
        assert row["finish_reason"] == ref.finish_reason == "length"
        assert len(row["logprobs"]) == len(ref.token_ids)
        assert [lp["token_id"] for lp in row["logprobs"]] == ref.token_ids
        assert all(len(lp["top"]) == 2 for lp in row["logprobs"])
    # --n: one line per sample
    code, out, _ = run(capsys, ["generate", ckpt, "the cat", "--json", "--n", "3", "--seed", "1", "--max-tokens", "4"])
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["index"] for r in rows] == [0, 1, 2]


def test_num_beams_equals_llm_beam_search(capsys, ckpt, llm):
    from llmlab.infer import BeamParams

    prompts = ["the cat sat", "a dog met"]
    refs = llm.beam_search(prompts, BeamParams(num_beams=3, max_tokens=6, num_return_sequences=2,
                                               length_penalty=0.5))
    argv = ["generate", ckpt, *prompts, "--num-beams", "3", "--n", "2", "--max-tokens", "6", "--length-penalty", "0.5"]
    code, out, _ = run(capsys, argv)
    assert code == 0
    assert out == "".join(f"--- prompt {i + 1}, beam {k + 1}\n{h.text}\n"
                          for i, hs in enumerate(refs) for k, h in enumerate(hs))
    code, out, _ = run(capsys, [*argv, "--json"])
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["prompt"], r["index"]) for r in rows] == [(p, k) for p in prompts for k in range(2)]
    for row, h in zip(rows, [h for hs in refs for h in hs]):
        assert row["text"] == h.text and row["token_ids"] == h.token_ids and row["score"] == pytest.approx(h.score)
        assert row["finish_reason"] == ("stop" if h.token_ids[-1] in llm.engine.eos_token_ids else "length")
    for flags, words in ((["--num-beams", "0"], "--num-beams 0 is invalid"),
                         (["--num-beams", "2", "--n", "3"], "--n 3 is invalid"),
                         (["--num-beams", "2", "--stream"], "--stream")):
        code, _, err = run(capsys, ["generate", ckpt, "hi", *flags])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (flags, err)


def test_stream_equals_the_non_streamed_text(capsys, ckpt, llm):
    _, plain, _ = run(capsys, ["generate", ckpt, "the dog sat", *GREEDY])
    code, streamed, _ = run(capsys, ["generate", ckpt, "the dog sat", *GREEDY, "--stream"])
    assert code == 0 and streamed == plain == llm.generate("the dog sat", greedy())[0].text + "\n"
    # chat mode streams the same reply llm.chat gives
    code, streamed, _ = run(capsys, ["generate", ckpt, "hello cat", *GREEDY, "--stream", "--chat"])
    assert code == 0 and streamed == llm.chat([{"role": "user", "content": "hello cat"}], greedy()).text + "\n"
    code, _, err = run(capsys, ["generate", ckpt, "a", "b", "--stream"])
    assert code == 2 and "single prompt" in err


def test_stop_string_cuts_the_text(capsys, ckpt, llm):
    full = llm.generate("the cat sat", greedy(max_tokens=16))[0].text
    stop = next(c for c in full[2:] if c.isascii() and c.isalnum())  # a character the model writes
    want = full[:full.find(stop)]
    code, out, _ = run(capsys, ["generate", ckpt, "the cat sat", "--temperature", "0", "--max-tokens", "16",
                                "--stop", stop, "--stop", "never-seen", "--json"])
    row = json.loads(out)
    assert code == 0 and row["text"] == want and row["finish_reason"] == "stop" and row["stop_reason"] == stop
    code, out, _ = run(capsys, ["generate", ckpt, "the cat sat", "--temperature", "0", "--max-tokens", "16",
                                "--stop", stop, "--stream"])
    assert code == 0 and out == want + "\n"


def test_prompts_from_stdin_and_file(capsys, ckpt, llm, monkeypatch, tmp_path):
    prompts = ["the cat sat", "a dog", "the end is"]
    refs = [r.text for r in llm.generate(prompts, greedy())]
    code, out, _ = run(capsys, ["generate", ckpt, *GREEDY, "--json"], stdin="the cat sat\n\na dog\nthe end is\n",
                       monkeypatch=monkeypatch)
    assert code == 0 and [json.loads(x)["text"] for x in out.splitlines()] == refs
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    code, out, _ = run(capsys, ["generate", ckpt, "--file", str(jsonl), *GREEDY, "--json"])
    assert code == 0 and [json.loads(x)["prompt"] for x in out.splitlines()] == prompts
    assert [json.loads(x)["text"] for x in out.splitlines()] == refs
    jsonl.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    code, _, err = run(capsys, ["generate", ckpt, "--file", str(jsonl)])
    assert code == 2 and "line 2" in err and '"prompt"' in err


def test_too_long_prompt_needs_truncate(capsys, ckpt, llm):
    long = "the cat sat on the mat " * 60
    code, _, err = run(capsys, ["generate", ckpt, long, *GREEDY])
    assert code == 2 and "--truncate" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, ["generate", ckpt, long, *GREEDY, "--truncate", "--json"])
    assert code == 0 and json.loads(out)["text"] == llm.generate(long, greedy(), truncate=True)[0].text


def test_bad_input_gives_one_clear_line(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, ["generate", str(tmp_path / "missing"), "hi"])
    assert code == 2 and out == "" and err.startswith("llmlab: error:") and "not a model directory" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, ["generate", ckpt, "hi", "--top-p", "0"])
    assert code == 2 and "--top-p 0.0 is invalid: it must lie in (0, 1]" in err
    assert len(err.strip().splitlines()) == 1
    for flags, words in ((["--max-tokens", "0"], "--max-tokens"), (["--block-size", "0"], "--block-size"),
                         (["--stream", "--json"], "--json")):
        code, _, err = run(capsys, ["generate", ckpt, "hi", *flags])
        assert code == 2 and words in err, flags
    code, _, err = run(capsys, ["chat", str(tmp_path / "missing")])
    assert code == 2 and "not a model directory" in err


def test_engine_options_are_passed(capsys, ckpt, llm):
    code, out, _ = run(capsys, ["generate", ckpt, "the cat sat", *GREEDY, "--block-size", "4", "--max-num-seqs", "2",
                                "--kv-memory-mb", "1"])
    assert code == 0 and out == llm.generate("the cat sat", greedy())[0].text + "\n"


def test_compile_flag_asks_for_the_contiguous_layout():
    import argparse

    from llmlab.cli.generate import engine_options

    args = dict(block_size=None, max_num_seqs=None, kv_memory_mb=None, compile=True)
    assert engine_options(argparse.Namespace(**args)) == dict(compile=True, kv_layout="contiguous")
    assert engine_options(argparse.Namespace(**{**args, "kv_memory_mb": 2}))["kv_memory"] == 2 * 2**20
    assert "compile" not in engine_options(argparse.Namespace(**{**args, "compile": False}))


# ------------------------------------------------------------------------------------------------ chat


def test_chat_session_equals_llm_chat(capsys, ckpt, llm, monkeypatch):
    system = {"role": "system", "content": "you are a cat."}
    stdin = "hello there\n\nwhat is a mat?\n/reset\nthe dog sat\n/exit\nnever read\n"
    code, out, err = run(capsys, ["chat", ckpt, "--system", system["content"], *GREEDY], stdin=stdin,
                         monkeypatch=monkeypatch)
    assert code == 0 and "reset" in err
    history, want = [system], []
    for user in ("hello there", "what is a mat?", None, "the dog sat"):
        if user is None:
            history = [system]
            continue
        history.append({"role": "user", "content": user})
        reply = llm.chat(history, greedy()).text
        history.append({"role": "assistant", "content": reply})
        want.append(reply + "\n")
    assert out == "".join(want)
    # end of input ends the chat cleanly too
    code, out, _ = run(capsys, ["chat", ckpt, *GREEDY], stdin="hello there\n", monkeypatch=monkeypatch)
    assert code == 0 and out == llm.chat([{"role": "user", "content": "hello there"}], greedy()).text + "\n"


def test_chat_trims_history_and_refuses_a_message_too_long(capsys, ckpt, llm, tok, monkeypatch):
    users = [f"the cat sat on the mat and the dog sat on the log, turn {i}" for i in range(4)]
    too_long = "the cat sat on the mat " * 40
    stdin = "\n".join([users[0], users[1], too_long, users[2], users[3]]) + "\n"
    max_tokens, window = 24, llm.model.cfg.max_seq_len
    code, out, err = run(capsys, ["chat", ckpt, "--system", "be brief", "--temperature", "0", "--max-tokens",
                                  str(max_tokens)], stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0 and "it was not sent" in err and "dropped" in err
    history, want = [{"role": "system", "content": "be brief"}], []
    for user in users:
        history = fit_history(tok, history + [{"role": "user", "content": user}], window - max_tokens)
        assert history[0]["role"] == "system" and history[-1]["content"] == user
        reply = llm.chat(history, greedy(max_tokens)).text
        history.append({"role": "assistant", "content": reply})
        want.append(reply + "\n")
    assert len(history) < 2 * len(users) + 1  # old turns went
    assert out == "".join(want)


def test_fit_history(tok):
    def n(messages):
        return len(tok.apply_chat_template(messages, add_generation_prompt=True))

    system = {"role": "system", "content": "you are a dog."}
    turns = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"},
             {"role": "user", "content": "the dog sat"}, {"role": "assistant", "content": "on the log"},
             {"role": "user", "content": "the end is near"}]
    messages = [system, *turns]
    before = [dict(m) for m in messages]
    assert fit_history(tok, messages, n(messages)) == messages  # fits: unchanged
    assert fit_history(tok, messages, n(messages) - 1) == [system, *turns[2:]]  # whole oldest turn dropped
    assert fit_history(tok, messages, n([system, *turns[2:]]) - 1) == [system, turns[4]]
    assert fit_history(tok, messages, n([system, turns[4]])) == [system, turns[4]]
    assert fit_history(tok, messages, n([system, turns[4]]) - 1) == [system]  # the last message alone is too long
    assert messages == before  # the input is left alone
    # without a system message the oldest turn goes first too, and a reply never opens the conversation
    assert fit_history(tok, turns, n(turns) - 1) == turns[2:]
    assert fit_history(tok, turns[1:], n(turns[1:]) - 1) == turns[2:]
    assert fit_history(tok, turns, 3) == []
    assert fit_history(tok, [], 10) == []
    # an explicit template (the tokenizer's could be missing)
    assert fit_history(tok, messages, n(messages) - 1, chat_template="chatml") == [system, *turns[2:]]
