"""Prompt sets for online RL (align/tasks.py): the arithmetic generator is right and seeded, held-out prompts
never overlap training ones, JSONL prompt files load with clear line-numbered errors, and the prompt sampler
resumes exactly."""

from __future__ import annotations

import json

import pytest

from llmlab.align.reward import exact_answer_reward
from llmlab.align.tasks import (PromptData, PromptSampler, arithmetic_problems, columns, load_prompts, named_prompts,
                                read_prompts)


def test_arithmetic_problems_are_right_complete_and_seeded():
    items = arithmetic_problems(ops=["+", "-", "*"], a_range=(2, 5), b_range=(0, 3), seed=1)
    assert len(items) == 3 * 4 * 4
    for x in items:
        a, b = x["a"], x["b"]
        assert x["prompt"] == f"What is {a} {x['op']} {b}?"
        assert int(x["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[x["op"]]
        assert 2 <= a <= 5 and 0 <= b <= 3
    assert items == arithmetic_problems(ops=["+", "-", "*"], a_range=(2, 5), b_range=(0, 3), seed=1)
    assert items != arithmetic_problems(ops=["+", "-", "*"], a_range=(2, 5), b_range=(0, 3), seed=2)
    # the reward that checks them agrees with the generator's answers
    reward = exact_answer_reward()
    assert reward([x["prompt"] for x in items], [f"It is {x['answer']}." for x in items],
                  **columns(items)) == [1.0] * len(items)


def test_split_has_no_overlap_and_honours_sizes():
    cfg = PromptData(a_range=[0, 9], b_range=[0, 9], n_eval=30, n_train=50, template="{a} {op} {b} =")
    train, held = load_prompts(cfg, seed=3)
    assert len(train) == 50 and len(held) == 30
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in held}
    assert load_prompts(cfg, seed=3) == (train, held)
    with pytest.raises(ValueError, match="n_eval=100 leaves no training prompts.*widen a_range"):
        load_prompts(PromptData(a_range=[0, 9], b_range=[0, 9], n_eval=100), 0)
    with pytest.raises(ValueError, match="n_train=90 but only 70"):
        load_prompts(PromptData(a_range=[0, 9], b_range=[0, 9], n_eval=30, n_train=90), 0)


def test_jsonl_prompts_with_answers_messages_and_extra_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"question": "2+2?", "solution": 4, "level": 1},
            {"question": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}],
             "solution": "6", "level": 2},
            {"question": "2+2?", "solution": 4, "level": 1}]  # a duplicate: kept once
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_prompts(path, prompt_column="question", answer_column="solution")
    assert items[0] == {"prompt": "2+2?", "answer": "4", "level": 1}
    assert items[1]["prompt"][1]["content"] == "3+3?"
    train, held = load_prompts(PromptData(source=str(path), prompt_column="question", answer_column="solution",
                                          n_eval=1), seed=0)
    assert len(train) == 1 and len(held) == 1
    assert columns(train, repeat=2) == {"answer": [train[0]["answer"]] * 2, "level": [train[0]["level"]] * 2}


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "x", \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_prompts(path)
    path.write_text('{"prompt": "ok"}\n\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no 'prompt' column \(columns: text\); set data.prompt_column"):
        read_prompts(path)
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'prompt' must be a non-empty string"):
        read_prompts(path)
    path.write_text('{"prompt": "q", "answer": null}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'answer' must be a string or a number"):
        read_prompts(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


def test_eval_source_is_removed_from_training(tmp_path):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(10)))
    eval_file.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in (3, 7)))
    train, held = load_prompts(PromptData(source=str(train_file), eval_source=str(eval_file)), seed=0)
    assert sorted(x["prompt"] for x in held) == ["q3", "q7"] and len(train) == 8
    assert not {"q3", "q7"} & {x["prompt"] for x in train}


def test_named_sources_and_bad_names():
    sentiment = named_prompts("sentiment")
    assert len(sentiment) >= 20 and all(set(x) == {"prompt"} for x in sentiment)
    with pytest.raises(ValueError, match="unknown data.source 'arithmetik' \\(did you mean 'arithmetic'"):
        PromptData(source="arithmetik").validate()
    with pytest.raises(ValueError, match="data.ops has \\['/'\\]"):
        PromptData(ops=["/"]).validate()
    with pytest.raises(ValueError, match="data.a_range must be \\[low, high\\]"):
        PromptData(a_range=[5, 1]).validate()


def test_sampler_covers_epochs_and_resumes_exactly():
    s = PromptSampler(7, seed=2)
    first = s.next(5) + s.next(2)
    assert sorted(first) == list(range(7))  # one epoch: every prompt once
    state = s.state_dict()
    rest = [s.next(3) for _ in range(4)]
    t = PromptSampler(7, seed=2)
    t.load_state_dict(state)
    assert [t.next(3) for _ in range(4)] == rest
    with pytest.raises(ValueError, match="had 7 training prompts, this run has 8"):
        PromptSampler(8).load_state_dict(state)
