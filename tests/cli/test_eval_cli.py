"""`llmlab eval` on a tiny random model saved as an llmlab checkpoint. Every number the CLI prints is checked
against the eval library called directly on the in-memory model: perplexity (and bits per byte from its
definition), multiple-choice acc / acc_norm / acc_bytes with --limit, generation metrics on LLM.generate's
greedy outputs; --list-tasks, --out = --json; bad input (unknown task, gold out of range, bad JSONL line,
missing --text / --data) exits 2 with one line naming the problem."""

import json
import math

import pytest
import torch

import llmlab
from llmlab.cli.main import main
from llmlab.eval.generation import bleu, chrf, rouge, squad
from llmlab.eval.multiple_choice import evaluate_multiple_choice
from llmlab.eval.perplexity import perplexity
from llmlab.infer import LLM, SamplingParams
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train

TEXT = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log. "
        "stop here, then go there; the end is near, the end is here. ") * 20
MC = [
    {"question": "Where did the cat sit?", "choices": ["on the mat", "on the log", "by a log"], "gold": 0},
    {"question": "Who met the cat?", "choices": ["a dog", "the end"], "gold": "a dog"},
    {"question": "Where is the end?", "choices": ["near", "here", "there"], "gold": 1},
    {"question": "Did the dog sit?", "choices": ["yes", "no"], "gold": 0},
    {"question": "Le café est où ?", "choices": ["là-bas", "ici"], "gold": 1},
]


@pytest.fixture(scope="module")
def tok():
    return train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("nano", vocab_size=len(tok))).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    llmlab.save(model, tok, path, format="llmlab")
    return str(path)


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "tiny_mc.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in MC), encoding="utf-8")
    return path


def run(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys, argv):
    code, out, err = run(capsys, [*argv, "--json"])
    assert code == 0, err
    return json.loads(out)


def test_perplexity_equals_the_library_and_bits_per_byte_its_definition(capsys, tmp_path, ckpt, model, tok):
    text = TEXT[:600] + "café, naïve"  # non-ASCII: bytes != characters
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    got = run_json(capsys, ["eval", ckpt, "--task", "perplexity", "--text", str(path), "--max-length", "64",
                            "--stride", "32"])["results"]["perplexity"]
    ref = perplexity(model, tok, text, max_length=64, stride=32, progress=False)
    for key in ("nll", "ppl", "bits_per_byte"):
        assert got[key] == pytest.approx(getattr(ref, key), rel=1e-6), key
    assert (got["tokens"], got["windows"], got["max_length"], got["stride"]) == \
        (ref.tokens, ref.windows, 64, 32)
    assert got["bytes"] == len(text.encode("utf-8")) > len(text)
    assert got["bits_per_byte"] == pytest.approx(got["nll"] / (math.log(2) * got["bytes"]), rel=1e-12)
    assert got["ppl"] == pytest.approx(math.exp(got["nll"] / got["tokens"]), rel=1e-12)

    got = run_json(capsys, ["eval", ckpt, "--task", "perplexity", "--text", str(path), "--max-chars", "100"])
    ref = perplexity(model, tok, text[:100], progress=False)  # default window: the model's context, disjoint
    assert got["results"]["perplexity"]["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    assert got["results"]["perplexity"]["bytes"] == 100


def test_multiple_choice_jsonl_equals_evaluate_multiple_choice_and_limit(capsys, ckpt, model, tok, mc_file):
    got = run_json(capsys, ["eval", ckpt, "--task", str(mc_file)])["results"]["tiny_mc"]
    ref = evaluate_multiple_choice(model, tok, mc_file, progress=False)
    assert got["n"] == 5
    for key in ("acc", "acc_norm", "acc_bytes", "acc_stderr", "acc_norm_stderr", "acc_bytes_stderr"):
        assert got[key] == pytest.approx(getattr(ref, key)), key

    got = run_json(capsys, ["eval", ckpt, "--task", str(mc_file), "--limit", "2"])["results"]["tiny_mc"]
    ref = evaluate_multiple_choice(model, tok, mc_file, limit=2, progress=False)
    assert got["n"] == 2 and (got["acc"], got["acc_norm"]) == (ref.acc, ref.acc_norm)

    code, out, _ = run(capsys, ["eval", ckpt, "--task", str(mc_file)])  # the table
    assert code == 0 and "tiny_mc (5 items)" in out and "acc_norm" in out
    code, _, err = run(capsys, ["eval", ckpt, "--task", str(mc_file), "--task", str(mc_file)])
    assert code == 2 and "'tiny_mc' is given twice" in err


def test_unknown_task_lists_the_available_ones(capsys, ckpt):
    code, _, err = run(capsys, ["eval", ckpt, "--task", "strategyq"])
    assert code == 2
    assert err.startswith("llmlab: error: unknown task 'strategyq'") and err.count("\n") == 1
    assert "strategyqa" in err and "truthful_qa" in err


def test_gold_out_of_range_names_file_and_line(capsys, tmp_path, ckpt):
    path = tmp_path / "bad_gold.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n" + json.dumps({**MC[3], "gold": 2}) + "\n")
    code, _, err = run(capsys, ["eval", ckpt, "--task", str(path)])
    assert code == 2 and err.count("\n") == 1
    assert "bad_gold.jsonl:2" in err and "out of range" in err


def test_generation_metrics_equal_the_library_on_greedy_outputs(capsys, tmp_path, ckpt, model, tok):
    prompts = ["the cat sat", "a dog met", "the end is", "stop here"]
    outs = LLM(model, tok).generate([tok.encode(p) for p in prompts], SamplingParams(max_tokens=8, temperature=0))
    hyps = [o.outputs[0].text for o in outs]
    # references built from the outputs, so that every metric is neither 0 nor 100
    refs = [[hyps[0]], [hyps[1][: len(hyps[1]) // 2], "something else"], ["the cat sat on the mat"],
            [" ".join(hyps[3].split()[::-1]) or "x"]]
    path = tmp_path / "gen.jsonl"
    rows = [{"prompt": p, "reference": r} for p, r in zip(prompts[:3], refs)] + \
        [{"prompt": prompts[3], "answers": refs[3][0]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = run_json(capsys, ["eval", ckpt, "--task", "generation", "--data", str(path), "--max-tokens", "8"])
    got = got["results"]["generation"]
    assert got["n"] == 4
    assert got["bleu"] == pytest.approx(bleu(hyps, refs).score)
    assert got["chrf"] == pytest.approx(chrf(hyps, refs).score)
    scores = [rouge(h, r) for h, r in zip(hyps, refs)]
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert got[t] == pytest.approx(100 * sum(s[t].fmeasure for s in scores) / 4), t
    assert {k: got[k] for k in ("exact_match", "f1")} == pytest.approx(squad(hyps, refs))
    assert got["exact_match"] >= 25  # item 1's reference is its own output

    got = run_json(capsys, ["eval", ckpt, "--task", "generation", "--data", str(path), "--max-tokens", "8",
                            "--metrics", "em", "--limit", "1"])["results"]["generation"]
    assert got["n"] == 1 and got["exact_match"] == 100.0 and "bleu" not in got

    path.write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "no reference"}\n')
    code, _, err = run(capsys, ["eval", ckpt, "--task", "generation", "--data", str(path)])
    assert code == 2 and "gen.jsonl:2" in err and "reference" in err
    path.write_text(json.dumps(rows[0]) + "\n\n{not json\n")
    code, _, err = run(capsys, ["eval", ckpt, "--task", "generation", "--data", str(path)])
    assert code == 2 and "gen.jsonl:3: not valid JSON" in err
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "the " * 200, "reference": "x"}) + "\n")
    code, _, err = run(capsys, ["eval", ckpt, "--task", "generation", "--data", str(path)])
    assert code == 2 and "the prompt of" in err and "gen.jsonl:2 has" in err and "context window" in err


@pytest.mark.parametrize("argv, message", [
    (["--task", "perplexity"], "--task perplexity needs --text"),
    (["--task", "generation"], "--task generation needs --data"),
    (["--task", "perplexity", "--text", "no/such/file.txt"], "no/such/file.txt"),
    ([], "at least one --task"),
    (["--task", "strategyqa", "--data-dir", "no/such/dir"], "strategyqa.jsonl not found"),  # MissingDataError
])
def test_missing_inputs_are_clear_errors(capsys, ckpt, argv, message):
    code, _, err = run(capsys, ["eval", ckpt, *argv])
    assert code == 2 and message in err and err.count("\n") == 1


def test_list_tasks_and_out_writes_the_json(capsys, tmp_path, ckpt, mc_file):
    code, out, _ = run(capsys, ["eval", "--list-tasks"])
    assert code == 0
    assert {"strategyqa", "truthful_qa", "date_understanding", "logical_deduction_three_objects"} <= set(out.split())

    out_file = tmp_path / "res" / "results.json"
    printed = run_json(capsys, ["eval", ckpt, "--task", str(mc_file), "--limit", "3", "--out", str(out_file)])
    assert json.loads(out_file.read_text()) == printed
    assert printed["model"] == ckpt and printed["results"]["tiny_mc"]["n"] == 3
    assert [p.name for p in out_file.parent.iterdir()] == ["results.json"]  # no temp file left behind
