"""Multiple-choice scoring against lm-evaluation-harness itself (the oracle), offline:

- fast: a random nano model exported to a Hugging Face directory; lm-eval's HFLM scores tricky requests
  (empty context, trailing spaces, non-ASCII, max_length truncation) and simple_evaluate runs an lm-eval
  YAML task that our loader reads too; per-choice log-likelihoods within 1e-4, acc/acc_norm/acc_bytes equal;
- tasks: the BIG-bench files, YAML and JSONL loading, file:line errors, unknown names;
- slow: SmolLM2-135M-Instruct exported with llmlab.save(format="hf"), one BIG-bench task through
  lm_eval.simple_evaluate(model="hf", ...), and the tokenization split on every request of all four tasks.
"""

from __future__ import annotations

import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import llmlab  # noqa: E402
from llmlab.eval.multiple_choice import (  # noqa: E402
    ItemScore, encode_pair, evaluate_multiple_choice, loglikelihoods, mean_stderr,
)
from llmlab.data.sources import shared_data_dir  # noqa: E402
from llmlab.eval.tasks import BUILTIN, TaskError, UnknownTaskError, load_task  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from llmlab.tokenizer import train  # noqa: E402

DATA = shared_data_dir() / "multiple_choice"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not found: the BIG-bench evaluation sets "
                                                          "live in ../shared/data next to the project")
COUNTS = {"date_understanding": 369, "logical_deduction_three_objects": 300, "strategyqa": 2289,
          "truthful_qa": 299}
TOL = dict(rel=1e-4, abs=1e-4)

# records that exercise lm-eval's rules: trailing whitespace moved to the continuation, an empty context (the
# prefix token), non-ASCII choices of different byte and character lengths, gold given as a choice's text
DOCS = [
    {"id": "a", "question": "What colour is the sky?", "choices": ["blue", "green", "a very long answer"], "gold": 0},
    {"id": "b", "question": "The café is in ", "choices": ["Paris", "東京", "Zürich"], "gold": 1},
    {"id": "c", "question": "Two spaces then  ", "choices": ["one", "two words", "three"], "gold": "three"},
    {"id": "d", "question": "", "choices": ["hello there", "hi"], "gold": 0},
    {"id": "e", "question": "A line\n", "choices": ["naïve", "naive", "noïve façade"], "gold": 2},
    {"id": "f", "question": "Is water wet? Yes or no.", "choices": ["Yes", "No"], "gold": 1},
    {"id": "g", "question": "Count: one, two,", "choices": ["three", "four", "ten", "eleven"], "gold": 0},
    {"id": "h", "question": "Über alles ", "choices": ["ja", "nein"], "gold": 1},
]
YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
description: "Answer the questions.\\n\\n"
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, HF dir): a nano Transformer with every weight re-drawn large enough that the choices'
    log-likelihoods are far apart (no near-ties for the argmax), exported for transformers."""
    text = " ".join(f"{d['question']} {' '.join(map(str, d['choices']))}" for d in DOCS)
    tok = train([text * 3, "Answer the questions. Q: A: the a an is of"], vocab_size=360,
                special_tokens=["<|endoftext|>"])
    tok.eos_token = "<|endoftext|>"
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano", vocab_size=len(tok), max_seq_len=64)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.3 * noise if p.dim() >= 2 else 1.0 + 0.2 * noise)
    root = tmp_path_factory.mktemp("tiny")
    llmlab.save(model, tok, root / "hf", format="hf")
    return model, tok, root


@pytest.fixture(scope="module")
def hflm(tiny):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    assert lm_eval
    return HFLM(pretrained=str(tiny[2] / "hf"), device="cpu", dtype="float32", batch_size=8)


REQUESTS = [("Answer: ", "Paris"), ("Q: x\nA:", " two words"), ("", " hello there"), ("", "<|endoftext|>hi"),
            ("naïve  ", " café"), ("The café is in", " 東京"), ("Count: one, two,\n\n", " three"),
            ("<|endoftext|>Q: is it", " yes")]


def test_encode_pair_and_loglikelihoods_match_lm_eval_hflm(tiny, hflm):
    from lm_eval.api.instance import Instance

    model, tok, _ = tiny
    for ctx, cont in REQUESTS:
        if ctx:
            assert encode_pair(tok, ctx, cont) == tuple(map(list, hflm._encode_pair(ctx, cont))), (ctx, cont)
    ours = loglikelihoods(model, tok, REQUESTS, batch_size=3, progress=False)
    theirs = [ll for ll, _ in hflm.loglikelihood(
        [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)], disable_tqdm=True)]
    assert ours == pytest.approx(theirs, **TOL)
    # max_length truncation: lm-eval keeps the last max_length + 1 tokens of context + continuation
    long = [("one two three " * 12, " four five"), ("The café is in " * 6, " Zürich")]
    old = hflm._max_length
    hflm._max_length = 16
    try:
        theirs = [ll for ll, _ in hflm.loglikelihood(
            [Instance("loglikelihood", {}, r, i) for i, r in enumerate(long)], disable_tqdm=True)]
    finally:
        hflm._max_length = old
    assert loglikelihoods(model, tok, long, max_length=16, progress=False) == pytest.approx(theirs, **TOL)
    assert loglikelihoods(model, tok, long, progress=False) != pytest.approx(theirs, **TOL)


def test_simple_evaluate_parity_on_a_yaml_task(tiny, hflm, tmp_path):
    """The same YAML through lm-eval's TaskManager and our load_task: per-choice log-likelihoods, per-item and
    aggregate acc / acc_norm / acc_bytes and their stderr."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok, _ = tiny
    data = write_jsonl(tmp_path / "tiny.jsonl", DOCS)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(YAML.format(data=data, cache=tmp_path / "cache"))
    out = lm_eval.simple_evaluate(model=hflm, tasks=["tiny_mc"], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                           include_defaults=False))
    theirs = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    ours = evaluate_multiple_choice(model, tok, "tiny_mc", include_path=tmp_path / "tasks", batch_size=4,
                                    progress=False)
    assert ours.n == len(theirs) == len(DOCS)
    for mine, ref in zip(ours.items, theirs):
        assert [a[1] for a in ref["arguments"]] == [" " + c for c in mine.choices]
        assert ref["arguments"][0][0] == mine.context
        assert mine.loglikelihoods == pytest.approx([r[0] for r in ref["filtered_resps"]], **TOL)
        assert (mine.acc, mine.acc_norm, mine.acc_bytes) == (ref["acc"], ref["acc_norm"], ref["acc_bytes"])
    metrics = out["results"]["tiny_mc"]
    for m in ("acc", "acc_norm", "acc_bytes"):
        assert getattr(ours, m) == metrics[f"{m},none"]
    # the three rules pick different answers on these records, so the comparison above is not vacuous
    assert len({(s.pred, s.pred_norm, s.pred_bytes) for s in ours.items}) > 1
    assert any(s.pred != s.pred_norm for s in ours.items)


def test_metric_definitions_match_lm_eval():
    from lm_eval.api.metrics import mean_stderr as lm_mean_stderr

    # acc: max ll is "é" (-1.5); acc_norm (characters): -2/2, -3/4, -1.5/1 -> "abcd";
    # acc_bytes ("é" is 2 bytes): -2/2, -3/4, -1.5/2 tie at -0.75 -> the first maximum, "abcd"
    s = ItemScore("x", "f:1", "ctx", ["ab", "abcd", "é"], 0, [-2.0, -3.0, -1.5])
    assert (s.pred, s.pred_norm, s.pred_bytes) == (2, 1, 1)
    assert (s.acc, s.acc_norm, s.acc_bytes) == (0.0, 0.0, 0.0)
    for values in ([1.0, 0.0, 1.0, 1.0], [0.0, 1.0], [1.0] * 5 + [0.0] * 3):
        assert mean_stderr(values) == lm_mean_stderr(values)
    assert mean_stderr([1.0]) is None


def test_batch_size_and_limit(tiny, tmp_path):
    model, tok, _ = tiny
    path = write_jsonl(tmp_path / "t.jsonl", DOCS)
    a = evaluate_multiple_choice(model, tok, path, batch_size=1, progress=False, doc_to_text="{{question}}")
    b = evaluate_multiple_choice(model, tok, path, batch_size=32, progress=False, doc_to_text="{{question}}")
    assert [s.loglikelihoods for s in a.items] == [pytest.approx(s.loglikelihoods, rel=1e-6) for s in b.items]
    task = load_task(path)
    assert [len(task.select(x)) for x in (3, 0.3, 0.01, 100, 2.9)] == [3, 3, 1, len(DOCS), 2]  # lm-eval's rule
    r = evaluate_multiple_choice(model, tok, task, limit=3, progress=False)
    assert r.n == 3 and r.acc_stderr == mean_stderr([s.acc for s in r.items])
    with pytest.raises(ValueError, match="limit"):
        task.select(0)
    with pytest.raises(ValueError, match="only apply when the task is loaded"):
        evaluate_multiple_choice(model, tok, task, doc_to_text="{{question}}")


# ---------------------------------------------------------------------------------------------- tasks
@needs_data
def test_builtin_tasks_load_with_big_bench_prompts():
    for name, n in COUNTS.items():
        task = load_task(name)
        assert len(task) == n and task.name == name
    item = load_task("strategyqa").items[0]
    assert item.context == "Q: Is it common to see frost during some college commencements?\nA:"
    assert item.requests(" ") == [(item.context, " Yes"), (item.context, " No")] and item.gold == 0
    assert item.id == "strategyqa-0000" and item.source.endswith("strategyqa.jsonl:1")
    truthful = load_task("truthful_qa").items[0]
    assert truthful.context.startswith("Q: What is human life expectancy")
    assert truthful.context.endswith("Spain.\n\nQ: What happens to you if you eat watermelon seeds?\nA:")
    logic = load_task("logical_deduction_three_objects").items[0]
    assert logic.context.startswith(BUILTIN["logical_deduction_three_objects"]["description"] + "On a shelf")


@needs_data
def test_lm_eval_yaml_of_a_builtin_reads_back_the_same(tmp_path):
    task = load_task("truthful_qa")
    path = task.to_lm_eval_yaml(tmp_path, task="tqa_copy")
    again = load_task("tqa_copy", include_path=tmp_path)
    assert again.items == task.items and again.name == "tqa_copy"
    assert load_task(path).items == task.items


def test_yaml_and_jsonl_give_the_same_items(tmp_path):
    data = write_jsonl(tmp_path / "tiny.jsonl", DOCS)
    (tmp_path / "t.yaml").write_text(YAML.format(data="tiny.jsonl", cache=tmp_path))  # relative to the YAML
    from_yaml = load_task(tmp_path / "t.yaml")
    from_jsonl = load_task(data, doc_to_text="{{question}}", description="Answer the questions.\n\n")
    assert [(i.context, i.choices, i.gold) for i in from_yaml.items] == \
        [(i.context, i.choices, i.gold) for i in from_jsonl.items]
    assert from_yaml.items[2].gold == 2  # given as the choice's text
    assert load_task(data).items[0].context == "Question: What colour is the sky?\nAnswer:"


def test_bad_records_name_file_and_line(tmp_path):
    rows = [json.dumps(d) for d in DOCS[:2]]
    bad = {"question": "q", "choices": ["a", "b", "c"], "gold": 3}
    path = tmp_path / "bad.jsonl"
    path.write_text(rows[0] + "\n\n" + rows[1] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TaskError, match=r"bad\.jsonl:4: gold index 3 is out of range for 3 choices \(0\.\.2\)"):
        load_task(path)
    cases = [("{not json", r":1: not valid JSON"),
             (json.dumps({"question": "q", "choices": ["a"]}), r":1: missing field 'gold'"),
             (json.dumps({"question": "q", "choices": ["a", "b"], "gold": "c"}), r":1: gold 'c' is not one of"),
             (json.dumps({"question": "q", "choices": ["a", ""], "gold": 0}), r":1: choice 1 is empty"),
             (json.dumps({"question": "q", "choices": "a b", "gold": 0}), r":1: doc_to_choice must give"),
             (json.dumps([1, 2]), r":1: expected a JSON object")]
    for line, message in cases:
        path.write_text(line + "\n")
        with pytest.raises(TaskError, match=message):
            load_task(path)


def test_unknown_task_lists_the_available_ones(tmp_path):
    (tmp_path / "mine.yaml").write_text("task: my_task\n")
    with pytest.raises(UnknownTaskError) as e:
        load_task("strategyq", include_path=tmp_path)
    message = str(e.value)
    assert "did you mean 'strategyqa'?" in message
    assert all(name in message for name in [*BUILTIN, "my_task"])
    with pytest.raises(FileNotFoundError, match="no such task file"):
        load_task(tmp_path / "missing.jsonl")


def test_yaml_errors(tmp_path):
    data = write_jsonl(tmp_path / "tiny.jsonl", DOCS)
    base = YAML.format(data=data, cache=tmp_path)
    cases = [(base.replace("doc_to_text:", "doc_to_txt:"), r"'doc_to_txt' \(did you mean 'doc_to_text'\?\)"),
             (base + "process_docs: !function utils.process\n", "!function tags are not supported"),
             (base + "process_docs: x\n", "'process_docs' is not supported"),
             (base.replace("num_fewshot: 0", "num_fewshot: 5"), "only zero-shot"),
             (base.replace("output_type: multiple_choice", "output_type: generate_until"), "only multiple_choice"),
             (base.replace(data, str(tmp_path / "nope.jsonl")), "nope.jsonl not found"),
             (base.replace("test_split: test", "test_split: validation"), "no split 'validation'"),
             (base.replace("{{gold}}", "{{answer}}"), r"tiny\.jsonl:1: UndefinedError: 'answer' is undefined")]
    for text, message in cases:
        (tmp_path / "t.yaml").write_text(text)
        with pytest.raises(TaskError, match=message):
            load_task(tmp_path / "t.yaml")


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@needs_data
def test_smollm2_matches_lm_eval_simple_evaluate(tmp_path):
    """Acceptance: SmolLM2-135M-Instruct exported to HF format; strategyqa (BIG-bench prompt "Q: ...\\nA:",
    continuations " Yes" / " No", whose lengths make acc_norm differ from acc) through
    lm_eval.simple_evaluate(model="hf") offline. Also the context/continuation token split of lm-eval's own
    _encode_pair on SmolLM2's tokenizer for the first 40 requests of every built-in task (no model needed)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    start = time.perf_counter()
    try:
        model, tok = llmlab.load("smollm2-135m-instruct")
        llmlab.save(model, tok, tmp_path / "hf", format="hf")

        class Split:  # lm-eval's own tokenization code on the exported tokenizer, without loading a model
            backend, add_bos_token, custom_prefix_token_id = "causal", None, None
            tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
            tok_encode, prefix_token_id, _encode_pair = HFLM.tok_encode, HFLM.prefix_token_id, TemplateLM._encode_pair

        for name in BUILTIN:
            task = load_task(name)
            for ctx, cont in [r for item in task.select(40) for r in item.requests(task.target_delimiter)]:
                assert encode_pair(tok, ctx, cont) == tuple(map(list, Split()._encode_pair(ctx, cont)))

        limit = 10
        task = load_task("strategyqa")
        task.to_lm_eval_yaml(tmp_path / "tasks", task="strategyqa_llmlab", cache_dir=tmp_path / "cache")
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                      tasks=["strategyqa_llmlab"], limit=limit, log_samples=True, device="cpu",
                                      batch_size=16, task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                              include_defaults=False))
        t_lm_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = evaluate_multiple_choice(model, tok, task, limit=limit, batch_size=16, progress=False)
        t_ours = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    theirs = sorted(out["samples"]["strategyqa_llmlab"], key=lambda s: s["doc_id"])
    assert ours.n == len(theirs) == limit
    worst = 0.0
    for mine, ref in zip(ours.items, theirs):
        assert ref["arguments"] == [(mine.context, " " + c) for c in mine.choices]
        lls = [r[0] for r in ref["filtered_resps"]]
        assert mine.loglikelihoods == pytest.approx(lls, **TOL)
        worst = max(worst, *(abs(a - b) for a, b in zip(mine.loglikelihoods, lls)))
        assert (mine.acc, mine.acc_norm, mine.acc_bytes) == (ref["acc"], ref["acc_norm"], ref["acc_bytes"])
    metrics = out["results"]["strategyqa_llmlab"]
    for m in ("acc", "acc_norm", "acc_bytes"):
        assert getattr(ours, m) == metrics[f"{m},none"]
        assert math.isclose(getattr(ours, f"{m}_stderr"), metrics[f"{m}_stderr,none"], rel_tol=1e-12)
    print(f"\nSmolLM2 strategyqa[:{limit}]: acc {ours.acc} acc_norm {ours.acc_norm}; max |Δll| {worst:.2e}; "
          f"lm-eval {t_lm_eval:.1f} s, ours {t_ours:.1f} s, whole test {time.perf_counter() - start:.1f} s")
